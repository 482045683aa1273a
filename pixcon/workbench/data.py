"""A run's data: the dataset a configuration names, batches of one image size, the ImageNet
normalisation, bilinear upsampling of logits. Read by the trainer and by the pictures."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Config


# --- data ------------------------------------------------------------------------------------
def load_dataset(cfg: Config, split: str):
    if cfg.dataset == "scenes":
        from .scenes import SceneDataset
        length = cfg.train_length if split == "train" else cfg.val_length
        # fixed splits: the scenes do not depend on the run's seed
        return SceneDataset(split, seed=0, size=cfg.scene_size, length=length)
    from .folders import load_folder
    return load_folder(cfg.dataset, split)


def same_size_batches(ds, batch: int):
    """(images (b, 3, H, W), labels (b, H, W)) over ``ds`` in order, each batch at most
    ``batch`` consecutive images of one size (folder datasets mix sizes)."""
    items = []
    for i in range(len(ds)):
        it = ds[i]
        if items and (len(items) == batch or it[0].shape != items[0][0].shape):
            yield torch.stack([t[0] for t in items]), torch.stack([t[1] for t in items])
            items = []
        items.append(it)
    if items:
        yield torch.stack([t[0] for t in items]), torch.stack([t[1] for t in items])


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> ImageNet mean/std normalised (official, after augmentation)."""
    mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = x.new_tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std
