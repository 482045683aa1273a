"""Contextrast (Sung et al., CVPR 2024): contextual contrastive learning, pure PyTorch, read off
specs/contextrast.md (reconstructed from Contextrast++; every uncertain choice is a parameter).

Per layer i (I layers, I the deepest) with unit-norm pixel embeddings z and GT labels g(z):

    a_i^n = mean{ z : g(z) = n }                       (batch-wide class anchors, n in N_i)
    â_i^n = w_l a_i^n + w_h a_I^n  if n in N_I, else a_i^n          (static fusion, w_l + w_h = 1)
    L_i^n = 1/|Z+| sum_{z+ : g = n} softplus( LSE_{z- in Z-_n}(â·z-/t) - â·z+/t )
    L_PA  = sum_i lambda_i 1/|N_i| sum_{n in N_i} L_i^n

Z-_n are BANE negatives: error pixels (GT != prediction at layer i), ranked by their Euclidean
distance to the edge of their error region (one multi-label EDT per image), the lowest ceil(ks *
count) per error class kept (ties by flat index); reading R1 (default): the negatives of anchor n
are the kept pixels of the *other* classes' false-negative maps (GT = m != n, predicted != m);
reading R2: the kept pixels of n's false-positive map (predicted n, GT != n).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.contextrast import error_map, fuse_anchors, layer_labels, negative_mask
from . import common as cm
from . import edt

__all__ = ["error_map", "fuse_anchors", "layer_labels", "negative_mask", "select_lowest",
           "bane_negatives", "layer_inputs", "pixel_anchor_loss"]


def select_lowest(err: torch.Tensor, d2: torch.Tensor, num_classes: int, ks: float) -> torch.Tensor:
    """Per error class n, pooled over the batch: the ceil(ks * count_n) error pixels with the
    smallest squared distance, ties by flat index; pixels with no boundary (d2 = inf) are never
    kept and not counted. err, d2: flat (P,). Returns a (P,) bool."""
    keep = torch.zeros_like(err, dtype=torch.bool)
    for n in range(num_classes):
        idx = torch.nonzero((err == n) & torch.isfinite(d2))[:, 0]
        if len(idx) == 0:
            continue
        k = math.ceil(ks * len(idx))
        order = torch.sort(d2[idx], stable=True).indices     # by distance, ties by flat index
        keep[idx[order[:k]]] = True
    return keep


def bane_negatives(gt, pred, num_classes, *, ks=0.5, reading="R1"):
    """gt, pred: (B, h, w) int maps at the layer's resolution (gt -1 = ignored).
    Returns (selected (P,) bool, err (P,) error class or -1)."""
    err = error_map(gt, pred, reading)
    d2 = edt.distance_transform(err, background=-1, squared=True)
    err, d2 = err.reshape(-1), d2.reshape(-1)
    return select_lowest(err, d2, num_classes, ks), err


def layer_inputs(emb, labels, pred_labels, num_classes, ignore_index, normalize):
    z = cm.pixel_rows(emb).to(torch.promote_types(emb.dtype, torch.float32))
    if normalize:
        z = F.normalize(z, dim=1, eps=cm.EPS)
    return (z, *layer_labels(emb.shape, labels, pred_labels, num_classes, ignore_index))


def pixel_anchor_loss(embs, labels, pred_labels, num_classes, *, w_low=0.5, w_high=0.5,
                      layer_weights=(0.1, 0.3, 0.7, 1.0), temperature=0.1, ks=0.5,
                      ignore_index=255, normalize=True, detach_anchors=False, reading="R1",
                      stats=None):
    """Reference L_PA. embs: list of (B, D, h_i, w_i), deepest last; labels (B, H, W);
    pred_labels (B, H', W') predicted classes. Returns the scalar loss.
    stats: None, or a function (sums, counts) -> (sums, counts) giving the statistics the
    anchors come from (pixcon.distributed.class_stats: over all ranks; sums keep their
    gradient); which classes count in a layer's mean stays this batch's."""
    C = num_classes
    zs, anchors, present, here = [], [], [], []
    for emb in embs:
        z, gt, pr = layer_inputs(emb, labels, pred_labels, C, ignore_index, normalize)
        onehot = F.one_hot(gt.clamp(min=0), C).to(z.dtype) * (gt >= 0)[:, None].to(z.dtype)
        sums, count = onehot.T @ z, onehot.sum(0)
        here.append(count > 0)
        if stats is not None:
            sums, count = stats(sums, count)
        a = sums / count.clamp(min=1)[:, None]                           # class means, (C, D)
        zs.append((z, gt, pr, emb.shape))
        anchors.append(a.detach() if detach_anchors else a)
        present.append(count > 0)
    fused = fuse_anchors(anchors, present, w_low, w_high)
    total = sum(0.0 * emb.sum() for emb in embs)                         # graph-connected zero
    for (z, gt, pr, shape), a_hat, pres, lam in zip(zs, fused, here, layer_weights):
        B, _, h, w = shape
        sel, err = bane_negatives(gt.view(B, h, w), pr.view(B, h, w), C, ks=ks, reading=reading)
        neg = negative_mask(sel, err, C, reading)                        # (P, C)
        s = z @ a_hat.T / temperature                                    # (P, C)
        has_neg = neg.any(dim=0)                                         # no negative: term 0
        s_neg = torch.where(has_neg[None, :], s.masked_fill(~neg, float("-inf")), 0.0)
        nl = torch.logsumexp(s_neg, dim=0)                               # (C,)
        pos = F.one_hot(gt.clamp(min=0), C).bool() & (gt >= 0)[:, None] & has_neg[None, :]
        x = nl[None, :] - s
        per_pos = torch.logaddexp(x, torch.zeros_like(x)).masked_fill(~pos, 0.0)   # softplus
        n_pos = (F.one_hot(gt.clamp(min=0), C) * (gt >= 0)[:, None]).sum(0)
        per_class = per_pos.sum(0) / n_pos.clamp(min=1)
        n_present = pres.sum()
        total = total + lam * per_class.sum() / n_present.clamp(min=1)
    return total
