"""Confusion matrix and mIoU (the official evaluation: labels 0..C-1, void ignored)."""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; target values outside
    [0, C) (void) are skipped."""
    valid = (target >= 0) & (target < num_classes)
    idx = target[valid].to(torch.int64) * num_classes + pred[valid].to(torch.int64)
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """IoU of each class; NaN where the class has zero union (absent from labels and predictions)."""
    conf = conf.to(torch.float64)
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.nan)


def mean_iou(conf: torch.Tensor) -> float:
    """Mean IoU over classes with non-zero union (NaN classes are left out, as np.nanmean)."""
    return float(torch.nanmean(iou_per_class(conf)))
