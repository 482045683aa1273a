"""What the examples share: a plain segmentation network that returns only logits (as a
segmentation_models_pytorch, mmseg or torchvision model does), the embedded scenes, and the
command line. Nothing here is pixcon: the examples show the lines that are."""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixcon.workbench.scenes import SceneDataset


def block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinySegNet(nn.Module):
    """Encoder (stride 4) -> decoder -> classifier, upsampled logits out; nothing else. Its
    submodules: encoder.0 .. encoder.3, decoder, classifier."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(block(3, width, 2), block(width, width),
                                     block(width, 2 * width, 2), block(2 * width, 2 * width))
        self.decoder = block(2 * width, width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        logits = self.classifier(self.decoder(self.encoder(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def args(description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    return a


def batches(a, size: int = 64):
    """``a.steps`` batches of (images (B, 3, size, size), labels (B, size, size), 255 =
    ignore) from the embedded scenes; the number of classes is SceneDataset.num_classes."""
    ds = SceneDataset("train", seed=a.seed, size=size, length=a.steps * a.batch_size)
    for i in range(a.steps):
        sl = slice(i * a.batch_size, (i + 1) * a.batch_size)
        yield ds.images[sl].to(a.device), ds.labels[sl].to(a.device)


NUM_CLASSES = SceneDataset.num_classes
IGNORE = SceneDataset.ignore_index


def report(step, **losses):
    print(f"step {step:3d}  " + "  ".join(f"{k} {float(v):.4f}" for k, v in losses.items()),
          flush=True)
