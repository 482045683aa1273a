"""ReCo: regional contrast (Liu et al., ICLR 2022), specs/reco.md §1.

The fused path is the method's steps as primitive calls, no host sync and no Python loop over
classes or queries. On the GPU (Triton) it is one gather pass: one read of the embedding gives
the class sums and contiguous pixel rows; the InfoNCE kernel regenerates each query's negatives
from their counters (the same samples as the sampler's) and keeps one gradient direction per
query, so what it saves for backward is the query indices, one D-vector and one scale per query
(no queries x negatives tensor, never queries x negatives x D keys). On CPU (native) the
sampler's (M, N) indices are built and the InfoNCE kernel keeps the same direction.
"""
from __future__ import annotations

import torch

from .. import distributed as dist
from .. import reference
from ..core import common as cm
from ..core.rng import STREAM_NEGATIVE, draw_seed
from . import _common as chk
from . import _library as lib
from . import primitives as prim


def reco_loss(emb, labels, probs, *, mask=None, ignore_index: int = 255,
              strong_threshold: float = 0.97, temperature: float = 0.5, num_queries: int = 256,
              num_negatives: int = 512, seed: int | None = None, backend: str = "auto",
              relation_temperature: float | None = None, reduction: str = "mean",
              cross_rank: bool = False, check_values: bool | None = None):
    """ReCo loss with the official ``compute_reco_loss`` semantics.

    Args:
        emb: (B, D, h, w) float32/bfloat16/float16/float64 representation (not normalised;
            cosine similarity normalises inside). Gradients reach it through the queries only.
        labels: (B, H, W) integer class map at image or feature resolution (ground truth or
            pseudo-labels); nearest-downsampled to (h, w) as F.interpolate(mode="nearest").
        probs: (B, C, h, w) class probabilities (the student's softmax at feature resolution);
            C fixes the number of classes. A pixel is *hard* when its probability of its own
            label is strictly below ``strong_threshold`` (official ``<``; the paper writes <=).
        mask: optional (B, H, W) or (B, 1, H, W) validity mask (e.g. ``conf >= 0.7`` for
            pseudo-labels): bool, or numbers that are only 0 and 1 (anything else raises: a
            confidence map is not a mask); False pixels are ignored, like ``ignore_index``.
        ignore_index: label value to ignore (default 255; any int, e.g. -1).
        strong_threshold, temperature, num_queries, num_negatives: the official training
            settings by default (0.97, 0.5, 256, 512).
        seed: int, or None to draw one from torch's default generator (torch.manual_seed
            controls it). The same seed gives the same samples on every backend.
        backend: "auto" (Triton kernels for CUDA tensors, the compiled CPU kernels for CPU
            tensors where pixcon._C is built, else the reference; env PIXCON_BACKEND
            overrides), "reference", "triton" or "native" (compiled CPU kernels: the fused
            design's memory profile, indices and one log-sum-exp per query saved).
        relation_temperature: temperature of the negative-class softmax (official: the same
            ``temperature``, the default None).
        reduction: "mean" (the official scalar) or "none" ((C, Q) per-query losses, zero rows
            for classes without queries).
        cross_rank: under torch.distributed, the class means (the positive keys and the
            relation graph) are those of the concatenated batch of all ranks, all-reduced as
            sums and counts; queries, negatives and the divisor stay this rank's (negatives can
            only come from classes present here). Off by default, as the official code; every
            rank must call the loss when it is on.
        check_values: check for NaN embeddings, labels out of range and probs outside [0, 1]
            (a host sync). Default: on for CPU tensors, off for CUDA (env PIXCON_CHECK_VALUES).

    Returns the scalar loss (float32; float64 for float64 emb). With at most one class present,
    or no hard pixel, it is a zero connected to ``emb``'s graph (the official code returns a
    graph-less CPU zero, which breaks DDP; see reco #27). The divisor counts every present class,
    also those without hard pixels (official behaviour).
    """
    op = "reco_loss"
    checks = chk.want_value_checks(check_values, emb.device)

    def check():               # every rank together when cross_rank (distributed.validated)
        m = chk.check_pixel_inputs(op, emb, labels, probs, mask, check_values)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
        chk.check_positive_float(op, "strong_threshold", strong_threshold)
        if strong_threshold > 1:
            raise ValueError(f"{op}: strong_threshold must be in (0, 1] (a probability; 1 makes "
                             f"every pixel below certainty hard), got {strong_threshold}")
        chk.check_temperature(op, "temperature", temperature)
        if relation_temperature is not None:
            chk.check_temperature(op, "relation_temperature", relation_temperature)
        chk.check_positive_int(op, "num_queries", num_queries)
        chk.check_positive_int(op, "num_negatives", num_negatives)
        if reduction not in ("mean", "none"):
            raise ValueError(f"{op}: reduction must be 'mean' or 'none', got {reduction!r}")
        C = probs.shape[1]
        if C * num_queries * num_negatives >= 2**31:
            raise ValueError(f"{op}: classes x num_queries x num_negatives must be below 2^31 "
                             f"(counter space), got {C} x {num_queries} x {num_negatives}")
        if checks:
            chk.check_pixel_values(op, emb, labels, C, ignore_index, probs)
        return m, (C, emb.shape[1])

    mask = dist.validated(op, check, agree_now=cross_rank and checks)
    C = probs.shape[1]
    seed = draw_seed(seed, op)

    be = chk.resolve_backend(backend, emb.device, op, ("reference", "triton", "native"))
    lab = hard = None                    # the fused path's, read by the warning too
    if be != "reference" or checks:
        lab = cm.pixel_labels(labels, emb.shape[2:], C, ignore_index, mask)   # (P,), -1 invalid
        hard = cm.hard_pixels(probs, lab, strong_threshold)                  # prob(own) < t
    chk.warn_selected_nothing(
        op, f"strong_threshold={strong_threshold}", lambda: (lab >= 0).any() & ~hard.any(),
        emb.device, check_values,
        "every labelled pixel's probability of its own class is at or above it, so there is no "
        "hard query (a confident network: ReCo contrasts hard pixels only, as the paper; raise "
        "it, e.g. 0.99)")
    kw = dict(ignore_index=ignore_index, strong_threshold=strong_threshold,
              temperature=temperature, num_queries=num_queries, num_negatives=num_negatives,
              seed=seed, relation_temperature=relation_temperature, reduction=reduction,
              stats=dist.stats_for(op) if cross_rank else None)
    if be == "reference":
        return reference.reco_loss(emb, labels, probs, mask, **kw)
    with lib.kernels(be, emb.device):
        return _reco_fused(emb, labels, probs, mask, lab=lab, hard=hard, **kw)


def _reco_fused(emb, labels, probs, mask, *, ignore_index, strong_threshold, temperature,
                num_queries, num_negatives, seed, relation_temperature, reduction, stats=None,
                lab=None, hard=None):
    """The fused path, each primitive's op on the device's kernels: the same samples on every
    device. Where the Triton kernels run, one gather pass and one kernel with its negatives
    drawn inside (ReCo's own op); on the compiled CPU kernels, the shared samplers and InfoNCE."""
    B, D, h, w = emb.shape
    C, Q = probs.shape[1], num_queries
    rel_t = temperature if relation_temperature is None else relation_temperature
    one_pass = lib.triton_here(emb.device)
    if lab is None:             # the caller's when it has them (reco_loss made them once)
        lab = cm.pixel_labels(labels, (h, w), C, ignore_index, mask)      # (P,), -1 = invalid
        hard = cm.hard_pixels(probs, lab, strong_threshold)               # prob(own) < threshold
    if one_pass:                # one read of emb: class sums and contiguous rows to gather
        rows, sums, counts = lib.rows_and_class_sums(emb.detach(), lab, C)
    else:
        sums, counts = prim.class_stats(emb, lab, C)                       # no gradient
    means = cm.class_means_from_sums(sums, counts)
    present = counts > 0
    if stats is not None:                                                  # over all ranks
        means = cm.class_means_from_sums(*stats(sums, counts))
    cdf = cm.relation_cdf(means, present, rel_t)                           # P(j | c) thresholds
    queries = prim.hard_queries(lab, hard, C, Q, seed)                     # (C, Q), -1 = none
    cls = torch.arange(C, device=emb.device)[:, None].expand(C, Q)
    row_class = torch.where(queries >= 0, cls, -1).reshape(-1).to(torch.int32)
    if one_pass:                # negatives regenerated in-kernel from their counters
        order, offsets, counts_all = cm.group_by_class(lab, C)
        per_query = lib.reco_infonce(
            emb, rows, means, queries.reshape(-1), Q, cdf, order, offsets, counts_all,
            num_negatives, seed, STREAM_NEGATIVE, float(temperature))[0].view(C, Q)
    else:
        negatives = prim.relation_negatives(row_class, cdf, lab, num_negatives, seed)
        per_query = prim.infonce(emb, queries.reshape(-1), row_class.clamp(min=0), negatives,
                                 temperature, means).view(C, Q)
    if reduction == "none":
        return per_query
    K = present.sum()
    weight = (K >= 2).to(per_query.dtype) / (Q * K.clamp(min=1))          # 1 / (Q |K|)
    return per_query.sum() * weight


def reco_inputs_from_official(label: torch.Tensor, mask: torch.Tensor, ignore_index: int = 255):
    """Adapter for the official calling form ``compute_reco_loss(rep, label, mask, prob, ...)``:
    label (B, C, h, w) one-hot float, mask (B, 1, h, w) {0, 1}. Returns (labels, mask) for
    reco_loss: labels (B, h, w) int64 (argmax of the one-hot, ``ignore_index`` where it is all
    zero) and mask (B, h, w) bool."""
    chk.check_tensor("reco_inputs_from_official", "label", label, ndim=4,
                     kind="(B, C, h, w) one-hot")
    chk.check_tensor("reco_inputs_from_official", "mask", mask, ndim=(3, 4), device=label.device,
                     like="label")
    lab = label.argmax(dim=1)
    lab = torch.where(label.sum(dim=1) > 0, lab, ignore_index)
    m = mask[:, 0] if mask.dim() == 4 else mask
    return lab, m != 0
