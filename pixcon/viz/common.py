"""What the figures share: matplotlib on demand, a model's predictions and embeddings, labels
at an embedding's resolution."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..workbench.data import normalize_images, upsample


def plt():
    """matplotlib.pyplot on the Agg backend; a clear ImportError naming the extra without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError as e:
        raise ImportError("pixcon.viz draws with matplotlib: pip install 'pixcon[viz]' "
                          "(./dev setup installs it)") from e
    return pyplot


@contextlib.contextmanager
def evaluating(*modules):
    """The modules (None skipped) in eval mode inside the block, their own mode restored after."""
    mods = [m for m in modules if m is not None]
    was = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(mods, was):
            m.train(w)


def representation(out):
    """The embedding a figure reads from a ``SegOutput``: the representation head when the model
    has one, its logits otherwise (a model trained without ReCo)."""
    return out.rep if out.rep is not None else out.logits


@torch.no_grad()
def predict(model, images, device="cpu", batch: int = 50):
    """(N, H, W) int64 predictions of ``model`` (eval mode, then restored) on (N, 3, H, W)
    images in [0, 1]: logits upsampled bilinearly (align_corners=True) to the image size,
    argmax, as ``pixcon.train.evaluate`` scores them."""
    out = []
    with evaluating(model):
        for k in range(0, len(images), batch):
            x = images[k:k + batch].to(device)
            out.append(upsample(model(normalize_images(x)).logits, x.shape[-2:]).argmax(1).cpu())
    return torch.cat(out)


def labels_at(labels, size, num_classes: int):
    """(B, H, W) labels nearest-downsampled to ``size`` (ATen's nearest mapping, as the losses
    see them), values outside 0..num_classes-1 set to -1."""
    y = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return torch.where((y >= 0) & (y < num_classes), y, -1)
