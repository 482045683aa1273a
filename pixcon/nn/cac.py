"""CAC's modules (specs/cac.md §1, §4, §8): the negative bank and the projector + loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..ops import _common as chk
from ..ops import directional_contrast_loss, overlap_rows
from ..core.rng import draw_seed
from ..ops import philox

STREAM_NEGATIVE_BANK = 5     # Philox stream of the bank's subsample


def _row(*flags):
    proj, context, cl, dirm, ns, pf = map(bool, flags)
    return dict(projector=proj, context=context, alignment="contrastive" if cl else "l2",
                directional=dirm, negative_sampling=ns, positive_filtering=pf)


# The paper's ablation (its Table 3): which components each row turns on -- the non-linear
# projector, context-aware consistency (two crops), the contrastive loss (else experiment I's
# l2 alignment), the directional mask, negative sampling, positive filtering. "VIII" is the
# full method. ``projector`` goes to DirectionalContrastLoss, ``context`` to
# pixcon.data.overlapping_crops, the rest to directional_contrast_loss (``loss_switches``).
ABLATION = {"I": _row(1, 1, 0, 0, 0, 0), "II": _row(1, 1, 1, 0, 0, 0),
            "III": _row(1, 1, 1, 1, 0, 0), "IV": _row(1, 1, 1, 1, 1, 0),
            "V": _row(1, 1, 1, 0, 1, 1), "VI": _row(1, 0, 1, 1, 1, 1),
            "VII": _row(0, 1, 1, 1, 1, 1), "VIII": _row(1, 1, 1, 1, 1, 1)}


def loss_switches(row: str) -> dict:
    """The directional_contrast_loss keywords of ablation row ``row`` ("I" ... "VIII")."""
    if row not in ABLATION:
        raise ValueError(f"CAC ablation row must be one of {tuple(ABLATION)}, got {row!r}")
    return {k: v for k, v in ABLATION[row].items() if k not in ("projector", "context")}


class NegativeBank(torch.nn.Module):
    """Features and pseudo-labels of both views of the last ``step_save`` + 1 steps (the
    official bank keeps the current step and ``step_save`` before it), oldest first.

    ``update`` takes both views' full projected maps and pseudo-labels, keeps ``selected_num``
    pixels per view (uniform without replacement; None = all, which is what the shipped configs
    amount to), detaches them and, when torch.distributed is initialised, all-gathers them so
    every rank holds the same bank, rank 0's rows first (``cross_rank=True``, the default: the
    official code gathers too, and requires a process group; this one works without;
    ``cross_rank=False`` keeps each rank's own rows; ``group``: the process group, default the
    world). Everything is checked before the bank changes, on every rank together: bad input on
    one rank raises on all of them instead of leaving them waiting in the gather. ``state_dict()`` holds the entries;
    ``.to()`` moves them.

    >>> bank = NegativeBank(step_save=1)
    >>> loss = directional_contrast_loss(f1, f2, lg1, lg2, *bank.negatives(), ...)  # after update
    """

    def __init__(self, step_save: int = 1, selected_num: int | None = None, *,
                 cross_rank: bool = True, group=None):
        super().__init__()
        self.cross_rank, self.group = bool(cross_rank), group
        if isinstance(step_save, bool) or not isinstance(step_save, int) or step_save < 0:
            raise ValueError(f"NegativeBank: step_save must be an int >= 0, got {step_save!r}")
        if selected_num is not None:
            chk.check_positive_int("NegativeBank", "selected_num", selected_num)
        self.step_save, self.selected_num = step_save, selected_num
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self):
        return len(self.entries)

    def negatives(self):
        """(features (N, D), pseudo-labels (N,)), oldest step first; raises when empty."""
        if not self.entries:
            raise RuntimeError("NegativeBank is empty: call update() first")
        return (torch.cat([f for f, _ in self.entries]), torch.cat([y for _, y in self.entries]))

    def _rows(self, name, feat, labels):
        chk.check_tensor("NegativeBank.update", name, feat, ndim=(2, 4), dtypes=chk.FLOAT_DTYPES,
                         kind="(B, D, h, w) or (P, D)")
        rows = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1]) if feat.dim() == 4 else feat
        lab_name = name.replace("feat", "labels")
        chk.check_tensor("NegativeBank.update", lab_name, labels, dtypes=chk.INT_DTYPES,
                         device=feat.device, like=name)
        if labels.numel() != rows.shape[0]:
            raise ValueError(f"NegativeBank.update: {lab_name} must have one pseudo-label per "
                             f"pixel of {name} ({rows.shape[0]}), got {labels.numel()}")
        if self.selected_num is not None and self.selected_num > rows.shape[0]:
            raise ValueError(f"NegativeBank.update: selected_num = {self.selected_num} is more "
                             f"than the {rows.shape[0]} pixels of {name}")
        return rows, labels.reshape(-1)

    def _check_update(self, feat1, feat2, labels1, labels2):
        """Validated rows; the shapes every rank must share."""
        r1, y1 = self._rows("feat1", feat1, labels1)
        r2, y2 = self._rows("feat2", feat2, labels2)
        if r1.shape[1] != r2.shape[1] or r1.device != r2.device:
            raise ValueError("NegativeBank.update: feat1 and feat2 must have the same D and device")
        if self.entries and self.entries[0][0].shape[1] != r1.shape[1]:
            raise ValueError(f"NegativeBank.update: features have D = {r1.shape[1]}, the bank "
                             f"{self.entries[0][0].shape[1]}")
        return (r1, y1), (r2, y2)

    @torch.no_grad()
    def update(self, feat1, feat2, labels1, labels2, *, seed: int | None = None):
        """Add one step: feat1/feat2 (B, D, h, w) full projected maps (or (P, D) rows) of the
        two views, labels1/labels2 their pseudo-labels (B, h, w) (or (P,)). Under
        torch.distributed every rank must call it with the same shapes; bad input on one rank
        raises on every rank (pixcon.distributed.agree) before anything is gathered."""
        views = []

        def check():
            views[:] = self._check_update(feat1, feat2, labels1, labels2)
            return (*views[0][0].shape, *views[1][0].shape)

        if self.cross_rank:
            dist.checked("NegativeBank.update", check, group=self.group)
        else:
            check()
        parts = []
        if self.selected_num is not None:
            seed = draw_seed(seed, "NegativeBank.update")
        for v, (r, y) in enumerate(views):
            if self.selected_num is not None:          # smallest Philox keys: without replacement
                counter = torch.arange(r.shape[0], device=r.device) + v * r.shape[0]
                key = philox(counter, seed, STREAM_NEGATIVE_BANK)[:, 0]
                pick = torch.sort(key, stable=True).indices[:self.selected_num]
                r, y = r[pick], y[pick]
            parts.append((r.detach(), y.to(torch.int64)))
        feats = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        if self.cross_rank:
            feats, labels = dist.gather_many(feats, labels, group=self.group,
                                             op="NegativeBank.update")
        self.entries.append((feats, labels))
        del self.entries[:-(self.step_save + 1)]

    def get_extra_state(self):
        return {"step_save": self.step_save, "selected_num": self.selected_num,
                "entries": [(f.clone(), y.clone()) for f, y in self.entries]}

    def set_extra_state(self, state):
        self.step_save, self.selected_num = state["step_save"], state["selected_num"]
        self.entries = [(f, y) for f, y in state["entries"]]

    def _apply(self, fn, *args, **kwargs):
        self.entries = [(fn(f), fn(y)) for f, y in self.entries]
        return super()._apply(fn, *args, **kwargs)


class DirectionalContrastLoss(torch.nn.Module):
    """CAC's projector (conv1x1 C->C, ReLU, conv1x1 C->dim, no BN, then L2 normalisation) and
    its directional loss, weighted by ``weight`` (0.1: the official ``weight_unsup``; the
    ``unsupervised_w = 30`` in the official configs is a dead key that no code reads).
    ``projector=False`` is the ablation without the non-linear projector (the paper's Table 3,
    row VII): the loss reads the L2-normalised encoder features themselves (``dim`` unused).
    Other keyword arguments go to :func:`pixcon.ops.directional_contrast_loss` (its ablation
    switches among them).

    >>> crit, bank = DirectionalContrastLoss(in_channels=256), NegativeBank(step_save=1)
    >>> loss = ce + crit(enc1, enc2, logits1, logits2, crops.box1, crops.box2, flip1, flip2, bank)
    """

    def __init__(self, in_channels: int = 256, dim: int = 128, *, weight: float = 0.1,
                 stride: int = 8, projector: bool = True, **loss_switches):
        super().__init__()
        self.projector = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, in_channels, 1), torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(in_channels, dim, 1)) if projector else None
        self.weight, self.stride, self.kwargs = weight, stride, loss_switches

    def project(self, enc):
        return F.normalize(enc if self.projector is None else self.projector(enc), dim=1)

    def forward(self, enc1, enc2, logits1, logits2, boxes1, boxes2, flips1, flips2, bank,
                update_bank=True, seed=None):
        """enc_i (B, C, h, w) encoder features of the two crops at ``stride``, logits_i (B, K,
        h, w) the classifier on them; the bank is updated with both full projected maps first
        (the official order: the current step's features are negatives too), then the loss on
        the overlap rows is returned times ``weight``."""
        phi1, phi2 = self.project(enc1), self.project(enc2)
        if update_bank:
            bank.update(phi1, phi2, logits1.argmax(1), logits2.argmax(1), seed=seed)
        (f1, g1), (f2, g2) = overlap_rows([phi1, logits1], [phi2, logits2], boxes1, boxes2,
                                          flips1, flips2, stride=self.stride)
        negatives, labels = bank.negatives()
        return self.weight * directional_contrast_loss(f1, f2, g1, g2, negatives, labels,
                                                       **self.kwargs)


class ImageLevelLoss(torch.nn.Module):
    """CAC's extension with image-level labels (its eqs. 10-11): an extra classifier C_w on the
    unlabelled branch's encoder features (global average pooling, then a linear layer to C
    image-level logits) trained with the multi-label loss of both views,

        L_w = 1/2 (CE(C_w(f_u1), y) + CE(C_w(f_u2), y)),

    CE the multi-label soft-margin loss (binary cross-entropy with logits, averaged over
    classes and images). The total of eq. 10 is L_ce + lambda L_dc + lambda_w L_w; the paper
    gives no value for lambda_w, ``weight`` (1.0, as the supervised CE) is ours.

    >>> weak = ImageLevelLoss(in_channels=256, num_classes=21)
    >>> loss = ce + cac + weak(enc1, enc2, image_labels(labels_u, 21))
    """

    def __init__(self, in_channels: int, num_classes: int, *, weight: float = 1.0):
        super().__init__()
        self.classifier = torch.nn.Linear(in_channels, num_classes)
        self.weight = weight

    def logits(self, enc):
        """(B, C) image-level logits of (B, in_channels, h, w) features."""
        return self.classifier(enc.mean(dim=(2, 3)))

    def forward(self, enc1, enc2, targets):
        """``weight`` x L_w for the two views' features and (B, C) 0/1 image-level labels."""
        return self.weight * image_level_loss(self.logits(enc1), self.logits(enc2), targets)


def multilabel_loss(logits, targets):
    """Mean over images and classes of -[y log s(x) + (1 - y) log(1 - s(x))]."""
    y = targets.to(logits.dtype)
    return (y * F.softplus(-logits) + (1 - y) * F.softplus(logits)).mean()


def image_level_loss(logits1, logits2, targets):
    """Eq. 11: the mean of the two views' multi-label losses against the same labels."""
    chk.check_tensor("image_level_loss", "logits1", logits1, ndim=2, dtypes=chk.FLOAT_DTYPES,
                     kind="(B, C)")
    for name, x in (("logits2", logits2), ("targets", targets)):
        if x.shape != logits1.shape:
            raise ValueError(f"image_level_loss: {name} must have logits1's shape "
                             f"{tuple(logits1.shape)}, got {tuple(x.shape)}")
    return 0.5 * (multilabel_loss(logits1, targets) + multilabel_loss(logits2, targets))
