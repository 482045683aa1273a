"""U2PL's per-class queues of unreliable negatives (specs/u2pl.md §2 step 5, §5)."""
from __future__ import annotations

import torch

from .. import distributed as dist
from ..ops import _common as chk
from ..ops import _library as lib

OFFICIAL_SIZES_VOC = (50000,) + (30000,) * 20     # class 0 (background) keeps more


def _count(rows):
    return rows.shape[0] * rows.shape[2] if rows.dim() == 3 else rows.shape[0]


def _gather(rows, p):
    """Rows p (K,) of (P, D) rows or of (B, D, HW) maps (pixel p = b HW + s), as (K, D)."""
    if rows.dim() == 2:
        return rows[p]
    HW = rows.shape[2]         # strided reads (HW apart): for a few rows; a contiguous copy
    return rows[p // HW, :, p % HW]        # of the map and (P, D) rows is faster for many


class UnreliableBank(torch.nn.Module):
    """Per-class FIFO queues of negative keys, on the embeddings' device.

    One (sum(sizes), D) buffer: class c owns rows [offsets[c], offsets[c] + sizes[c]), of which
    the first counts[c] are filled; a push writes each class's newest rows at its pointer (a
    ring) and keeps at most sizes[c]. Sampled by index (``slots``), never copied whole, unlike
    the official queues (CPU lists copied to the GPU every step). ``state_dict``-able.

    Args:
        num_classes, dim: C and D.
        size: rows kept per class (the official 30,000).
        sizes: per-class sizes overriding ``size`` (the official VOC setting:
            ``OFFICIAL_SIZES_VOC``, 50,000 for class 0).
        cross_rank: under torch.distributed, every rank pushes the rows of all ranks (in rank
            order), as the official all-gather does, so the queues stay equal everywhere.

    >>> bank = UnreliableBank(21, 256, sizes=OFFICIAL_SIZES_VOC).cuda()
    """

    def __init__(self, num_classes: int, dim: int, size: int = 30000, *, sizes=None,
                 cross_rank: bool = True, group=None, dtype=torch.float32):
        super().__init__()
        chk.check_positive_int("UnreliableBank", "num_classes", num_classes)
        chk.check_positive_int("UnreliableBank", "dim", dim)
        sizes = tuple(sizes) if sizes is not None else (size,) * num_classes
        if len(sizes) != num_classes:
            raise ValueError(f"UnreliableBank: sizes has {len(sizes)} entries for {num_classes} "
                             "classes")
        for s in sizes:
            chk.check_positive_int("UnreliableBank", "sizes", s)
        self.num_classes, self.dim, self.cross_rank, self.group = num_classes, dim, cross_rank, group
        s = torch.tensor(sizes, dtype=torch.int64)
        self.register_buffer("sizes", s)
        self.register_buffer("offsets", torch.cumsum(s, 0) - s)
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("keys", torch.zeros(int(s.sum()), dim, dtype=dtype))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, dim={self.dim}, "
                f"rows={self.keys.shape[0]}, cross_rank={self.cross_rank}")

    def slots(self):
        """(order, offsets, counts) of the filled rows, grouped by class: what the samplers
        take (order is the identity: a class's filled rows are [offset, offset + count))."""
        order = torch.arange(self.keys.shape[0], device=self.keys.device)
        return order, self.offsets, self.counts

    def _check(self, rows, mask, check_values):
        op = "UnreliableBank.push"
        chk.check_tensor(op, "rows", rows, ndim=(2, 3), dtypes=chk.FLOAT_DTYPES,
                         kind="(P, D) or (B, D, HW)")
        if rows.shape[-2 if rows.dim() == 3 else 1] != self.dim:
            raise ValueError(f"{op}: rows have D = {rows.shape[1]}, the bank {self.dim}")
        if rows.device != self.keys.device:
            raise ValueError(f"{op}: rows are on {rows.device}, the bank on {self.keys.device} "
                             "(move it with .to())")
        chk.check_tensor(op, "mask", mask, ndim=2, dtypes=(torch.bool,), device=rows.device,
                         kind="(C, P)", like="rows")
        P = _count(rows)
        if tuple(mask.shape) != (self.num_classes, P):
            raise ValueError(f"{op}: mask must be (C, P) = ({self.num_classes}, {P}), got "
                             f"{tuple(mask.shape)}")
        if chk.want_value_checks(check_values, rows.device):
            # every row's finiteness in one pass over rows, then the pushed ones' (a gather of
            # the pushed rows first cost 12 ms more at U2PL's VOC setting)
            finite = torch.isfinite(rows).all(dim=-1 if rows.dim() == 2 else 1).reshape(-1)
            if bool((mask.any(0) & ~finite).any()):
                raise ValueError(f"{op}: rows to enqueue contain NaN or Inf")

    @torch.no_grad()
    def push(self, rows: torch.Tensor, mask: torch.Tensor, *, check_values: bool | None = None,
             backend: str = "auto"):
        """Enqueue row p into the queue of every class c with mask[c, p] (a row may go to
        several queues), in row order, keeping each class's newest ``sizes[c]``. rows: (P, D),
        or (B, D, HW) channels-first maps (pixel p = b HW + s, read in place, only the pushed
        ones). Everything is checked before anything is written. backend: "auto" (the op
        pixcon::bank_push wherever it has a kernel: CUDA tensors and a loss's triton scope
        (no host sync), CPU tensors with the compiled kernels (rows copied straight to their
        slots)), "triton" (the Triton kernel, on CPU tensors under the interpreter too),
        "native" (the op's compiled CPU kernel on CPU tensors), "reference" (one ``nonzero``
        compacts the (class, row) pairs, then a gather and an indexed write)."""
        def check():
            self._check(rows, mask, check_values)
            return (*rows.shape, *mask.shape)

        if self.cross_rank and dist.is_distributed(self.group):
            dist.checked("UnreliableBank.push", check, group=self.group)
            # rows along dim 0 (pixels, or images of HW pixels), the mask's pixels alike
            rows, mask_t = dist.gather_many(rows, mask.T.contiguous(), group=self.group,
                                           op="UnreliableBank.push")
            mask = mask_t.T
        else:
            check()
        size = self.sizes[:, None]
        rank = torch.cumsum(mask.to(torch.int64), dim=1) - 1          # position within class
        k = mask.sum(dim=1)
        drop = (k - self.sizes).clamp(min=0)                             # older than the newest
        keep = mask & (rank >= drop[:, None])
        slot = self.offsets[:, None] + (self.ptr[:, None] + rank - drop[:, None]) % size
        dev = self.keys.device
        import pixcon
        has_kernel = lib.triton_here(dev) or (dev.type == "cpu" and pixcon.HAS_C)
        if backend == "triton" or (backend != "reference" and has_kernel):
            with lib.kernels("triton" if backend == "triton" else "native", dev):
                lib.bank_push(self.keys, rows.to(self.keys.dtype), keep, slot)
        else:
            c, p = keep.nonzero(as_tuple=True)
            self.keys[slot[c, p]] = _gather(rows, p).to(self.keys.dtype)
        kept = torch.minimum(k, self.sizes)
        self.ptr.copy_((self.ptr + kept) % self.sizes)
        self.counts.copy_(torch.minimum(self.counts + k, self.sizes))


class U2PLLoss(torch.nn.Module):
    """U2PL's contrastive loss with its queues: :func:`pixcon.ops.u2pl_loss` on a bank this
    module owns (``state_dict`` carries it), the reliable / unreliable masks made from the
    teacher's entropy at percentile ``alpha`` (alpha_t = 20 (1 - epoch / epochs)) unless given.

    >>> crit = U2PLLoss(21, 256, sizes=OFFICIAL_SIZES_VOC).cuda()
    >>> loss = crit(rep, labels, prob_teacher, rep_teacher, num_labeled=2, alpha=alpha_t)
    """

    def __init__(self, num_classes: int, dim: int, size: int = 30000, *, sizes=None,
                 cross_rank: bool = True, group=None, **loss_kwargs):
        super().__init__()
        self.bank = UnreliableBank(num_classes, dim, size, sizes=sizes, cross_rank=cross_rank,
                                   group=group)
        self.kwargs = loss_kwargs

    def forward(self, emb, labels, teacher_probs, teacher_emb, *, num_labeled: int,
                alpha: float | None = None, reliable=None, unreliable=None, seed=None):
        from ..ops import u2pl_loss, u2pl_masks
        if reliable is None or unreliable is None:
            if alpha is None:
                raise ValueError("U2PLLoss: give alpha (the entropy percentile) or both masks")
            reliable, unreliable = u2pl_masks(teacher_probs, labels, num_labeled, alpha,
                                              ignore_index=self.kwargs.get("ignore_index", 255))
        return u2pl_loss(emb, labels, teacher_probs, teacher_emb, self.bank,
                         num_labeled=num_labeled, reliable=reliable, unreliable=unreliable,
                         seed=seed, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
