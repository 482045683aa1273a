"""ContrastiveSeg (Wang et al., ICCV 2021): cross-image pixel contrast, pure PyTorch, read off
specs/contrastiveseg.md (§3 sampler, §4 loss, §6 memory) with pixcon's counter-based keys in
place of the official ``randperm`` calls.

Anchors z_r (unit-norm embeddings as given, labels y_r), keys k (the anchors themselves, or a
memory bank), s_rk = z_r . k_k / t:

    L = (t / t_b) * mean_r 1/|P(r)| sum_{p in P(r)} -log( e^{s_rp} / (e^{s_rp} + sum_{n in N(r)} e^{s_rn}) )
      = (t / t_b) * mean_r 1/|P(r)| sum_{p in P(r)} softplus( NL_r - s_rp ),   NL_r = LSE_{n in N(r)} s_rn

P(r): keys with label y_r (in-batch: except r itself); N(r): keys with another label. Each
positive is normalised against itself plus all negatives (not SupCon's softmax). Anchors with no
positive (official: 0/0 = NaN) are left out of the mean; no anchor at all gives a zero.

Sampler (per (image, class), image-major, class ascending): a class is kept when its pixel count
exceeds ``max_views``; n_view = min(max_samples // T, max_views) for T kept pairs; hard pixels
(ground truth c, predicted not c) and easy ones (predicted c) are split by the official rule and
chosen uniformly without replacement: each pixel p gets the 32-bit key philox(p, seed,
STREAM_ANCHOR) and a set is taken in ascending key order (ties by pixel index). Anchors are
stacked view-major (row v*T + t is view v of pair t), as the official code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.contrastiveseg import mean_over_anchors
from . import common as cm
from .rng import STREAM_ANCHOR, philox4x32

# The plain reference builds anchors x keys matrices (about eight temporaries of that size);
# above this many anchors x keys it refuses instead of allocating them (use the tiled backends).
DENSE_LIMIT = 8192 * 8192


def anchor_keys(num_pixels: int, seed: int, device=None) -> torch.Tensor:
    """The per-pixel sort key of the without-replacement draws: (P,) int64 in [0, 2^32)."""
    return philox4x32(torch.arange(num_pixels, device=device), seed, STREAM_ANCHOR)[:, 0]


def split_views(n_hard: int, n_easy: int, n_view: int) -> tuple[int, int]:
    """How many hard and easy anchors a kept class gives (the official split rule, §3)."""
    half = n_view / 2
    if n_hard >= half and n_easy >= half:
        keep_h = n_view // 2
    elif n_hard >= half:
        keep_h = n_view - n_easy
    else:                          # n_easy >= half: unreachable otherwise (n_hard + n_easy > n_view)
        keep_h = n_hard
    return keep_h, n_view - keep_h


def sample_anchors(gt: torch.Tensor, pred: torch.Tensor, *, max_samples: int, max_views: int,
                   seed: int):
    """gt, pred: (B, h, w) at feature resolution (gt -1 = ignored). Returns (index (T*n_view,)
    flat pixel indices, view-major; labels (T*n_view,); T; n_view). T = 0 gives empty tensors."""
    B = gt.shape[0]
    gt, pred = gt.reshape(B, -1), pred.reshape(B, -1)
    hw = gt.shape[1]
    key = anchor_keys(B * hw, seed, gt.device)
    kept = [(b, c) for b in range(B) for c in torch.unique(gt[b]).tolist()
            if c >= 0 and int((gt[b] == c).sum()) > max_views]
    T = len(kept)
    empty = torch.zeros(0, dtype=torch.int64, device=gt.device)
    if T == 0:
        return empty, empty, 0, 0
    n_view = min(max_samples // T, max_views)
    if n_view == 0:
        raise ValueError(f"pixel_contrast_loss: {T} (image, class) pairs have more than "
                         f"max_views={max_views} pixels, more than max_samples={max_samples} "
                         f"anchors allow (n_view = max_samples // {T} = 0); raise max_samples to "
                         f"at least {T}")
    rows = []
    for b, c in kept:
        hard = torch.nonzero((gt[b] == c) & (pred[b] != c))[:, 0] + b * hw
        easy = torch.nonzero((gt[b] == c) & (pred[b] == c))[:, 0] + b * hw
        keep_h, keep_e = split_views(len(hard), len(easy), n_view)
        hard = hard[torch.sort(key[hard], stable=True).indices[:keep_h]]
        easy = easy[torch.sort(key[easy], stable=True).indices[:keep_e]]
        rows.append(torch.cat([hard, easy]))
    index = torch.stack(rows).T.reshape(-1)                        # view-major: v * T + t
    labels = torch.tensor([c for _, c in kept], device=gt.device).repeat(n_view)
    return index, labels, T, n_view


def contrast_terms(z, y, keys=None, key_labels=None, *, temperature: float):
    """Per-anchor 1/|P(r)| sum_p softplus(NL_r - s_rp) (the loss before t/t_b and the mean) and
    |P(r)|. keys None: in-batch (keys = anchors, r is not its own positive). Labels -1 mark
    absent rows (neither anchor nor key)."""
    in_batch = keys is None
    if in_batch:
        keys, key_labels = z, y
    if z.shape[0] * keys.shape[0] > DENSE_LIMIT:
        raise ValueError(f"the reference contrast builds {z.shape[0]} x {keys.shape[0]} matrices, "
                         f"above its limit of {DENSE_LIMIT} entries; use backend='native' (CPU "
                         "tiles) or 'triton'")
    if z.shape[0] == 0 or keys.shape[0] == 0:
        return z.sum(dim=1) * 0, torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
    s = z @ keys.T / temperature
    valid = (y[:, None] >= 0) & (key_labels[None, :] >= 0)
    same = (y[:, None] == key_labels[None, :]) & valid
    neg = valid & ~same
    pos = same
    if in_batch:
        pos = pos & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    # per-positive log-probability log(e^s_p / (e^s_p + sum_neg e^s_n)) = -softplus(NL - s_p),
    # NL the negatives' log-sum-exp (-inf without any: the term is 0). The official form
    # subtracts the row's maximum over every key, the anchor itself included, and underflows
    # to -inf when that one dominates (a large norm, a small temperature)
    nl = torch.logsumexp(s.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)
    ell = -F.softplus(nl - s)
    npos = pos.sum(dim=1)
    a = torch.where(pos, ell, 0.0).sum(dim=1) / npos.clamp(min=1)
    return -a, npos


def pixel_contrast_loss(emb, labels, predict, *, ignore_index=255, max_samples=1024,
                        max_views=100, temperature=0.1, base_temperature=0.07, memory=None,
                        seed=0):
    """Reference ContrastiveSeg loss; arguments as ``pixcon.ops.pixel_contrast_loss`` (validated,
    seed an int). memory: None (in-batch) or (keys (K, D), key_labels (K,)), detached. Computes in
    float32 (float64 for float64 emb)."""
    B, D, h, w = emb.shape
    gt = cm.pixel_labels(labels, (h, w), 2**62, ignore_index).view(B, h, w)
    pred = cm.resize_nearest(predict, (h, w))
    x = cm.pixel_rows(emb).to(torch.promote_types(emb.dtype, torch.float32))
    index, y, _, _ = sample_anchors(gt, pred, max_samples=max_samples, max_views=max_views,
                                    seed=seed)
    z = x[index]
    if memory is None:
        terms, npos = contrast_terms(z, y, temperature=temperature)
    else:
        keys, key_labels = memory
        terms, npos = contrast_terms(z, y, keys.detach().to(z.dtype), key_labels,
                                     temperature=temperature)
    loss = mean_over_anchors(terms, npos, y, temperature / base_temperature)
    return loss + 0.0 * x.sum()               # no anchor: a zero connected to emb's graph


def dense_contrast_loss(emb, labels, *, ignore_index=255, temperature=0.1, base_temperature=0.07):
    """Reference of the dense mode: the same per-positive contrast over every valid pixel of the
    batch (anchors = keys = all pixels, no sampling). Refuses above DENSE_LIMIT pixel pairs."""
    B, D, h, w = emb.shape
    lab = cm.pixel_labels(labels, (h, w), 2**62, ignore_index)
    x = cm.pixel_rows(emb).to(torch.promote_types(emb.dtype, torch.float32))
    keep = torch.nonzero(lab >= 0)[:, 0]
    terms, npos = contrast_terms(x[keep], lab[keep], temperature=temperature)
    loss = mean_over_anchors(terms, npos, lab[keep], temperature / base_temperature)
    return loss + 0.0 * x.sum()
