"""Label mapping, masks, grouping and class statistics: the O(P) and O(C^2) steps every method's
reference and its fused path both take, so that both see identical labels, hard masks and
relation tables (the kernels are tested against pixcon.reference, which these steps are not
part of)."""
from __future__ import annotations

import numpy as np
import torch

TWO32 = 1 << 32
EPS = 1e-8   # torch.cosine_similarity's eps: each norm is clamped to at least EPS


def nearest_indices(in_size: int, out_size: int, device=None) -> torch.Tensor:
    """Source indices of ``F.interpolate(mode="nearest")`` resizing in_size -> out_size
    (src = min(floor(dst * (in/out)), in - 1), the scale computed in float32 as ATen does)."""
    dst = torch.arange(out_size, device=device)
    if in_size == out_size:
        return dst
    if out_size == 2 * in_size:
        return dst >> 1
    # ATen: float scale = (float)in / out; src = floorf(dst * scale). The scale is rounded to
    # float32 on the host (numpy, no tensor) and multiplies a float32 tensor: a float32 product,
    # with no host-to-device copy (a stream sync on a GPU)
    scale = float(np.float32(in_size / out_size))
    src = torch.floor(dst.to(torch.float32) * scale).to(torch.int64)
    return src.clamp(max=in_size - 1)


def resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of the last two dims of a (..., H, W) map of any dtype (labels, masks,
    scores) to (..., h, w): a strided copy for whole factors (src = dst * H / h exactly), else
    one gather of the kept pixels."""
    H, W = x.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return x
    if H % h == 0 and W % w == 0:      # whole factors: every (H/h)-th row and column
        return x[..., ::H // h, ::W // w].contiguous()
    iy = nearest_indices(H, h, x.device)
    ix = nearest_indices(W, w, x.device)
    return x[..., iy[:, None], ix]


def pixel_labels(labels: torch.Tensor, size: tuple[int, int], num_classes: int,
                 ignore_index: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flattened (B*h*w,) int64 class of every pixel at feature resolution; -1 marks a pixel that
    is ignored (``ignore_index``), masked out (``mask`` False) or outside [0, num_classes)."""
    lab = resize_nearest(labels, size).to(torch.int64)
    valid = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)
    if mask is not None:
        valid &= resize_nearest(mask, size).to(torch.bool)
    return torch.where(valid, lab, -1).reshape(-1)


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B*h*w, D): one row per pixel, in the order pixel_labels uses."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def own_class_prob(probs: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """Probability of each pixel's own label: probs (B, C, h, w), lab (P,) -> (P,) (any value
    where lab is -1). A gather along C, no copy of probs."""
    B, _, h, w = probs.shape
    return probs.gather(1, lab.clamp(min=0).view(B, 1, h, w)).reshape(-1)


def hard_pixels(probs: torch.Tensor, lab: torch.Tensor, threshold: float) -> torch.Tensor:
    """Valid pixels whose probability of their own label is strictly below ``threshold`` (the
    official ``prob < strong_threshold``; the paper writes <=). Compared in float32 (float64 for
    float64 probs) whatever the dtype of probs."""
    p = own_class_prob(probs, lab)
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    return (lab >= 0) & (p < threshold)


def class_means_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean per class; a class without pixels gets a zero row."""
    return sums / counts.clamp(min=1).to(sums.dtype)[:, None]


def normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / max(||x||, EPS), the normalisation inside torch.cosine_similarity."""
    return x / x.norm(dim=dim, keepdim=True).clamp(min=EPS)


def relation_cdf(means: torch.Tensor, present: torch.Tensor, temperature: float) -> torch.Tensor:
    """Integer CDF table of the negative-class distribution (ReCo's semantic relation graph).

    Row c is P(j | c) = softmax_{j present, j != c}(cos(mean_c, mean_j) / temperature), computed
    in float64 and stored as cumulative thresholds in [0, 2^32] (int64), so that a 32-bit draw r
    picks class j = #{k : cdf[c, k] <= r} on every backend with integer compares only. A row
    with no possible negative is all zero (no draw is accepted).
    """
    C = means.shape[0]
    m = normalize(means.to(torch.float64))
    sim = (m @ m.T) / temperature
    allowed = present[None, :] & present[:, None] & ~torch.eye(C, dtype=torch.bool, device=m.device)
    sim = sim.masked_fill(~allowed, float("-inf"))
    any_neg = allowed.any(dim=1, keepdim=True)
    p = torch.softmax(sim.masked_fill(~any_neg, 0.0), dim=1) * allowed
    cdf = torch.floor(torch.cumsum(p, dim=1) * TWO32).to(torch.int64)
    k = torch.arange(C, device=m.device)
    last = torch.where(allowed, k, -1).amax(dim=1, keepdim=True)  # last allowed class per row
    cdf = torch.where(k[None, :] >= last, TWO32, cdf.clamp(max=TWO32 - 1))
    return torch.where(any_neg, cdf, 0)


def group_by_class(lab: torch.Tensor, num_classes: int):
    """Pixels grouped by class, ascending pixel index within a class.

    Returns (order, offsets, counts): order (P,) pixel indices sorted by class (pixels with
    lab -1 last), class c occupies order[offsets[c] : offsets[c] + counts[c]]."""
    key = torch.where(lab >= 0, lab, num_classes)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(sorted_key, torch.arange(num_classes + 1, device=lab.device))
    return order, bounds[:-1], bounds[1:] - bounds[:-1]

