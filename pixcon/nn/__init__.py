"""nn.Module wrappers of pixcon.ops."""
from __future__ import annotations

import torch

import torch.nn.functional as F

from ..ops import _common as chk
from ..ops import pixel_anchor_loss, pixel_contrast_loss, reco_loss


class ReCoLoss(torch.nn.Module):
    """Module form of :func:`pixcon.ops.reco_loss`; keyword arguments are stored and passed on.

    >>> crit = ReCoLoss(num_queries=256, num_negatives=512)
    >>> loss = crit(rep, labels, probs, mask=conf_mask)
    """

    def __init__(self, *, ignore_index=255, strong_threshold=0.97, temperature=0.5,
                 num_queries=256, num_negatives=512, backend="auto", **kwargs):
        super().__init__()
        op = "ReCoLoss"                 # what reco_loss would reject, rejected at construction
        chk.check_positive_int(op, "num_queries", num_queries)
        chk.check_positive_int(op, "num_negatives", num_negatives)
        chk.check_temperature(op, "temperature", temperature)
        chk.check_positive_float(op, "strong_threshold", strong_threshold)
        self.kwargs = dict(ignore_index=ignore_index, strong_threshold=strong_threshold,
                           temperature=temperature, num_queries=num_queries,
                           num_negatives=num_negatives, backend=backend, **kwargs)

    def forward(self, emb, labels, probs, mask=None, seed=None):
        return reco_loss(emb, labels, probs, mask=mask, seed=seed, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


__all__ = ["ReCoLoss"]

from .u2pl import U2PLLoss, UnreliableBank  # noqa: E402

__all__ += ["UnreliableBank", "U2PLLoss"]


class ContextrastLoss(torch.nn.Module):
    """Contextrast's contextual contrastive loss with its per-layer projection heads.

    One head per encoder stage (1x1 conv C->C, BN, ReLU, 1x1 conv C->dim; with HRNetV2-W48's
    48/96/192/384 channels this adds the 0.38 M parameters Contextrast++ reports), then
    :func:`pixcon.ops.pixel_anchor_loss` on the projected embeddings. Training only.

    >>> crit = ContextrastLoss(in_channels=(48, 96, 192, 384))
    >>> loss = ce + 0.1 * crit(features, labels, logits)
    """

    def __init__(self, in_channels=(48, 96, 192, 384), dim=256, **kwargs):
        super().__init__()
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(c, c, 1), torch.nn.BatchNorm2d(c),
                                torch.nn.ReLU(inplace=True), torch.nn.Conv2d(c, dim, 1))
            for c in in_channels)
        kwargs.setdefault("layer_weights", (0.1, 0.3, 0.7, 1.0)[-len(in_channels):])
        self.kwargs = kwargs

    def forward(self, features, labels, pred, **overrides):
        """``overrides`` replace stored keyword arguments for this call (e.g. backend=...)."""
        if len(features) != len(self.heads):
            raise ValueError(f"ContextrastLoss: {len(features)} feature maps for "
                             f"{len(self.heads)} heads")
        embs = [head(f) for head, f in zip(self.heads, features)]
        return pixel_anchor_loss(embs, labels, pred, **{**self.kwargs, **overrides})


__all__ += ["ContextrastLoss"]

from .memory import PixelMemoryBank  # noqa: E402

__all__ += ["PixelMemoryBank"]


class PixelContrastLoss(torch.nn.Module):
    """ContrastiveSeg's pixel contrast with its projection head and, optionally, its memory
    bank: the official ``convmlp`` head (1x1 conv C->C, BN, ReLU, 1x1 conv C->dim, then unit
    length per pixel) on one feature map, :func:`pixcon.ops.pixel_contrast_loss` on the
    projected embeddings, and, with ``memory_size``, a :class:`PixelMemoryBank` that the
    anchors are contrasted with (the official memory variant) and that each call fills with
    the batch's detached embeddings afterwards. The bank is a submodule: ``state_dict`` saves
    it. Training only.

    >>> crit = PixelContrastLoss(in_channels=512, num_classes=19, memory_size=5000)
    >>> loss = ce + 0.1 * crit(features, labels, logits)
    """

    def __init__(self, in_channels: int, num_classes: int, dim: int = 256, *,
                 memory_size: int | None = None, pixel_update_freq: int = 10,
                 ignore_index: int = 255, **kwargs):
        super().__init__()
        c = in_channels
        self.head = torch.nn.Sequential(torch.nn.Conv2d(c, c, 1), torch.nn.BatchNorm2d(c),
                                        torch.nn.ReLU(inplace=True), torch.nn.Conv2d(c, dim, 1))
        self.bank = None if memory_size is None else PixelMemoryBank(
            num_classes, dim, memory_size, min(pixel_update_freq, memory_size),
            ignore_index=ignore_index)
        self.kwargs = dict(ignore_index=ignore_index, **kwargs)

    def forward(self, features, labels, pred, seed=None, **overrides):
        """features (B, C, h, w) (or a list: its last map); labels (B, H, W); pred: the
        segmentation logits (B, K, h', w') or their argmax. ``overrides`` replace stored
        keyword arguments for this call (e.g. backend=...)."""
        if isinstance(features, (list, tuple)):
            features = features[-1]
        emb = F.normalize(self.head(features), dim=1)
        if torch.is_tensor(pred) and pred.dim() == 4:
            pred = pred.detach().argmax(dim=1)
        kw = {**self.kwargs, **overrides}
        loss = pixel_contrast_loss(emb, labels, pred, memory=self.bank, seed=seed, **kw)
        if self.bank is not None and self.training:
            self.bank.update(emb.detach(), labels, seed=seed)
        return loss


__all__ += ["PixelContrastLoss"]
from .cac import (DirectionalContrastLoss, ImageLevelLoss, NegativeBank,  # noqa: E402
                  image_level_loss)

__all__ += ["DirectionalContrastLoss", "NegativeBank", "ImageLevelLoss", "image_level_loss"]

from .tap import FeatureTap  # noqa: E402

__all__ += ["FeatureTap"]
