"""Semi-supervised machinery of the official ReCo pipeline (specs/reco.md §2.2-2.4): the Mean
Teacher, the augmentations, ClassMix and the eta-weighted unsupervised cross-entropy.

Every random choice takes an explicit ``torch.Generator`` so that a training step is a function
of (seed, step) and a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F



class MeanTeacher:
    """Exponential moving average of the student's ``parameters()`` (official ``EMA``).

    Update t = 0, 1, 2, ... uses decay_t = min(1 - 1/(t + 1), max_decay): a plain copy at t = 0,
    0.5 at t = 1, ``max_decay`` (0.99) from t = 99 on. BatchNorm buffers are **not** averaged, as
    in the official code: the teacher keeps its own running statistics, accumulated by its own
    forwards in train mode (``average_buffers=True`` copies the student's buffers instead).
    """

    def __init__(self, student: torch.nn.Module, max_decay: float = 0.99,
                 average_buffers: bool = False):
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_decay, self.average_buffers, self.step = max_decay, average_buffers, 0

    def decay(self) -> float:
        return min(1.0 - 1.0 / (self.step + 1), self.max_decay)

    @torch.no_grad()
    def update(self, student: torch.nn.Module):
        d = self.decay()
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(d).add_(s.detach(), alpha=1 - d)
        if self.average_buffers:
            for t, s in zip(self.model.buffers(), student.buffers()):
                t.copy_(s)
        self.step += 1

    def state_dict(self):
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.step = state["step"]


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def rescale_crop(image, label, conf=None, *, crop, scale=(1.0, 1.0), ignore_index=255,
                 generator: torch.Generator):
    """Official ``transform`` without colour: per image, resize by s ~ U(scale) (image bilinear,
    label and confidence nearest), pad right/bottom when smaller than ``crop`` (image reflect,
    label ``ignore_index``, confidence 0), then a random crop. image (B, 3, H, W) in [0, 1],
    label (B, H, W), conf (B, H, W) or None; or lists of (3, H_b, W_b) / (H_b, W_b) tensors of
    different sizes. Returns stacked (B, 3, *crop), (B, *crop) int64, (B, *crop) or None."""
    out_i, out_l, out_c = [], [], []
    for b in range(len(image)):
        s = uniform(generator, *scale)
        H, W = image[b].shape[-2:]
        size = (max(int(H * s), 1), max(int(W * s), 1))
        im = F.interpolate(image[b][None], size=size, mode="bilinear", align_corners=False)
        lb = F.interpolate(label[b][None, None].float(), size=size, mode="nearest")
        cf = None if conf is None else F.interpolate(conf[b][None, None], size=size, mode="nearest")
        ph, pw = max(crop[0] - size[0], 0), max(crop[1] - size[1], 0)
        if ph or pw:
            im = F.pad(im, (0, pw, 0, ph), mode="reflect" if ph < size[0] and pw < size[1]
                       else "replicate")
            lb = F.pad(lb, (0, pw, 0, ph), value=float(ignore_index))
            cf = None if cf is None else F.pad(cf, (0, pw, 0, ph), value=0.0)
        y = int(torch.randint(im.shape[-2] - crop[0] + 1, (), generator=generator))
        x = int(torch.randint(im.shape[-1] - crop[1] + 1, (), generator=generator))
        sl = (..., slice(y, y + crop[0]), slice(x, x + crop[1]))
        out_i.append(im[sl])
        out_l.append(lb[sl])
        if cf is not None:
            out_c.append(cf[sl])
    image = torch.cat(out_i)
    label = torch.cat(out_l)[:, 0].to(torch.int64)
    return image, label, (torch.cat(out_c)[:, 0] if conf is not None else None)


def _gaussian_blur(x, sigma):
    r = max(int(math.ceil(3 * sigma)), 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def _rgb_to_gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _hue_rotate(x, h):
    """Rotate hue by h turns in YIQ space (a linear stand-in for PIL's HSV hue shift)."""
    a = 2 * math.pi * h
    c, s = math.cos(a), math.sin(a)
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]])
    rot = x.new_tensor([[1, 0, 0], [0, c, -s], [0, s, c]])
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,bjhw->bihw", m, x)


def photometric(image, label, conf=None, *, generator: torch.Generator, jitter_p=0.8,
                blur_p=0.5, flip_p=0.5):
    """Official ``aug=True`` part, per image: colour jitter with probability 0.8 (brightness,
    contrast, saturation each x U(0.75, 1.25), hue +- 0.25 turns), Gaussian blur with probability
    0.5 (sigma ~ U(0.15, 1.15)), horizontal flip with probability 0.5 (image, label, conf)."""
    out_i, out_l, out_c = [], [], []
    for b in range(image.shape[0]):
        im, lb = image[b:b + 1], label[b:b + 1]
        cf = None if conf is None else conf[b:b + 1]
        if float(torch.rand((), generator=generator)) < jitter_p:
            im = im * uniform(generator, 0.75, 1.25)
            m = im.mean()
            im = (im - m) * uniform(generator, 0.75, 1.25) + m
            gray = _rgb_to_gray(im)
            im = (im - gray) * uniform(generator, 0.75, 1.25) + gray
            im = _hue_rotate(im, uniform(generator, -0.25, 0.25)).clamp(0, 1)
        if float(torch.rand((), generator=generator)) < blur_p:
            im = _gaussian_blur(im, uniform(generator, 0.15, 1.15))
        if float(torch.rand((), generator=generator)) < flip_p:
            im, lb = im.flip(-1), lb.flip(-1)
            cf = None if cf is None else cf.flip(-1)
        out_i.append(im)
        out_l.append(lb)
        if cf is not None:
            out_c.append(cf)
    return torch.cat(out_i), torch.cat(out_l), (torch.cat(out_c) if conf is not None else None)


def classmix(image, label, conf, *, generator: torch.Generator):
    """ClassMix as the official ``generate_unsup_data(mode='classmix')``: for image i, half of its
    (pseudo-)label values, chosen by a random permutation (``ignore`` included when present, as
    in the official code), are pasted over image (i + 1) mod B."""
    B = image.shape[0]
    masks = []
    for i in range(B):
        classes = torch.unique(label[i])
        sel = classes[torch.randperm(len(classes), generator=generator)][: len(classes) // 2]
        masks.append(torch.isin(label[i], sel))
    m = torch.stack(masks)                                           # (B, H, W) bool
    nxt = torch.roll(torch.arange(B), -1)
    image = torch.where(m[:, None], image, image[nxt])
    label = torch.where(m, label, label[nxt])
    conf = torch.where(m, conf, conf[nxt])
    return image, label, conf


def quantize_conf(conf: torch.Tensor) -> torch.Tensor:
    """floor(conf * 255) / 255: the official pipeline round-trips confidences through 8-bit PIL
    images, so its thresholds act on k/255 (ge(0.7) means k >= 179)."""
    return torch.floor(conf * 255.0) / 255.0


def unsupervised_loss(logits, pseudo, conf, *, strong_threshold=0.97, ignore_index=255):
    """Official ``compute_unsupervised_loss``: per image b, eta_b = #{conf >= strong_threshold} /
    #{valid pseudo-labels}; the loss is the mean over valid pixels of eta_b * CE. Every valid
    pixel is trained; the threshold only weighs images. logits (B, C, H, W) at label size.
    A batch without valid pixels gives a zero connected to the graph (the official code: NaN)."""
    valid = pseudo != ignore_index
    eta = (conf.ge(strong_threshold) & valid).sum((1, 2)).float() / valid.sum((1, 2)).clamp(min=1)
    ce = F.cross_entropy(logits, pseudo, ignore_index=ignore_index, reduction="none")
    return (eta[:, None, None] * ce * valid).sum() / valid.sum().clamp(min=1) + 0.0 * logits.sum()
