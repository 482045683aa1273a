"""The CAC method in the trainer (specs/cac.md §1-§4; ``--loss cac``): two overlapping crops of
each unlabelled image, the encoder's deepest features of both through the projector, the
directional loss against a negative bank, and optionally the image-level branch (eqs. 10-11)
with labels derived from the dataset's masks.

What differs from the official pipeline, at this trainer's scale: the unlabelled image is
rescaled so that its long side is U(1, 2) x the crop (the official range is 0.8-2.0 x a base
larger than the crop), bilinearly; the crops get independent colour jitter and blur but no flip;
the pseudo-labels come from the classifier's stride-4 logits average-pooled to the feature grid
(the official code runs the classifier on pooled features); the unlabelled branch starts at
step 0 (no warm-up epochs). Mean Teacher and ClassMix are not used (CAC has neither).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import image_labels, overlapping_crops
from ..nn import DirectionalContrastLoss, ImageLevelLoss
from ..nn.cac import ABLATION, loss_switches
from ..workbench.data import normalize_images
from ..workbench.model import FEATURE_STRIDE
from . import semisup as ss



class CACBranch(torch.nn.Module):
    """The unlabelled branch's trainable parts: the projector + directional loss (weight 1; the
    trainer applies ``loss_weight``) and, with ``image_level``, the image-level classifier."""

    def __init__(self, in_channels: int, dim: int, num_classes: int, *, ablation: str = "VIII",
                 image_level: bool = False, image_level_weight: float = 1.0, stride: int = 8,
                 backend: str = "auto"):
        super().__init__()
        self.contrast = DirectionalContrastLoss(
            in_channels, dim, weight=1.0, stride=stride, projector=ABLATION[ablation]["projector"],
            backend=backend, **loss_switches(ablation))
        self.weak = ImageLevelLoss(in_channels, num_classes, weight=image_level_weight) \
            if image_level else None

    def forward(self, enc1, enc2, logits1, logits2, boxes1, boxes2, bank, targets, seed):
        parts = {"contrast": self.contrast(enc1, enc2, logits1, logits2, boxes1, boxes2, None,
                                           None, bank, seed=seed)}
        if self.weak is not None:
            parts["weak"] = self.weak(enc1, enc2, targets)
        return parts


def cac_views(images, *, crop: int, stride: int, context: bool, generator: torch.Generator):
    """Two overlapping crop x crop views of each (3, H, W) image in [0, 1]: rescaled so that the
    long side is U(1, 2) x crop, padded bottom/right by replication when smaller, cut at
    ``overlapping_crops``' corners, each view photometrically augmented on its own. Returns
    (view1 (B, 3, crop, crop), view2, boxes1 (B, 4), boxes2 (B, 4))."""
    v1, v2, b1, b2 = [], [], [], []
    for im in images:
        H, W = im.shape[-2:]
        s = ss.uniform(generator, 1.0, 2.0) * crop / max(H, W)
        size = (max(int(H * s), 1), max(int(W * s), 1))
        x = F.interpolate(im[None], size=size, mode="bilinear", align_corners=False)
        ph, pw = max(crop - size[0], 0), max(crop - size[1], 0)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        seed = int(torch.randint(2**31, (), generator=generator))
        pair = overlapping_crops(size[0], size[1], crop, stride=stride, seed=seed,
                                 context=context)
        for (y, xo), out in ((pair.origin1, v1), (pair.origin2, v2)):
            out.append(x[..., y:y + crop, xo:xo + crop])
        b1.append(pair.box1)
        b2.append(pair.box2)
    views = []
    for v in (v1, v2):
        x = torch.cat(v)
        x, _, _ = ss.photometric(x, torch.zeros(x.shape[0], 1, 1, dtype=torch.int64),
                                 generator=generator, flip_p=0.0)
        views.append(x)
    return views[0], views[1], torch.tensor(b1), torch.tensor(b2)


def cac_step(trainer, generator: torch.Generator, seed: int) -> dict:
    """The unlabelled branch's loss terms for one step of ``trainer`` (a pixcon.train Trainer
    with loss "cac"): {"contrast": L_dc, "weak": L_w (with image_level)}."""
    cfg, dev, ds = trainer.cfg, trainer.device, trainer.train_ds
    iu = [trainer.splits.unlabelled[int(k)] for k in
          torch.randint(len(trainer.splits.unlabelled), (cfg.batch_size,), generator=generator)]
    items = [ds[i] for i in iu]
    stride = FEATURE_STRIDE[cfg.backbone]
    x1, x2, boxes1, boxes2 = cac_views([it[0] for it in items], crop=cfg.crop, stride=stride,
                                       context=ABLATION[cfg.cac_ablation]["context"],
                                       generator=generator)
    out1 = trainer.net(normalize_images(x1.to(dev)))
    out2 = trainer.net(normalize_images(x2.to(dev)))
    enc1, enc2 = out1.features[-1], out2.features[-1]
    lg1 = F.adaptive_avg_pool2d(out1.logits, enc1.shape[-2:])
    lg2 = F.adaptive_avg_pool2d(out2.logits, enc2.shape[-2:])
    targets = None
    if cfg.image_level:
        targets = torch.cat([image_labels(it[1][None], ds.num_classes,
                                          ignore_index=ds.ignore_index) for it in items]).to(dev)
    return trainer.extra_net(enc1, enc2, lg1, lg2, boxes1, boxes2, trainer.bank, targets, seed)
