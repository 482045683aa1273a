"""Data helpers the methods need beyond a plain loader: CAC's two overlapping crops
(specs/cac.md §2)."""
from __future__ import annotations

import random
from typing import NamedTuple

import torch


class CropPair(NamedTuple):
    """Two crops of one image: top-left corners (row, col) in the (padded) image, the overlap
    box (top, left, bottom, right) in each crop's own coordinates (multiples of the stride,
    inside the unpadded image), and their IoU (1.0 when every try failed and crop 2 = crop 1)."""
    origin1: tuple[int, int]
    origin2: tuple[int, int]
    box1: tuple[int, int, int, int]
    box2: tuple[int, int, int, int]
    iou: float
    tries: int


def _snap(a: int, b: int, stride: int) -> int:
    """b moved toward -inf so that b - a is a multiple of stride; + stride if that is < 0."""
    b = a + ((b - a) // stride) * stride
    return b + stride if b < 0 else b


def _box(o_self, o_other, crop, limit):
    lo = max(0, o_other - o_self)
    hi = min(crop, crop + o_other - o_self, limit)
    return lo, hi


def overlapping_crops(height: int, width: int, crop: int, *, stride: int = 8,
                      iou_bound: tuple[float, float] = (0.1, 1.0), max_tries: int = 50,
                      seed: int | None = None, context: bool = True) -> CropPair:
    """CAC's pair of overlapping crops of an image of size (height, width) (after rescaling,
    before padding; the image is padded bottom/right to at least crop x crop).

    Crop 1's corner is uniform over the padded image; crop 2's is drawn uniformly, its offset
    from crop 1 snapped to the stride grid (toward -inf, + stride when that leaves the image),
    and accepted when the IoU crop^2-overlap / (2 crop^2 - overlap) lies in ``iou_bound``; after
    ``max_tries`` failures crop 2 = crop 1. The overlap boxes are capped to the unpadded image
    rounded down to the stride (only when the image is smaller than the crop), so they map
    exactly onto the stride-``stride`` feature grid. Deterministic for an int seed (None: from
    Python's global random generator). ``context=False`` is the paper's ablation without
    context-aware consistency (its Table 3, row VI): one view, crop 2 = crop 1 (the two
    branches then differ only by their photometric augmentations), no tries."""
    for name, v in (("height", height), ("width", width), ("crop", crop), ("stride", stride),
                    ("max_tries", max_tries)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"overlapping_crops: {name} must be a positive int, got {v!r}")
    if crop % stride:
        raise ValueError(f"overlapping_crops: crop ({crop}) must be a multiple of stride "
                         f"({stride}) for the overlap to fall on the feature grid")
    lo, hi = iou_bound
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"overlapping_crops: iou_bound must satisfy 0 <= low <= high <= 1, got "
                         f"{iou_bound!r}")
    rng = random.Random(seed) if seed is not None else random
    H, W = max(height, crop), max(width, crop)
    y1, x1 = rng.randint(0, H - crop), rng.randint(0, W - crop)
    y2, x2, iou, tries = y1, x1, 1.0, 0
    for tries in range(1, (max_tries if context else 0) + 1):
        cy = _snap(y1, rng.randint(0, H - crop), stride)
        cx = _snap(x1, rng.randint(0, W - crop), stride)
        if abs(cy - y1) > crop or abs(cx - x1) > crop:
            continue
        inter = max(0, crop - abs(cy - y1)) * max(0, crop - abs(cx - x1))
        cand = inter / (2 * crop * crop - inter)
        if lo <= cand <= hi:
            y2, x2, iou = cy, cx, cand
            break
    else:
        tries = max_tries if context else 0
    lim_y, lim_x = (height // stride) * stride, (width // stride) * stride
    t1, b1 = _box(y1, y2, crop, lim_y)
    l1, r1 = _box(x1, x2, crop, lim_x)
    t2, b2 = _box(y2, y1, crop, lim_y)
    l2, r2 = _box(x2, x1, crop, lim_x)
    return CropPair((y1, x1), (y2, x2), (t1, l1, b1, r1), (t2, l2, b2, r2), iou, tries)


def image_labels(labels, num_classes: int, *, ignore_index: int = 255):
    """(B, C) float 0/1 image-level labels of (B, H, W) masks: class c is present in image b
    when any of its pixels carries c (the ignore label and out-of-range values count for
    none). How the trainer derives CAC's image-level labels from its dataset's masks."""
    lab = torch.as_tensor(labels).reshape(labels.shape[0], -1)
    ok = (lab >= 0) & (lab < num_classes) & (lab != ignore_index)
    out = torch.zeros(lab.shape[0], num_classes + 1, dtype=torch.float32, device=lab.device)
    out.scatter_(1, torch.where(ok, lab, num_classes), 1.0)
    return out[:, :num_classes]
