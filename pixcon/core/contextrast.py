"""Contextrast's steps outside the kernels (specs/contextrast.md): error maps, BANE's negative
mask, the anchors' fusion across layers, each layer's labels. Shared by the reference and the
fused path."""
from __future__ import annotations

import torch

from . import common as cm


def error_map(gt: torch.Tensor, pred: torch.Tensor, reading: str) -> torch.Tensor:
    """Class-wise error maps as one label map (B, h, w): R1 -> the GT class of a misclassified
    pixel (false negatives of that class), R2 -> its predicted class (false positives); -1
    elsewhere (correct or ignored, gt < 0)."""
    wrong = (gt >= 0) & (pred != gt)
    return torch.where(wrong, gt if reading == "R1" else pred, -1)


def negative_mask(selected, err, num_classes, reading):
    """(P, C) bool: pixel p is a negative of anchor c."""
    c = torch.arange(num_classes, device=err.device)
    if reading == "R1":
        return selected[:, None] & (err[:, None] >= 0) & (err[:, None] != c[None, :])
    return selected[:, None] & (err[:, None] == c[None, :])


def fuse_anchors(anchors, present, w_low, w_high):
    """â_i = w_l a_i + w_h a_I where the class is present at the deepest layer I, else a_i."""
    deep, deep_present = anchors[-1], present[-1]
    fused = [torch.where(deep_present[:, None], w_low * a + w_high * deep, a)
             for a in anchors[:-1]]
    return fused + [deep]


def fuse_anchors_backward(grads, deep_present, w_low, w_high):
    """The gradients of the anchors a_i from those of the fused â_i (:func:`fuse_anchors`;
    deep_present: the (C,) classes present at the deepest layer I): da_i = w_l dâ_i where the
    class is present at I, else dâ_i (i < I), and da_I = dâ_I + sum_{i < I} w_h dâ_i where
    present at I."""
    deep_present = deep_present[:, None]
    out = [torch.where(deep_present, w_low * g, g) for g in grads[:-1]]
    deep = grads[-1]
    for g in grads[:-1]:
        deep = deep + torch.where(deep_present, w_high * g, 0.0)
    return out + [deep]


def layer_labels(shape, labels, pred_labels, num_classes, ignore_index):
    """Flat (P,) ground truth (-1 ignored) and predictions at a (B, D, h, w) layer. pred_labels:
    (B, H', W') classes, or (B, C, H', W') scores: resized first, then their argmax (the same
    labels as argmax then resize, each kept pixel's own argmax, at a fraction of the reads)."""
    h, w = shape[-2:]
    gt = cm.pixel_labels(labels, (h, w), num_classes, ignore_index)
    H, W = pred_labels.shape[-2:]
    if pred_labels.dim() == 4 and H % h == 0 and W % w == 0:
        # whole factors: the max over the strided view of the kept pixels, without copying them
        # first (10 vs 16-22 ms at HRNet's first layer, 2 threads)
        pr = pred_labels[..., ::H // h, ::W // w]
    else:
        pr = cm.resize_nearest(pred_labels, (h, w))
    # max(dim).indices: the first maximum, as argmax, but a vector loop over the classes where
    # argmax across dim 1 is a strided scalar one (9 vs 46 ms at HRNet's first layer)
    return gt, (pr.max(dim=1).indices if pr.dim() == 4 else pr).reshape(-1)


def pyramid_labels(shapes, labels, pred_labels, num_classes, ignore_index):
    """:func:`layer_labels` of every layer of a pyramid (finest first). Scores' argmax is taken
    once, at the first layer, and subsampled for the others where the nearest resizes nest
    (whole factors from the scores to the first layer and from it to the layer: the same source
    pixels, so the same labels); elsewhere each layer takes its own. Spares a read of the
    scores (B x C x H' x W') per further layer."""
    out, first = [], None
    for shape in shapes:
        h, w = shape[-2:]
        if first is not None:
            (h1, w1), pr1 = first
            gt = cm.pixel_labels(labels, (h, w), num_classes, ignore_index)
            out.append((gt, pr1[..., ::h1 // h, ::w1 // w].reshape(-1)))
            continue
        gt, pr = layer_labels(shape, labels, pred_labels, num_classes, ignore_index)
        out.append((gt, pr))
        H, W = pred_labels.shape[-2:]
        nests = all(H % h == 0 and W % w == 0 and h % s[-2] == 0 and w % s[-1] == 0
                    for s in shapes[1:])
        if pred_labels.dim() == 4 and nests:
            first = ((h, w), pr.view(shape[0], h, w))
    return out
