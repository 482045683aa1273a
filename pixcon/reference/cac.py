"""CAC (Lai et al., CVPR 2021): directional context-aware consistency, pure PyTorch, read off
specs/cac.md §3-§6.

Overlap pixel j of two crops, unit features f1_j, f2_j, confidences c and pseudo-labels y (max
and argmax of the softmax, detached), a bank of detached negatives k with pseudo-labels:

    l1_j = -log( e^{f1_j . sg(f2_j) / t} / ( e^{f1_j . sg(f2_j) / t} + sum_{k : y_k != y1_j} e^{f1_j . k / t} ) )
         = softplus( NL1_j - f1_j . sg(f2_j) / t ),     NL1_j = LSE_{k : y_k != y1_j} f1_j . k / t
    D1_j = [c2_j > gamma] [c1_j < c2_j]            (only the less confident view is pulled)
    L1   = sum_j D1_j l1_j / (sum_j D1_j + 1e-12)

and L2 with 1 and 2 swapped; the loss is L1 + L2. ``official_numerics`` reproduces the official
arithmetic instead (specs/cac.md §6): every row stabilised by the maximum over its positive and
the first 8000 bank columns (masked ones included) and 1e-8 added inside and outside the log,
which caps a pixel's loss near -log(1e-8) = 18.4 and overflows when a later column exceeds the
first chunk's maximum by more than about 88 (fp32).

The paper's ablation (its Table 3) turns components off one at a time; each is a switch here,
all on by default (the full method, row VIII):

    directional=False          Dir: no [c1 < c2]; with positive filtering still [c2 > gamma]
    positive_filtering=False   PF:  no [c2 > gamma] (eq. 7); both off: every overlap pixel
    negative_sampling=False    NS:  every bank negative, whatever its pseudo-label (eq. 5 off)
    alignment="l2"             CL off (row I): l1_j = ||f1_j - sg(f2_j)||^2 instead of InfoNCE;
                               no negatives, so negative_sampling does not apply
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.cac import ALIGNMENTS, confidence, directional_mask, l2_terms, sampling_labels
from .common import negative_lse

__all__ = ["ALIGNMENTS", "confidence", "directional_mask", "l2_terms", "sampling_labels",
           "pixel_terms", "official_pixel_terms", "directional_contrast_loss"]

OFFICIAL_CHUNK = 8000
OFFICIAL_EPS = 1e-8


def pixel_terms(f_anchor, f_target, y_anchor, negatives, negative_labels, temperature):
    """l_j (n,): one positive (the other view, stop-gradient) against the bank's negatives of
    another pseudo-label than the anchor's."""
    pos = (f_anchor * f_target.detach()).sum(dim=1) / temperature
    nl = negative_lse(f_anchor, y_anchor, negatives, negative_labels, temperature=temperature)
    return F.softplus(nl - pos)


def official_pixel_terms(f_anchor, f_target, y_anchor, negatives, negative_labels, temperature,
                         chunk=OFFICIAL_CHUNK):
    """The official arithmetic of l_j: stabiliser m_j = max(pos_j, max of the first ``chunk``
    logits, masked included), eps 1e-8 inside and outside the log."""
    pos = (f_anchor * f_target.detach()).sum(dim=1) / temperature
    logits = f_anchor @ negatives.T / temperature
    m = torch.maximum(pos, logits[:, :chunk].max(dim=1).values)
    keep = negative_labels[None, :] != y_anchor[:, None]
    den = torch.exp(pos - m) + (torch.exp(logits - m[:, None]) * keep).sum(dim=1)
    return -torch.log(torch.exp(pos - m) / (den + OFFICIAL_EPS) + OFFICIAL_EPS)


def directional_contrast_loss(feat1, feat2, logits1, logits2, negatives, negative_labels, *,
                              pos_threshold=0.75, temperature=0.1, reduction="mean",
                              official_numerics=False, directional=True,
                              positive_filtering=True, negative_sampling=True,
                              alignment="contrastive"):
    """Reference CAC loss L1 + L2 (arguments as pixcon.ops.directional_contrast_loss). Computes
    in float32 (float64 for float64 features). reduction "none": (2, n) per-pixel terms, zero
    where the directional mask is off."""
    dt = torch.promote_types(feat1.dtype, torch.float32)
    f1, f2, bank = feat1.to(dt), feat2.to(dt), negatives.detach().to(dt)
    c1, y1 = confidence(logits1)
    c2, y2 = confidence(logits2)
    if alignment == "l2":
        l1, l2 = l2_terms(f1, f2), l2_terms(f2, f1)
    else:
        terms = official_pixel_terms if official_numerics else pixel_terms
        (a1, k1), (a2, k2) = (sampling_labels(y, negative_labels, negative_sampling)
                              for y in (y1, y2))
        l1 = terms(f1, f2, a1, bank, k1, temperature)
        l2 = terms(f2, f1, a2, bank, k2, temperature)
    switches = dict(directional=directional, positive_filtering=positive_filtering)
    d1 = directional_mask(c1, c2, pos_threshold, **switches).to(dt)
    d2 = directional_mask(c2, c1, pos_threshold, **switches).to(dt)
    if reduction == "none":
        return torch.stack([l1 * d1, l2 * d2])
    return (l1 * d1).sum() / (d1.sum() + 1e-12) + (l2 * d2).sum() / (d2.sum() + 1e-12)
