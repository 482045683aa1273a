"""The embedded default dataset: procedural segmentation scenes, generated from a seed (no download).

Nine classes: background (0) and four *appearance groups* of two classes each. The two classes of
a group share colour and texture statistics exactly and differ only by shape or by context, so a
model cannot separate them from local appearance alone:

| group | colour, texture           | class a (id)          | class b (id)            | differ by |
|-------|---------------------------|-----------------------|-------------------------|-----------|
| 0     | red, stripes              | disc (1)              | square (2)              | shape     |
| 1     | green, checker            | triangle (3)          | ring (4)                | shape     |
| 2     | blue, speckle             | cross (5)             | bar (6)                 | shape     |
| 3     | yellow, smooth shading    | disc in the upper half ("kite", 7) | disc in the lower half ("ball", 8) | context |

Each image holds 2-4 objects over a tinted, low-frequency noise background; later objects occlude
earlier ones. Like VOC, a one-pixel ring on every object boundary is labelled ``IGNORE`` (255).
Image ``i`` of a split depends only on (seed, split, i), so the splits are fixed and a subset is
the same whatever else is generated.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from .protocols import image_classes

IGNORE = 255
CLASSES = ("background", "disc", "square", "triangle", "ring", "cross", "bar", "kite", "ball")
NUM_CLASSES = len(CLASSES)
GROUP_COLOURS = np.array([[0.80, 0.25, 0.20], [0.25, 0.70, 0.30], [0.20, 0.35, 0.85],
                          [0.85, 0.75, 0.20]])
GROUP_OF_CLASS = [None, 0, 0, 1, 1, 2, 2, 3, 3]
SPLIT_SIZES = {"train": 400, "val": 100}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _shape_mask(cls: int, yy, xx, cy, cx, r, angle):
    """Boolean mask of class ``cls``'s shape centred at (cy, cx) with size r."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy                    # rotated coordinates
    if cls in (1, 7, 8):                                        # disc
        return dx * dx + dy * dy <= r * r
    if cls == 2:                                                # square
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if cls == 3:                                                # triangle (pointing along v)
        return (v >= -0.6 * r) & (v <= r) & (np.abs(u) <= 0.8 * (r - v))
    if cls == 4:                                                # ring
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if cls == 5:                                                # cross
        return ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    if cls == 6:                                                # bar
        return (np.abs(u) <= 1.2 * r) & (np.abs(v) <= 0.3 * r)
    raise ValueError(cls)


def _texture(group: int, rng, yy, xx):
    """Zero-mean texture of an appearance group; its parameters are drawn per object from the
    same distribution for both classes of the group."""
    if group == 0:
        theta, period = rng.uniform(0, np.pi), rng.uniform(3.0, 5.0)
        return 0.18 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    if group == 1:
        p = rng.uniform(2.0, 3.5)
        return 0.15 * np.sign(np.sin(xx / p) * np.sin(yy / p))
    if group == 2:
        return 0.22 * rng.standard_normal(yy.shape)
    gy, gx = rng.uniform(-1, 1, size=2) * 0.015
    return gy * (yy - yy.mean()) + gx * (xx - xx.mean())


def make_scene(seed: int, split: str, index: int, size: int = 64):
    """One scene: (image (3, S, S) float32 in [0, 1], label (S, S) int64 with IGNORE)."""
    rng = _rng(seed, split, index)
    S = size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    low = rng.standard_normal((3, 5, 5))                                # low-frequency background
    up = torch.nn.functional.interpolate(torch.from_numpy(low)[None], size=(S, S),
                                         mode="bicubic", align_corners=True)[0].numpy()
    tint = rng.uniform(0.35, 0.6, size=3)
    img = tint[:, None, None] + 0.08 * up + 0.04 * rng.standard_normal((3, S, S))
    label = np.zeros((S, S), dtype=np.int64)
    for _ in range(rng.integers(2, 5)):
        cls = int(rng.integers(1, NUM_CLASSES))
        r = rng.uniform(0.1, 0.2) * S
        cx = rng.uniform(r, S - r)
        if cls == 7:
            cy = rng.uniform(r, S / 2 - r / 2)
        elif cls == 8:
            cy = rng.uniform(S / 2 + r / 2, S - r)
        else:
            cy = rng.uniform(r, S - r)
        m = _shape_mask(cls, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        g = GROUP_OF_CLASS[cls]
        colour = GROUP_COLOURS[g] + rng.uniform(-0.08, 0.08, size=3)
        obj = colour[:, None, None] + _texture(g, rng, yy, xx)[None]
        img = np.where(m[None], obj, img)
        label[m] = cls
    # a one-pixel ignore ring where the 4-neighbourhood holds another label (VOC-like)
    pad = np.pad(label, 1, mode="edge")
    edge = ((pad[1:-1, :-2] != label) | (pad[1:-1, 2:] != label) |
            (pad[:-2, 1:-1] != label) | (pad[2:, 1:-1] != label))
    label = np.where(edge, IGNORE, label)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(img), torch.from_numpy(label)


class SceneDataset(torch.utils.data.Dataset):
    """A split of the procedural scenes, generated once into memory.

    >>> ds = SceneDataset("train", seed=0)          # 400 images, 64 x 64, 9 classes
    >>> image, label = ds[0]                        # (3, 64, 64) float in [0, 1], (64, 64) int64
    """

    num_classes = NUM_CLASSES
    class_names = CLASSES
    ignore_index = IGNORE

    def __init__(self, split: str = "train", *, seed: int = 0, size: int = 64,
                 length: int | None = None):
        if split not in SPLIT_SIZES:
            raise ValueError(f"SceneDataset: split must be one of {tuple(SPLIT_SIZES)}, got {split!r}")
        n = SPLIT_SIZES[split] if length is None else length
        if n < 1:
            raise ValueError(f"SceneDataset: length must be positive, got {n}")
        pairs = [make_scene(seed, split, i, size) for i in range(n)]
        self.images = torch.stack([p[0] for p in pairs])
        self.labels = torch.stack([p[1] for p in pairs])
        self.ids = [f"{split}-{i:05d}" for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def classes_of(self, i) -> set[int]:
        """Classes in image i (void dropped), for the label protocols."""
        return image_classes(self.labels[i].numpy(), NUM_CLASSES)
