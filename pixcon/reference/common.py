"""Pure-PyTorch building blocks of the references: class sums, the pick within a class, the
negatives' log-sum-exp (what the kernels compute, written plainly), plus the shared contract of
pixcon.core.common under the names the references have always used."""
from __future__ import annotations

import torch

from ..core.common import (EPS, TWO32, class_means_from_sums, group_by_class,  # noqa: F401
                           hard_pixels, nearest_indices, normalize, own_class_prob, pixel_labels,
                           pixel_rows, relation_cdf, resize_nearest)
from .rng import uniform_index

__all__ = ["EPS", "TWO32", "class_means_from_sums", "group_by_class", "hard_pixels",
           "nearest_indices", "normalize", "own_class_prob", "pixel_labels", "pixel_rows",
           "relation_cdf", "resize_nearest", "class_sums", "pick_in_class", "negative_lse"]


def class_sums(rows: torch.Tensor, lab: torch.Tensor, num_classes: int):
    """Sum and count of rows (P, D) per class (lab -1 ignored): (C, D) in rows' dtype, (C,) int64."""
    valid = lab >= 0
    idx = torch.where(valid, lab, num_classes)          # ignored rows go to a dropped extra row:
    sums = rows.new_zeros(num_classes + 1, rows.shape[1]).index_add_(0, idx, rows)[:num_classes]
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=rows.device)
    counts.index_add_(0, idx, valid.to(torch.int64))     # no masked copy of the rows is made or
    return sums, counts[:num_classes]                     # saved for backward


def pick_in_class(order, offsets, counts, cls, r):
    """The pixel chosen by 32-bit draws r uniformly (with replacement) within class cls:
    order[offsets[cls] + (r * counts[cls]) >> 32] (clamped into order for empty classes,
    whose picks the caller discards; -1 everywhere when no item is in any class)."""
    if len(order) == 0:
        return torch.full(cls.shape, -1, dtype=order.dtype, device=order.device)
    return order[(offsets[cls] + uniform_index(r, counts[cls])).clamp(max=len(order) - 1)]


def negative_lse(z, y, keys=None, key_labels=None, *, temperature: float):
    """NL_r = logsumexp over the keys of another label of z_r . k / t (-inf without any): the
    negatives' term of every loss here (CAC's denominator too)."""
    if keys is None:
        keys, key_labels = z, y
    s = z @ keys.T / temperature
    neg = (y[:, None] >= 0) & (key_labels[None, :] >= 0) & (y[:, None] != key_labels[None, :])
    return torch.logsumexp(s.masked_fill(~neg, float("-inf")), dim=1)
