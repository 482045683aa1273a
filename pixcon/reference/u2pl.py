"""U2PL's contrastive loss with unreliable negatives (specs/u2pl.md), in plain PyTorch.

Everything per class is a (P, C) mask over pixels x classes, so a pixel may belong to several
classes' sets (the official one-hot does that, §3) and nothing loops over classes:

    V[p, c]  reliable pixels of class c          (positives: teacher class means; the divisor)
    A[p, c]  V and teacher prob of c > delta_p   (anchor candidates, student rows)
    N[p, c]  negative candidates of c            (pushed into c's queue before sampling)

    loss = 1/|{c : V[:, c] any}| sum_c 1/Q sum_q -log softmax([cos(a, m_c), cos(a, k_1..N)] / t)_0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import u2pl as steps
from ..core.u2pl import class_masks, group_columns, official_onehot, ranks, sample
from . import common as cm

__all__ = ["class_masks", "group_columns", "official_onehot", "ranks", "sample", "infonce",
           "reference_contrast", "u2pl_loss"]


def infonce(rows, a_idx, pos, neg_keys, neg_idx, temperature):
    """Per anchor slot: -log softmax of [cos(a, pos), cos(a, k_n)] / t at the positive (0 where
    a_idx < 0 or the anchor has no negative: a class whose queue is empty adds nothing)."""
    ok = (a_idx >= 0) & (neg_idx >= 0).all(dim=1)
    a = rows[a_idx.clamp(min=0).long()]
    k = neg_keys[neg_idx.clamp(min=0).long()]
    s_pos = F.cosine_similarity(a, pos, dim=1, eps=cm.EPS)
    s_neg = F.cosine_similarity(a[:, None, :], k, dim=2, eps=cm.EPS)
    logits = torch.cat([s_pos[:, None], s_neg], dim=1) / temperature
    return torch.where(ok, torch.logsumexp(logits, dim=1) - logits[:, 0], 0.0)


def reference_contrast(emb, a_idx, pos, keys, neg_idx, temperature):
    """Per anchor slot, the InfoNCE term (see :func:`infonce`) with the rows gathered: an
    anchors x negatives x D tensor, as the official code makes (the reference only)."""
    dt = pos.dtype
    return infonce(cm.pixel_rows(emb).to(dt), a_idx, pos, keys.to(dt), neg_idx, temperature)


def u2pl_loss(*args, contrast=reference_contrast, **kw):
    """pixcon.core.u2pl.u2pl_loss (the loss's sequence) with the reference's InfoNCE (the
    gathered anchors x negatives x D rows) unless another ``contrast`` is given."""
    return steps.u2pl_loss(*args, contrast=contrast, **kw)
