"""DeepLabv3+ with a representation head (ReCo's network, specs/reco.md §2.1).

backbone -> (low-level features at stride 4, high-level features) -> ASPP on the high level ->
decoder: project low level to 48 channels, upsample ASPP (bilinear, align_corners=True) and
concatenate -> classifier head (3x3 conv, BN, ReLU, 1x1 -> C) and representation head (same
structure, 1x1 -> rep_dim), both at stride 4. ``forward`` returns
``SegOutput(logits, rep, features)``; ``features`` are the backbone stages (shallow to deep) for
multi-level losses such as Contextrast.

Backbones: ``"small"`` (default: a four-stage residual CNN, output stride 8, ~1.2 M parameters,
trains on CPU in minutes) or ``"resnet50"`` / ``"resnet101"`` from torchvision (output stride 16
as the official code: layer4's stride removed and dilated), only when torchvision is installed;
never required.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


FEATURE_STRIDE = {"small": 8, "resnet50": 16, "resnet101": 16}   # the deepest backbone stage

class SegOutput(NamedTuple):
    logits: torch.Tensor      # (B, C, H/4, W/4)
    rep: torch.Tensor         # (B, rep_dim, H/4, W/4)
    features: list            # backbone stages, shallow to deep


def conv_bn(cin, cout, k=3, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2),
                                   dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """Two 3x3 convs with a (projected when needed) shortcut."""

    def __init__(self, cin, cout, stride=1, dilation=1):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cout, 3, stride, dilation),
            nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if cin == cout and stride == 1 else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)))

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class Backbone(nn.Module):
    """stem, then stages; forward returns every stage's output (shallow to deep). Subclasses set
    ``channels`` (per stage), ``low_index`` (the stride-4 stage the decoder uses) and ``rates``
    (ASPP dilations for their output stride)."""

    stem: nn.Module = nn.Identity()

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for s in self.stages:
            x = s(x)
            feats.append(x)
        return feats


class SmallBackbone(Backbone):
    """Stages at strides 2, 4, 8, 8 (the last dilated): widths (24, 32, 64, 128)."""

    def __init__(self, widths=(24, 32, 64, 128)):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.stages = nn.ModuleList([
            conv_bn(3, w1, 3, 2),
            ResBlock(w1, w2, 2),
            nn.Sequential(ResBlock(w2, w3, 2), ResBlock(w3, w3)),
            nn.Sequential(ResBlock(w3, w4, 1, 2), ResBlock(w4, w4, 1, 2)),
        ])
        self.channels = list(widths)
        self.low_index = 1            # stride-4 stage used by the decoder
        self.rates = (2, 4, 6)        # ASPP rates for output stride 8 on small images


class TorchvisionResNet(Backbone):
    """torchvision ResNet at output stride 16 (layer4 as in the official ``_nostride_dilate``)."""

    def __init__(self, name: str, pretrained: bool = False):
        super().__init__()
        try:
            import torchvision
        except ImportError as e:
            raise ImportError(f"backbone {name!r} needs torchvision (pip install torchvision); "
                              "the default backbone 'small' does not") from e
        net = getattr(torchvision.models, name)(weights="DEFAULT" if pretrained else None)
        for m in net.layer4.modules():
            if isinstance(m, nn.Conv2d):
                if m.stride == (2, 2):
                    m.stride = (1, 1)
                    if m.kernel_size == (3, 3):
                        m.dilation, m.padding = (1, 1), (1, 1)
                elif m.kernel_size == (3, 3):
                    m.dilation, m.padding = (2, 2), (2, 2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.channels = [256, 512, 1024, 2048]
        self.low_index = 0
        self.rates = (6, 12, 18)


class ASPP(nn.Module):
    """1x1 branch, three atrous 3x3 branches and image pooling, concatenated and projected."""

    def __init__(self, cin, cout, rates):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(cin, cout, 1)] +
                                      [conv_bn(cin, cout, 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.project = conv_bn(cout * (len(rates) + 2), cout, 1)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        outs.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False))
        return self.project(torch.cat(outs, dim=1))


def head(cin, mid, cout):
    return nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid),
                         nn.ReLU(inplace=True), nn.Conv2d(mid, cout, 1))


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ with classifier and representation heads at stride 4.

    >>> model = DeepLabV3Plus(num_classes=9)                  # small backbone, rep_dim 64
    >>> out = model(images)                                  # images (B, 3, H, W)
    >>> out.logits.shape, out.rep.shape                      # (B, 9, H/4, W/4), (B, 64, H/4, W/4)
    """

    def __init__(self, num_classes: int, *, backbone: str = "small", rep_dim: int | None = None,
                 pretrained: bool = False, representation: bool = True):
        super().__init__()
        if backbone == "small":
            self.backbone = SmallBackbone()
            aspp_dim, low_dim, head_dim = 96, 24, 64
            rep_dim = 64 if rep_dim is None else rep_dim
        elif backbone in ("resnet50", "resnet101"):
            self.backbone = TorchvisionResNet(backbone, pretrained)
            aspp_dim, low_dim, head_dim = 256, 48, 256
            rep_dim = 256 if rep_dim is None else rep_dim
        else:
            raise ValueError(f"backbone must be 'small', 'resnet50' or 'resnet101', got {backbone!r}")
        ch = self.backbone.channels
        self.aspp = ASPP(ch[-1], aspp_dim, self.backbone.rates)
        self.low = conv_bn(ch[self.backbone.low_index], low_dim, 1)
        self.classifier = head(aspp_dim + low_dim, head_dim, num_classes)
        # without it (losses that do not read rep) DDP finds no unused parameter
        self.representation = head(aspp_dim + low_dim, head_dim, rep_dim) if representation \
            else None
        self.num_classes, self.rep_dim = num_classes, rep_dim

    def forward(self, x) -> SegOutput:
        feats = self.backbone(x)
        low = self.low(feats[self.backbone.low_index])
        high = F.interpolate(self.aspp(feats[-1]), size=low.shape[-2:], mode="bilinear",
                             align_corners=True)
        z = torch.cat([high, low], dim=1)
        rep = self.representation(z) if self.representation is not None else None
        return SegOutput(self.classifier(z), rep, feats)
