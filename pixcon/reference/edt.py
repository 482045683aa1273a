"""Exact Euclidean distance transform in plain torch (the ground truth of the EDT kernels and the
fallback where the compiled extension is missing). Brute force per pass, O(H^2 W + H W^2) per
image: meant for small maps.

For labels L and a background value b: D(p) = 0 where L(p) == b, else the Euclidean distance from
p to the nearest pixel q with L(q) != L(p); +inf if there is none. With a binary mask and b = 0
this is scipy.ndimage.distance_transform_edt (which returns garbage instead of inf when the mask
has no zero). The multi-label form equals the binary transform of every label's own mask on that
label's pixels (any different label is a boundary), so one call replaces C binary calls.
"""
from __future__ import annotations

import torch

BIG = 1 << 40


def distance_transform(labels: torch.Tensor, background: int = 0, squared: bool = False):
    H, W = labels.shape[-2:]
    N = labels.numel() // max(H * W, 1)
    dtype = torch.float64 if squared else torch.float32    # squared: exact integers
    out = torch.empty(labels.shape, dtype=dtype, device=labels.device)
    if N == 0 or H == 0 or W == 0:
        return out
    L = labels.reshape(N, H, W).to(torch.int64)
    y = torch.arange(H, device=L.device)
    x = torch.arange(W, device=L.device)
    res = []
    for n in range(N):
        lab = L[n]
        # column pass: G(y, x) = min |y - y'| over y' in the column with a different label
        diff = lab[:, None, :] != lab[None, :, :]                          # (y, y', x)
        dy = (y[:, None] - y[None, :]).abs()[:, :, None]
        g = torch.where(diff, dy, BIG).amin(dim=1)                          # (H, W)
        g2 = torch.where(g >= BIG, BIG, g * g)
        # row pass: D^2(y, x) = min_x' (x - x')^2 + [same label] G(y, x')^2
        same = lab[:, :, None] == lab[:, None, :]                           # (y, x, x')
        dx2 = ((x[:, None] - x[None, :]) ** 2)[None]
        d2 = (dx2 + torch.where(same, g2[:, None, :], 0)).amin(dim=2)
        d2 = torch.where(lab == background, 0, d2)
        res.append(d2)
    d2 = torch.stack(res).reshape(labels.shape)
    inf = d2 >= BIG
    d = d2.to(torch.float64)
    if not squared:
        d = d.sqrt()
    return torch.where(inf, float("inf"), d).to(dtype)
