"""ContrastiveSeg's memory bank (specs/contrastiveseg.md §6): per class, a FIFO queue of segment
means (one per image that contains the class) and a FIFO queue of pixel embeddings (up to
``pixel_update_freq`` per image and class), used as keys by
``pixcon.ops.pixel_contrast_loss(..., memory=bank)``.

The default is the behaviour the paper describes; each official quirk is a flag in ``official``:

  "pointer"   M1: the pixel pointer advances by 1 per write instead of by the number written
  "overflow"  M5: a write that would pass the end goes to the last K slots and the pointer to 0
              (the newest entries are overwritten; "pointer" implies it, as in the official code)
  "positions" M2: the pixels enqueued are the flat positions perm[:K] of the image, not the
              class's own pixels
  "class0"    M4: class 0 is never enqueued, and keys() returns the official layout: classes
              1..C-1, then 2R zero vectors labelled 0
and ``label_stride``=s (M3 when s is not the keys' stride): labels[:, ::s, ::s] matched to the
flat key map by position, instead of labels nearest-resized to the keys' resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..ops import _common as chk
from ..core import common as cm
from ..core.rng import draw_seed
from ..ops import philox

STREAM_BANK = 4          # Philox stream of the bank's pixel choice
QUIRKS = ("pointer", "overflow", "positions", "class0")


class PixelMemoryBank(torch.nn.Module):
    """Pixel and segment queues per class, (C, R, D) each, initialised to random unit vectors
    (as the official code does), with write pointers (C,). Buffers: moves with ``.to()``, saved
    in ``state_dict()``. Keys carry no gradient.

    Under torch.distributed (``cross_rank=True``, the default) ``update`` all-gathers the keys
    and labels of every rank and enqueues the global batch in rank order, with a seed agreed
    across ranks, so every rank holds the same bank (the official code keeps only what each
    rank writes itself, and its ranks drift apart); ``cross_rank=False`` enqueues each rank's
    own batch. ``group``: the process group (default the world). Without a process group both are
    the single-process bank.

    >>> bank = PixelMemoryBank(num_classes=19, dim=256, memory_size=5000)
    >>> loss = pixel_contrast_loss(emb, labels, pred, memory=bank, max_views=1)
    >>> bank.update(emb.detach(), labels)          # after the loss, before the next step
    """

    def __init__(self, num_classes: int, dim: int = 256, memory_size: int = 5000,
                 pixel_update_freq: int = 10, *, ignore_index: int = 255,
                 label_stride: int | None = None, official=(), cross_rank: bool = True,
                 group=None):
        super().__init__()
        self.cross_rank, self.group = bool(cross_rank), group
        self._synced = False
        chk.check_positive_int("PixelMemoryBank", "num_classes", num_classes)
        chk.check_positive_int("PixelMemoryBank", "dim", dim)
        chk.check_positive_int("PixelMemoryBank", "memory_size", memory_size)
        chk.check_positive_int("PixelMemoryBank", "pixel_update_freq", pixel_update_freq,
                               upper=memory_size)
        if label_stride is not None:
            chk.check_positive_int("PixelMemoryBank", "label_stride", label_stride)
        unknown = set(official) - set(QUIRKS)
        if unknown:
            raise ValueError(f"PixelMemoryBank: unknown official quirks {sorted(unknown)}; "
                             f"choose from {QUIRKS}")
        self.num_classes, self.dim, self.memory_size = num_classes, dim, memory_size
        self.pixel_update_freq, self.ignore_index = pixel_update_freq, ignore_index
        self.label_stride, self.official = label_stride, frozenset(official)
        C, R = num_classes, memory_size
        self.register_buffer("segment_queue", F.normalize(torch.randn(C, R, dim), dim=2))
        self.register_buffer("pixel_queue", F.normalize(torch.randn(C, R, dim), dim=2))
        self.register_buffer("segment_ptr", torch.zeros(C, dtype=torch.int64))
        self.register_buffer("pixel_ptr", torch.zeros(C, dtype=torch.int64))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, dim={self.dim}, memory_size={self.memory_size}, "
                f"pixel_update_freq={self.pixel_update_freq}, official={sorted(self.official)}")

    def keys(self):
        """(keys (C * 2R, D), labels (C * 2R,)): per class its segment queue then its pixel
        queue (the official cat along the queue axis). With "class0": classes 1..C-1 and a
        block of 2R zero vectors labelled 0 at the end, as the official _sample_negative."""
        C, R = self.num_classes, self.memory_size
        q = torch.cat([self.segment_queue, self.pixel_queue], dim=1)            # (C, 2R, D)
        labels = torch.arange(C, device=q.device).repeat_interleave(2 * R)
        if "class0" in self.official:
            q = torch.cat([q[1:], q.new_zeros(1, 2 * R, self.dim)])
            labels = torch.cat([labels[2 * R:], labels.new_zeros(2 * R)])
        return q.reshape(-1, self.dim).detach(), labels

    def _labels(self, labels, B, h, w):
        """(B, h*w) class per key position, -1 = nothing to enqueue."""
        if self.label_stride is None:
            lab = cm.resize_nearest(labels, (h, w)).reshape(B, -1).to(torch.int64)
        else:                       # official: strided labels matched to the flat key map
            s = self.label_stride
            lab = labels[:, ::s, ::s].reshape(B, -1).to(torch.int64)[:, :h * w]
            lab = F.pad(lab, (0, h * w - lab.shape[1]), value=self.ignore_index)
        ok = (lab != self.ignore_index) & (lab >= 0) & (lab < self.num_classes)
        if "class0" in self.official:
            ok &= lab > 0
        return torch.where(ok, lab, -1)

    @torch.no_grad()
    def update(self, keys: torch.Tensor, labels: torch.Tensor, *, seed: int | None = None,
               check_values: bool | None = None):
        """Enqueue one batch: keys (B, D, h, w) embeddings (detached inside; the official
        ``key = embed.detach()``), labels (B, H, W) at image or feature resolution.

        Per image b and class c present: the L2-normalised mean of its keys goes to the segment
        queue; min(count, pixel_update_freq) of its pixels, uniform without replacement
        (Philox stream 4 under ``seed``), L2-normalised, go to the pixel queue. Everything is
        checked before anything is written: a failing call leaves the bank unchanged (the
        queues are then written in place, no copy of the bank). A loop
        over the B images, vectorised over classes, with no host sync."""
        op = "PixelMemoryBank.update"

        def check():
            self._check_update(keys, labels, check_values)
            return (*keys.shape, *labels.shape)

        seed = draw_seed(seed, op)
        if self.cross_rank:                    # every rank enqueues the whole global batch
            seed = dist.checked(op, check, seed=seed, group=self.group)
            keys, labels = dist.gather_many(keys, labels, group=self.group, op=op)
            if not self._synced:           # the random initial queues: rank 0's everywhere
                dist.broadcast_state(self, group=self.group, op=op)
                self._synced = True
        else:
            check()
        B, D, h, w = keys.shape
        R, freq, C = self.memory_size, self.pixel_update_freq, self.num_classes
        lab = self._labels(labels, B, h, w)                                  # (B, hw)
        x = keys.detach().permute(0, 2, 3, 1).reshape(B, h * w, D).to(self.pixel_queue.dtype)
        cls = torch.arange(C, device=keys.device)
        j = torch.arange(freq, device=keys.device)
        seg_q, pix_q = self.segment_queue, self.pixel_queue          # written in place below
        seg_p, pix_p = self.segment_ptr.clone(), self.pixel_ptr.clone()
        for b in range(B):
            lb, xb = lab[b], x[b]
            valid = lb >= 0
            counts = torch.zeros(C, dtype=torch.int64, device=x.device).index_add_(
                0, lb.clamp(min=0), valid.to(torch.int64))
            present = counts > 0
            # segment queue: one normalised mean per present class at its pointer
            sums = torch.zeros(C, D, dtype=x.dtype, device=x.device).index_add_(
                0, lb.clamp(min=0), xb * valid[:, None])
            mean = F.normalize(sums / counts.clamp(min=1)[:, None], dim=1)
            seg_q[cls, seg_p] = torch.where(present[:, None], mean, seg_q[cls, seg_p])
            seg_p = torch.where(present, (seg_p + 1) % R, seg_p)
            # pixel queue: K = min(count, freq) pixels per class, smallest Philox keys first
            K = counts.clamp(max=freq)
            src = self._choose(lb, valid, counts, seed, b, h * w)            # (C, freq)
            val = F.normalize(xb[src.clamp(min=0)], dim=2)                   # (C, freq, D)
            used = j[None, :] < K[:, None]
            if "pointer" in self.official or "overflow" in self.official:
                over = pix_p + K >= R
                start = torch.where(over, R - K, pix_p)
                slot = (start[:, None] + j[None, :]) % R
                step = torch.where(over, -pix_p, 1 if "pointer" in self.official else K)
            else:
                slot = (pix_p[:, None] + j[None, :]) % R
                step = K
            pix_q[cls[:, None], slot] = torch.where(used[..., None], val, pix_q[cls[:, None], slot])
            pix_p = torch.where(K > 0, (pix_p + step) % R, pix_p)
        self.segment_ptr.copy_(seg_p)
        self.pixel_ptr.copy_(pix_p)

    def _check_update(self, keys, labels, check_values):
        chk.check_tensor("PixelMemoryBank.update", "keys", keys, ndim=4, dtypes=chk.FLOAT_DTYPES,
                         kind="(B, D, h, w)")
        B, D, h, w = keys.shape
        if D != self.dim:
            raise ValueError(f"PixelMemoryBank.update: keys have D = {D}, the bank {self.dim}")
        if keys.device != self.pixel_queue.device:
            raise ValueError(f"PixelMemoryBank.update: keys are on {keys.device}, the bank on "
                             f"{self.pixel_queue.device} (move it with .to())")
        chk.check_tensor("PixelMemoryBank.update", "labels", labels, ndim=3,
                         dtypes=chk.INT_DTYPES, device=keys.device,
                         kind="(B, H, W)", like="keys")
        if labels.shape[0] != B or labels.shape[1] < h or labels.shape[2] < w:
            raise ValueError(f"PixelMemoryBank.update: labels must be (B, H, W) with B = {B} and "
                             f"H, W at least ({h}, {w}), got {tuple(labels.shape)}")
        R, freq = self.memory_size, self.pixel_update_freq
        B *= dist.world_size(self.group) if self.cross_rank else 1    # gathered: the global batch
        if B * freq > R:
            raise ValueError(f"PixelMemoryBank.update: a batch of {B} images may enqueue {B} x "
                             f"pixel_update_freq = {B * freq} pixels per class, more than "
                             f"memory_size = {R}")
        if chk.want_value_checks(check_values, keys.device):
            if not bool(torch.isfinite(keys).all()):
                raise ValueError("PixelMemoryBank.update: keys contain NaN or Inf")
            lab = labels.to(torch.int64)
            bad = (lab != self.ignore_index) & ((lab < 0) | (lab >= self.num_classes))
            if bool(bad.any()):      # dropped silently, they would be a class missing its keys
                raise ValueError(f"PixelMemoryBank.update: labels must be classes in [0, "
                                 f"{self.num_classes}) or ignore_index={self.ignore_index}; "
                                 f"found {int(lab[bad][0])}")

    def _choose(self, lb, valid, counts, seed, b, hw):
        """(C, freq) positions in image b of the pixels to enqueue per class (-1 past K): the
        class's pixels in ascending Philox key (counter = flat batch index b*hw + p).
        "positions": the official perm values, i.e. each chosen pixel's rank within its class
        read as a flat position."""
        C, freq = self.num_classes, self.pixel_update_freq
        pix = torch.arange(hw, device=lb.device)
        key = philox(b * hw + pix, seed, STREAM_BANK)[:, 0]
        group = torch.where(valid, lb, C)
        by_key = torch.sort(key, stable=True).indices
        order = by_key[torch.sort(group[by_key], stable=True).indices]       # by class, then key
        start = torch.searchsorted(group[order], torch.arange(C, device=lb.device))
        j = torch.arange(freq, device=lb.device)
        pos = (start[:, None] + j[None, :]).clamp(max=hw - 1)
        chosen = order[pos]                                                  # (C, freq)
        if "positions" in self.official:
            in_pixel_order = torch.sort(group, stable=True).indices           # class, then pixel
            rank = torch.empty_like(pix)
            rank[in_pixel_order] = pix - torch.searchsorted(
                group[in_pixel_order], group[in_pixel_order])
            chosen = rank[chosen]
        return torch.where(j[None, :] < counts.clamp(max=freq)[:, None], chosen, -1)
