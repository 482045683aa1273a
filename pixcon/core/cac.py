"""CAC's steps outside the contrast (specs/cac.md): confidences and pseudo-labels, the
directional mask, the bank's labels, the l2 alignment. Shared by the reference and the fused
path."""
from __future__ import annotations

import torch


def confidence(logits):
    """(max softmax probability, argmax) per row, detached, computed in float32 or wider."""
    p = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), 1)
    return p.max(dim=1)


ALIGNMENTS = ("contrastive", "l2")


def directional_mask(c_anchor, c_target, pos_threshold, *, directional=True,
                     positive_filtering=True):
    """Pixels whose anchor view is pulled toward the target: the target is confident (above
    the threshold: positive filtering) and strictly more confident than the anchor (the
    directional mask; ties pull neither). A switch off drops its condition."""
    keep = torch.ones_like(c_anchor, dtype=torch.bool)
    if positive_filtering:
        keep = keep & (c_target > pos_threshold)
    if directional:
        keep = keep & (c_anchor < c_target)
    return keep


def sampling_labels(y_anchor, negative_labels, negative_sampling):
    """(anchor labels, negative labels) for the label filter of the negatives: as given with
    negative sampling; without it 0 for every negative and 1 for every anchor, so that every
    negative counts."""
    if negative_sampling:
        return y_anchor, negative_labels
    return torch.ones_like(y_anchor), torch.zeros_like(negative_labels)


def l2_terms(f_anchor, f_target):
    """Experiment I's alignment: ||f_anchor - sg(f_target)||^2 per row (n,)."""
    return (f_anchor - f_target.detach()).square().sum(dim=1)
