"""U2PL (CVPR 2022): unreliable pseudo-labels as negatives, per-class queues, specs/u2pl.md.

Anchors are reliable student pixels of class c above ``anchor_threshold``, the positive is the
teacher's class mean, negatives are drawn from c's queue of unreliable teacher pixels
(:class:`pixcon.nn.UnreliableBank`), which the call fills first, as the official code does.
"""
from __future__ import annotations

import contextlib

import torch

from .. import reference
from ..core import common as cm
from ..core import u2pl as steps
from ..core.rng import draw_seed
from . import _common as chk
from . import _library as lib
from . import primitives as prim

REDUCTIONS = ("mean", "sum", "none")


def _mask(op, name, m, B, h, w, dev):
    chk.check_tensor(op, name, m, dtypes=(torch.bool,), device=dev, kind="(B, h, w) bool")
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if tuple(m.shape) != (B, h, w):
        raise ValueError(f"{op}: {name} must be (B, h, w) or (B, 1, h, w) bool at the feature "
                         f"resolution ({B}, {h}, {w}), got {tuple(m.shape)}")
    return m.reshape(-1)


def u2pl_loss(emb, labels, teacher_probs, teacher_emb, bank, *, num_labeled: int, reliable,
              unreliable, low_rank: int = 3, high_rank: int = 20, anchor_threshold: float = 0.3,
              negative_threshold: float = 1.0, temperature: float = 0.5, num_queries: int = 256,
              num_negatives: int = 50, prototype=None, ignore_index: int = 255,
              official: bool = False, seed: int | None = None, backend: str = "auto",
              reduction: str = "mean", check_values: bool | None = None):
    """U2PL's contrastive loss (specs/u2pl.md §2, §4, §5).

    Args:
        emb, teacher_emb: (B, D, h, w) student and teacher representations, the
            ``num_labeled`` labelled images first. Gradients reach ``emb`` only.
        labels: (B, H, W) or (B, h, w): ground truth, then pseudo-labels (``ignore_index``).
        teacher_probs: (B, C, h, w) teacher softmax at feature resolution.
        bank: a :class:`pixcon.nn.UnreliableBank`; the batch's negative candidates are pushed
            into it before sampling.
        reliable, unreliable: (B, h, w) or (B, 1, h, w) bool, the official low / high masks
            (:func:`u2pl_masks` makes them).
        low_rank, high_rank: r_l, r_h of the class-rank rules (3, 20).
        anchor_threshold, negative_threshold: delta_p (0.3), delta_n (1.0).
        temperature, num_queries, num_negatives: tau (0.5), anchors per class (256), negatives
            per anchor (50).
        prototype: optional (C, D) positives in place of the batch's teacher means.
        official: the official code's reading (its ``label_onehot`` writes every image's label
            into image 0 of each half; negatives need the pixel's own label to be c), not the
            paper's (the default). specs/u2pl.md §3 says what each does to the samples.
        seed: Philox seed of the samples (None: one drawn from torch's generator).
        backend: "auto" (Triton for CUDA tensors, the compiled CPU kernels for CPU tensors
            where pixcon._C is built), "reference", "native" or "triton". The fused paths
            sample with the compiled / Triton samplers and contrast with the sparse InfoNCE
            kernels reading the bank's rows in place (never anchors x negatives x D); the same
            samples on every backend for one seed. The bank's dtype should be emb's (else its
            rows are cast, a copy of the bank, every call).
        reduction: "mean" (over the classes with reliable pixels; 0 when at most one),
            "sum", or "none" ((C,) per class).

    Returns the loss, connected to ``emb``'s graph even when it is 0. Call backward before
    the next call pushes into the same bank: the Triton backward reads the bank's rows again
    (a push in between raises autograd's in-place error rather than a wrong gradient)."""
    op = "u2pl_loss"
    chk.check_pixel_inputs(op, emb, labels)
    B, D, h, w = emb.shape
    dev = emb.device
    chk.check_tensor(op, "teacher_emb", teacher_emb, ndim=4, dtypes=chk.FLOAT_DTYPES,
                     device=dev, kind="(B, D, h, w)", like="emb")
    if teacher_emb.shape != emb.shape:
        raise ValueError(f"{op}: teacher_emb {tuple(teacher_emb.shape)} must match emb "
                         f"{tuple(emb.shape)}")
    chk.check_tensor(op, "teacher_probs", teacher_probs, ndim=4, dtypes=chk.FLOAT_DTYPES,
                     device=dev, kind="(B, C, h, w)", like="emb")
    if teacher_probs.shape[0] != B or teacher_probs.shape[2:] != emb.shape[2:]:
        raise ValueError(f"{op}: teacher_probs must be (B, C, h, w) = ({B}, C, {h}, {w}), got "
                         f"{tuple(teacher_probs.shape)}")
    C = teacher_probs.shape[1]
    if not all(hasattr(bank, a) for a in ("push", "slots", "keys", "num_classes")):
        # the queue bank's interface (pixcon.nn sits above this layer: no isinstance)
        raise TypeError(f"{op}: bank must be a pixcon.nn.UnreliableBank, got "
                        f"{type(bank).__name__}")
    if bank.num_classes != C or bank.dim != D:
        raise ValueError(f"{op}: bank holds {bank.num_classes} classes of D = {bank.dim}, the "
                         f"inputs {C} classes of D = {D}")
    if not (isinstance(num_labeled, int) and 0 <= num_labeled <= B):
        raise ValueError(f"{op}: num_labeled must be an int in [0, {B}], got {num_labeled!r}")
    rel = _mask(op, "reliable", reliable, B, h, w, dev)
    unrel = _mask(op, "unreliable", unreliable, B, h, w, dev)
    if not (isinstance(low_rank, int) and isinstance(high_rank, int)
            and 0 <= low_rank <= high_rank):     # high_rank may pass C (20 for 19 classes)
        raise ValueError(f"{op}: need ints 0 <= low_rank <= high_rank, got {low_rank!r}, "
                         f"{high_rank!r}")
    for name, v in (("anchor_threshold", anchor_threshold),
                    ("negative_threshold", negative_threshold)):
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(f"{op}: {name} must be a probability in [0, 1], got {v!r}")
    chk.check_temperature(op, "temperature", temperature)
    chk.check_positive_int(op, "num_queries", num_queries)
    chk.check_positive_int(op, "num_negatives", num_negatives)
    if prototype is not None:
        chk.check_tensor(op, "prototype", prototype, ndim=2, dtypes=chk.FLOAT_DTYPES,
                         device=dev, kind="(C, D)", like="emb")
        if tuple(prototype.shape) != (C, D):
            raise ValueError(f"{op}: prototype must be (C, D) = ({C}, {D}), got "
                             f"{tuple(prototype.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    be = chk.resolve_backend(backend, dev, op, ("reference", "native", "triton"))
    if chk.want_value_checks(check_values, dev):
        chk.check_pixel_values(op, emb, labels, C, ignore_index, probs=teacher_probs)
    gt = cm.pixel_labels(labels, (h, w), C, ignore_index)

    prob = teacher_probs.permute(0, 2, 3, 1).reshape(-1, C).float()
    fused = be != "reference"

    def fused_contrast(emb, a_idx, pos, keys, neg_idx, t):
        slots = torch.arange(a_idx.numel(), device=dev)
        return prim.infonce(emb, a_idx, slots, neg_idx, t, pos, keys=keys.to(emb.dtype))

    with lib.kernels(be, dev) if fused else contextlib.nullcontext():
        # the fused path ranks and groups with the ops pixcon::class_ranks / group_columns
        # (compiled on the CPU), the reference with their torch forms: the same masks
        V, A, N = steps.class_masks(gt, prob, rel, unrel, num_labeled, h * w, low_rank=low_rank,
                                    high_rank=high_rank, anchor_threshold=anchor_threshold,
                                    negative_threshold=negative_threshold, official=official,
                                    ranks_of=lib.class_ranks if fused else steps.ranks)
        chk.warn_selected_nothing(      # positives exist, but no pixel passes the threshold
            op, f"anchor_threshold={anchor_threshold}", lambda: V.any() & ~A.any(), dev,
            check_values,
            "no reliable pixel's teacher probability of its own class is above it (an untrained "
            "teacher; lower it, or warm up with the supervised loss first as the paper does)")
        loss = steps.u2pl_loss if fused else reference.u2pl.u2pl_loss
        return loss(emb, teacher_emb, bank, (V, A, N), temperature=float(temperature),
                    num_queries=num_queries, num_negatives=num_negatives, prototype=prototype,
                    seed=draw_seed(seed, op), reduction=reduction,
                    sampler=prim.groups_sample if fused else prim.reference_groups_sample,
                    contrast=fused_contrast if fused else reference.u2pl.reference_contrast,
                    push_backend="auto" if fused else "reference", check_values=check_values,
                    grouped=lib.group_columns if fused else steps.group_columns)


def _percentile(x, valid, q):
    """numpy's linear-interpolation percentile q (0..100) of x[valid], on the device (no host
    copy): sorted with the invalid entries last, indexed by tensors."""
    n = valid.sum()
    s = torch.sort(torch.where(valid, x, float("inf"))).values
    pos = (q / 100.0) * (n - 1).clamp(min=0).to(x.dtype)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    frac = pos - lo.to(x.dtype)
    return s[lo] + (s[hi] - s[lo]) * frac


def u2pl_masks(teacher_probs, labels, num_labeled: int, alpha: float, *, ignore_index=255):
    """(reliable, unreliable) (B, h, w) bool as train_semi.py makes them (specs/u2pl.md §1), at
    the resolution of teacher_probs (B, C, h, w) (the official code upsamples the teacher to the
    image first; pass probs at that resolution and downsample the masks for that reading).
    Labelled images: every valid label, in both. Unlabelled: teacher entropy at or below the
    alpha percentile of the valid pixels' entropies (reliable), at or above the (100 - alpha)
    percentile (unreliable). alpha: alpha_t in percent (20 (1 - epoch / epochs))."""
    op = "u2pl_masks"
    chk.check_tensor(op, "teacher_probs", teacher_probs, ndim=4, dtypes=chk.FLOAT_DTYPES,
                     kind="(B, C, h, w)")
    B, C, h, w = teacher_probs.shape
    if not 0.0 <= alpha <= 100.0:
        raise ValueError(f"{op}: alpha must be a percentage in [0, 100], got {alpha!r}")
    lab = cm.resize_nearest(labels, (h, w)).to(torch.int64)
    valid = (lab != ignore_index) & (lab >= 0) & (lab < C)
    p = teacher_probs.to(torch.float32)
    entropy = -(p * torch.log(p + 1e-10)).sum(dim=1)
    u = slice(num_labeled, None)
    ent, val = entropy[u].reshape(-1), valid[u].reshape(-1)
    low = _percentile(ent, val, alpha)
    high = _percentile(ent, val, 100.0 - alpha)
    reliable, unreliable = valid.clone(), valid.clone()
    reliable[u] &= entropy[u] <= low
    unreliable[u] &= entropy[u] >= high
    return reliable, unreliable


def u2pl_unsupervised_loss(logits, pseudo, teacher_logits, drop_percent: float, *,
                           ignore_index: int = 255):
    """U2PL's unsupervised loss (specs/u2pl.md §4): cross-entropy of the student ``logits``
    (B, C, H, W) on the pseudo-labels (B, H, W), the pixels whose teacher entropy (softmax of
    ``teacher_logits``, same shape) is at or above the ``drop_percent`` percentile of the valid
    pixels' set to ignore, weighted by B H W / #kept as the official code does.
    drop_percent = 100 - (100 - 80)(1 - epoch / epochs) in the official schedule. A batch
    without a kept pixel gives a zero connected to the graph."""
    op = "u2pl_unsupervised_loss"
    chk.check_tensor(op, "logits", logits, ndim=4, dtypes=chk.FLOAT_DTYPES, kind="(B, C, H, W)")
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"{op}: teacher_logits {tuple(teacher_logits.shape)} must match logits "
                         f"{tuple(logits.shape)}")
    if not 0.0 <= drop_percent <= 100.0:
        raise ValueError(f"{op}: drop_percent must be in [0, 100], got {drop_percent!r}")
    with torch.no_grad():
        p = torch.softmax(teacher_logits.float(), dim=1)
        entropy = -(p * torch.log(p + 1e-10)).sum(dim=1)
        valid = pseudo != ignore_index
        thresh = _percentile(entropy.reshape(-1), valid.reshape(-1), drop_percent)
        target = torch.where(valid & (entropy >= thresh), ignore_index, pseudo)
        kept = (target != ignore_index).sum()
        weight = pseudo.numel() / kept.clamp(min=1)
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index,
                                           reduction="sum") / kept.clamp(min=1)
    return weight * ce + 0.0 * logits.sum()
