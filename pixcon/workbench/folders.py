"""Folder loaders for Pascal VOC (with the SBD augmented list), Cityscapes and SUN RGB-D.

Each returns a :class:`FolderDataset`: ``ds[i]`` is (image (3, H, W) float32 in [0, 1], label
(H, W) int64 with void = 255), ``ds.ids`` are sorted (never file-system order), and
``ds.classes_of(i)`` feeds the label protocols. Images are decoded with Pillow
(``pip install pillow``). Layouts:

- Pascal VOC: ``root/JPEGImages/<id>.jpg``, labels ``root/SegmentationClassAug/<id>.png``
  (falls back to ``SegmentationClass``; palette indices 0..20, 255 void); lists
  ``train_aug.txt`` (train; falls back to ``train.txt``) and ``val.txt``, in
  ``root/ImageSets/Segmentation/`` or in ``root``.
- Cityscapes: ``root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
  ``root/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``; labelIds are mapped to the 19
  trainIds, everything else to 255. ``size=(512, 1024)`` reproduces the official pre-resize.
- SUN RGB-D (ReCo's layout): ``root/image/{train,test}/<id>.jpg|png`` and
  ``root/label/{train,test}/<id>.png`` with raw labels 0..37 (0 = void); classes are label - 1.
  With ``root/test_idx.txt`` (one test id a line) the official split is used: val = those test
  images, train = all train images plus the test images not listed; without it, train / test.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .protocols import image_classes

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                             23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SUN_CLASSES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
               "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain",
               "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
               "fridge", "tv", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
               "night stand", "toilet", "sink", "lamp", "bathtub", "bag")
SUN_NUM_CLASSES = len(SUN_CLASSES)


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("the folder loaders decode images with Pillow: pip install pillow") from e
    return Image


def _lut(mapping: dict, default=255) -> np.ndarray:
    lut = np.full(256, default, dtype=np.int64)
    for k, v in mapping.items():
        lut[k] = v
    return lut


class FolderDataset(torch.utils.data.Dataset):
    """Image/label file pairs; labels pass through a 256-entry lookup table (raw value ->
    class, 255 = void). ``size=(H, W)`` resizes on load (image bilinear, label nearest)."""

    ignore_index = 255

    def __init__(self, images, labels, ids, class_names, lut=None, size=None):
        if not ids:
            raise FileNotFoundError("no image/label pairs found (check the dataset root and layout)")
        self.image_files, self.label_files, self.ids = list(images), list(labels), list(ids)
        self.class_names = tuple(class_names)
        self.num_classes = len(class_names)
        self.lut = _lut({i: i for i in range(self.num_classes)}) if lut is None else lut
        self.size = size
        self._classes = {}

    def __len__(self):
        return len(self.ids)

    def load_label(self, i) -> np.ndarray:
        Image = _pil()
        with Image.open(self.label_files[i]) as im:
            if self.size is not None:
                im = im.resize(self.size[::-1], Image.NEAREST)
            return self.lut[np.asarray(im, dtype=np.uint8)]

    def __getitem__(self, i):
        Image = _pil()
        with Image.open(self.image_files[i]) as im:
            im = im.convert("RGB")
            if self.size is not None:
                im = im.resize(self.size[::-1], Image.BILINEAR)
            img = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return img.contiguous(), torch.from_numpy(self.load_label(i))

    def classes_of(self, i) -> set[int]:
        """Classes in image i (index), cached; used by the partial-dataset protocol."""
        if i not in self._classes:
            self._classes[i] = image_classes(self.load_label(i), self.num_classes)
        return self._classes[i]


def _read_list(root: Path, names):
    for d in (root / "ImageSets" / "Segmentation", root):
        for n in names:
            if (d / n).is_file():
                return [ln.split()[0] for ln in (d / n).read_text().splitlines() if ln.strip()]
    raise FileNotFoundError(f"none of {names} found in {root}/ImageSets/Segmentation or {root}")


def pascal_voc(root, split: str = "train", size=None) -> FolderDataset:
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    ids = sorted(set(_read_list(root, ["train_aug.txt", "train.txt"] if split == "train"
                                else ["val.txt"])))
    lab_dir = root / "SegmentationClassAug"
    if not lab_dir.is_dir():
        lab_dir = root / "SegmentationClass"
    return FolderDataset([root / "JPEGImages" / f"{i}.jpg" for i in ids],
                         [lab_dir / f"{i}.png" for i in ids], ids, VOC_CLASSES, size=size)


def cityscapes(root, split: str = "train", size=None) -> FolderDataset:
    root = Path(root)
    img_dir = root / "leftImg8bit" / split
    files = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    ids = [f.name[: -len("_leftImg8bit.png")] for f in files]
    labels = [root / "gtFine" / split / f.parent.name / f"{i}_gtFine_labelIds.png"
              for f, i in zip(files, ids)]
    return FolderDataset(files, labels, ids, CITYSCAPES_CLASSES,
                         lut=_lut(CITYSCAPES_LABEL_TO_TRAIN), size=size)


def sun_rgbd(root, split: str = "train", size=None) -> FolderDataset:
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def listing(part):
        d = root / "image" / part
        return {f.stem: f for f in sorted(d.glob("*")) if f.suffix.lower() in (".jpg", ".png")}

    train, test = listing("train"), listing("test")
    idx_file = root / "test_idx.txt"
    held = ({ln.strip() for ln in idx_file.read_text().splitlines() if ln.strip()}
            if idx_file.is_file() else set(test))
    if split == "val":
        pairs = [(i, f, "test") for i, f in test.items() if i in held]
    else:
        pairs = [(i, f, "train") for i, f in train.items()]
        pairs += [(i, f, "test") for i, f in test.items() if i not in held]
    pairs.sort(key=lambda p: (p[2], p[0]))
    ids = [f"{part}/{i}" for i, _, part in pairs]
    labels = [root / "label" / part / f"{i}.png" for i, _, part in pairs]
    lut = _lut({k: k - 1 for k in range(1, SUN_NUM_CLASSES + 1)})
    return FolderDataset([f for _, f, _ in pairs], labels, ids, SUN_CLASSES, lut=lut, size=size)


LOADERS = {"voc": pascal_voc, "cityscapes": cityscapes, "sun": sun_rgbd}


def load_folder(spec: str, split: str, size=None) -> FolderDataset:
    """``"voc:/data/VOC2012"``, ``"cityscapes:/data/cityscapes"`` or ``"sun:/data/sun"``."""
    name, _, root = spec.partition(":")
    if name not in LOADERS or not root:
        raise ValueError(f"dataset must be 'scenes' or one of {tuple(f'{k}:ROOT' for k in LOADERS)}"
                         f", got {spec!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} is not a directory")
    return LOADERS[name](root, split, size=size)
