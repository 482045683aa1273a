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


# What a model may return, and where the figures find each part (documented in the README):
#   an object with attributes (pixcon's SegOutput): .logits, .rep (None: none), .features
#   a dict: "logits" (or torchvision's "out"), "rep" (or "embedding"), "features"
#   a tuple or list: (logits, rep, ...), the first element the logits
#   a tensor: the logits
LOGIT_KEYS, REP_KEYS, FEATURE_KEYS = ("logits", "out"), ("rep", "embedding"), ("features",)


def _part(out, keys, position):
    if torch.is_tensor(out):
        return out if position == 0 else None
    if isinstance(out, dict):
        return next((out[k] for k in keys if out.get(k) is not None), None)
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return out[position] if position is not None and len(out) > position else None
    return next((getattr(out, k) for k in keys if getattr(out, k, None) is not None), None)


def logits_of(out):
    """The (B, C, h, w) logits of a model's output: a tensor, a dict ("logits" or "out"), a
    tuple or list (its first element) or an object with ``.logits``."""
    x = _part(out, LOGIT_KEYS, 0)
    if not torch.is_tensor(x):
        raise TypeError(f"pixcon.viz: cannot find logits in the model's output (a "
                        f"{type(out).__name__}): return a tensor, a dict with 'logits' or "
                        f"'out', a tuple whose first element is the logits, or an object "
                        f"with .logits")
    return x


def representation(out):
    """The embedding a figure reads: the representation head's output when the model returns
    one (``.rep``, dict "rep"/"embedding", a tuple's second element), its logits otherwise (a
    model trained without ReCo)."""
    rep = _part(out, REP_KEYS, 1)
    return rep if torch.is_tensor(rep) else logits_of(out)


def features_of(out):
    """The list of backbone stages a model's output carries (``.features`` or dict
    "features"), for the error-distance figure."""
    f = _part(out, FEATURE_KEYS, None)
    if f is None:
        raise TypeError("pixcon.viz: the error figure needs the backbone stages: return them "
                        "as .features or a dict's 'features' (a list of (B, C_i, h_i, w_i))")
    return list(f)


@torch.no_grad()
def predict(model, images, device="cpu", batch: int = 50):
    """(N, H, W) int64 predictions of ``model`` (eval mode, then restored) on (N, 3, H, W)
    images in [0, 1]: logits upsampled bilinearly (align_corners=True) to the image size,
    argmax, as ``pixcon.train.evaluate`` scores them."""
    out = []
    with evaluating(model):
        for k in range(0, len(images), batch):
            x = images[k:k + batch].to(device)
            logits = logits_of(model(normalize_images(x)))
            out.append(upsample(logits, x.shape[-2:]).argmax(1).cpu())
    return torch.cat(out)


def labels_at(labels, size, num_classes: int):
    """(B, H, W) labels nearest-downsampled to ``size`` (ATen's nearest mapping, as the losses
    see them), values outside 0..num_classes-1 set to -1."""
    y = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return torch.where((y >= 0) & (y < num_classes), y, -1)
