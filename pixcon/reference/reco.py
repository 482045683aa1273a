"""ReCo loss (Liu et al., ICLR 2022), pure PyTorch, read off the official ``compute_reco_loss``
(specs/reco.md §1) with pixcon's counter-based sampler in place of the official RNG calls.

    L = 1/|K| * sum_{c in K, hard(c) != {}} 1/Q * sum_{q in Q_c}
            -log( e^{cos(q, m_c)/t} / (e^{cos(q, m_c)/t} + sum_{k in N_c(q)} e^{cos(q, k)/t}) )

K: classes with at least one valid pixel; m_c: mean embedding of the valid pixels of c (detached);
Q_c: Q queries drawn uniformly with replacement among the hard pixels of c (probability of the
own label < strong_threshold); N_c(q): N negatives, each of class j ~ softmax_{j in K, j != c}
(cos(m_c, m_j) / t) and then a pixel uniform within class j (detached). Gradients reach the
embedding only through the queries.
"""
from __future__ import annotations

import torch

from . import common as cm
from .rng import STREAM_NEGATIVE, STREAM_QUERY, philox4x32, uniform_index


def reco_loss(emb, labels, probs, mask=None, *, ignore_index=255, strong_threshold=0.97,
              temperature=0.5, num_queries=256, num_negatives=512, seed=0,
              relation_temperature=None, reduction="mean"):
    """Reference ReCo loss. Arguments as ``pixcon.ops.reco_loss`` (already validated, seed an int).

    Computes in float32 (float64 for float64 embeddings) whatever the input dtype.
    reduction="none" returns the (C, Q) per-query losses (zero rows for classes without queries).
    """
    B, D, h, w = emb.shape
    C, Q, N = probs.shape[1], num_queries, num_negatives
    dt = torch.promote_types(emb.dtype, torch.float32)
    rel_t = temperature if relation_temperature is None else relation_temperature

    lab = cm.pixel_labels(labels, (h, w), C, ignore_index, mask)       # (P,), -1 = not valid
    x = cm.pixel_rows(emb).to(dt)                                       # (P, D), with grad
    hard = cm.hard_pixels(probs, lab, strong_threshold)                 # (P,)

    sums, counts = cm.class_sums(x.detach(), lab, C)
    means = cm.class_means_from_sums(sums, counts)                      # m_c, detached
    present = counts > 0
    K = int(present.sum())

    per_query = x.new_zeros(C, Q)
    if K >= 2:
        cdf = cm.relation_cdf(means, present, rel_t)                    # P(j | c) as thresholds
        order, offsets, _ = cm.group_by_class(lab, C)
        for c in torch.nonzero(present)[:, 0].tolist():
            hard_c = torch.nonzero(hard & (lab == c))[:, 0]             # ascending pixel index
            if len(hard_c) == 0:
                continue                                                # still counted in K
            rows = c * Q + torch.arange(Q, device=lab.device)           # counter of query (c, q)
            q_pix = hard_c[uniform_index(philox4x32(rows, seed, STREAM_QUERY)[:, 0], len(hard_c))]
            r = philox4x32(rows[:, None] * N + torch.arange(N, device=lab.device), seed,
                           STREAM_NEGATIVE)                             # (Q, N, 4)
            neg_cls = torch.searchsorted(cdf[c].expand(Q, C).contiguous(), r[..., 0].contiguous(),
                                       right=True)
            neg_pix = cm.pick_in_class(order, offsets, counts, neg_cls, r[..., 1])

            anchor = cm.normalize(x[q_pix])                             # (Q, D)
            pos = cm.normalize(means[c])                                # (D,)
            neg = cm.normalize(x.detach()[neg_pix])                     # (Q, N, D)
            logits = torch.cat([(anchor @ pos)[:, None],
                                torch.einsum("qd,qnd->qn", anchor, neg)], dim=1) / temperature
            per_query[c] = torch.logsumexp(logits, dim=1) - logits[:, 0]   # CE with target 0

    per_query = per_query + 0.0 * x.sum()      # degenerate batches stay connected to emb's graph
    if reduction == "none":
        return per_query
    return per_query.sum() / (Q * max(K, 1))
