"""ContrastiveSeg's reduction (specs/contrastiveseg.md): shared by the reference and the fused
path."""
from __future__ import annotations

import torch


def mean_over_anchors(terms, npos, y, factor: float):
    """(t / t_b) * mean of the per-anchor terms over anchors with a label and a positive."""
    used = (y >= 0) & (npos > 0)
    return factor * torch.where(used, terms, 0.0).sum() / used.sum().clamp(min=1)
