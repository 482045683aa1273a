"""Shared primitives: every method's op is a short sequence of these.

Two forms of each. The public one (``class_means``, ``sparse_infonce``, ...) checks its
arguments, takes ``backend`` ("auto", "reference", "native", "triton"), and runs either its
reference (plain torch, what the kernels are tested against) or its op. The fused one
(``class_stats``, ``infonce``, ``hard_queries``, ...) takes no backend: it calls the op, which
dispatches by device, and is what a loss calls inside the one ``_library.kernels(backend,
device)`` scope it opened after choosing its backend.
"""
from __future__ import annotations

import torch

from .. import distributed as dist
from ..core import common as cm
from ..core.rng import STREAM_NEGATIVE, STREAM_QUERY, draw_seed
from ..reference import common as rc
from ..reference.rng import philox4x32
from . import _library
from ._common import FLOAT_DTYPES, INT_DTYPES, check_positive_int, check_temperature, \
    check_index_space, check_tensor, guard_index_range, resolve_backend

IDX = (torch.int32, torch.int64)
NATIVE = ("reference", "triton", "native")   # primitives with compiled CPU kernels


def _check_pool(op, name, pool):
    check_tensor(op, name, pool, ndim=(2, 4), dtypes=FLOAT_DTYPES, kind="(P, D) or (B, D, h, w)")
    return pool.shape[0] if pool.dim() == 2 else pool.shape[0] * pool.shape[2] * pool.shape[3]


def _check_labels(op, lab, rows, device, name="labels"):
    check_tensor(op, name, lab, ndim=1, dtypes=INT_DTYPES, device=device, kind="(P,)")
    if lab.shape[0] != rows:
        raise ValueError(f"{op}: {name} must have one entry per pixel row ({rows}), got "
                         f"{lab.shape[0]}")


def _lib():
    return _library


def _scope(backend, device):
    return _library.kernels(backend, device)


# --- fused forms: no backend, inside a loss's kernels() scope --------------------------------
def class_stats(emb, labels, num_classes):
    """(sums (C, D), counts (C,)) of emb's rows by class, no gradient (the op per device)."""
    return _library.class_sums(emb.detach(), labels, num_classes)


def groups_sample(order, offsets, counts, row_group, per_row, seed, stream):
    """sample_in_groups' op (see there)."""
    return _library.sample_in_groups(order, offsets, counts, row_group, per_row, seed, stream)


def hard_queries(lab, hard, num_classes, num_queries, seed):
    """sample_hard_queries' fused form."""
    order, offsets, counts = cm.group_by_class(torch.where(hard, lab, -1), num_classes)
    rows = torch.arange(num_classes, device=lab.device)
    return groups_sample(order, offsets, counts, rows, num_queries, seed, STREAM_QUERY)


def relation_negatives(row_class, cdf, lab, num_negatives, seed):
    """sample_negatives' fused form."""
    order, offsets, counts = cm.group_by_class(lab, cdf.shape[0])
    return _library.sample_negatives(row_class, cdf, order, offsets, counts, num_negatives, seed,
                                      STREAM_NEGATIVE)


def infonce(pool, q_idx, pos_idx, neg_idx, temperature, pos_pool, key_grad=False, keys=None):
    """sparse_infonce's fused form (checked arguments; pos_pool given): the loss (M,). Without
    key gradients the forward keeps each query's direction (one D-row a query) for a backward
    that is a scale and a scatter, on every kernel."""
    direction = not key_grad
    return _library.sparse_infonce(pool, pos_pool, q_idx, pos_idx, neg_idx, float(temperature),
                                   bool(key_grad), direction, keys)[0]


# --- public forms ---------------------------------------------------------------------------


class _PixelRows(torch.autograd.Function):
    """Rows of a (B, D, h, w) map at flat pixel indices; backward writes the rows' gradients
    into one zero map (op pixcon::scatter_rows; autograd's own index backward builds a zero
    map and then an out-of-place copy of it: twice the map's size)."""

    @staticmethod
    def forward(emb, index):
        B, D, h, w = emb.shape
        p = index.clamp(min=0)
        return emb[p // (h * w), :, (p // w) % h, p % w]

    @staticmethod
    def setup_context(ctx, inputs, output):       # separate: torch.func transforms it too
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        emb, index = ctx.saved_tensors
        # emb's strides: AccumulateGrad keeps it
        return _library.scatter_rows(g.contiguous(), index, emb).to(emb.dtype), None


def pixel_rows_at(emb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(M, D) rows of the (B, D, h, w) map ``emb`` at flat pixel indices ``index`` (M,) (-1 rows
    read pixel 0 and get no gradient), differentiable; no copy of the map."""
    return _PixelRows.apply(emb, index)


def philox(counter: torch.Tensor, seed: int, stream: int = 0, *, backend: str = "auto"):
    """Philox4x32-10 words for counters (counter, stream, 0, 0) under key ``seed``:
    ``counter.shape + (4,)`` int64 in [0, 2^32). Identical on every backend ("reference": torch
    integer ops; "triton": the in-kernel generator; "native": the compiled extension, C++ on CPU
    tensors)."""
    be = resolve_backend(backend, counter.device, "philox", ("reference", "triton", "native"))
    if be == "reference":
        return philox4x32(counter, seed, stream)
    with _scope(be, counter.device):
        return _library.philox(counter, seed, stream)


def class_means(emb: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                backend: str = "auto", cross_rank: bool = False):
    """Class sums, counts and means of pixel embeddings (no gradient: statistics).
    cross_rank: under torch.distributed, sums and counts all-reduced over the ranks (the
    statistics of the concatenated batch, the same on every rank).

    emb: (B, D, h, w) map or (P, D) rows; labels: (P,) int class per row, -1 = ignored.
    Returns (sums (C, D), counts (C,) int64, means (C, D)) in float32 (float64 for float64 emb);
    the mean of an absent class is zero. Deterministic on every backend."""
    P = _check_pool("class_means", "emb", emb)
    _check_labels("class_means", labels, P, emb.device)
    check_positive_int("class_means", "num_classes", num_classes)
    be = resolve_backend(backend, emb.device, "class_means", NATIVE)
    with torch.no_grad():
        if be != "reference":
            with _scope(be, emb.device):
                sums, counts = class_stats(emb, labels, num_classes)
        else:
            rows = emb if emb.dim() == 2 else cm.pixel_rows(emb)
            rows = rows.detach().to(torch.promote_types(emb.dtype, torch.float32))
            sums, counts = rc.class_sums(rows, labels, num_classes)
        if cross_rank:
            sums, counts = dist.class_stats(sums, counts, op="class_means")
        return sums, counts, cm.class_means_from_sums(sums, counts)


def sample_hard_queries(lab: torch.Tensor, hard: torch.Tensor, num_classes: int,
                        num_queries: int, seed: int, *, backend: str = "auto"):
    """Confidence-based hard queries: for every class c, ``num_queries`` pixels uniform with
    replacement among the pixels of class c marked hard (query (c, q) uses counter c*Q + q of
    stream STREAM_QUERY). Returns (C, Q) int32 pixel indices, -1 for classes without hard pixels."""
    check_tensor("sample_hard_queries", "lab", lab, ndim=1, dtypes=INT_DTYPES, kind="(P,)")
    check_tensor("sample_hard_queries", "hard", hard, ndim=1, dtypes=(torch.bool,),
                 device=lab.device, kind="(P,)", like="lab")
    if hard.shape != lab.shape:
        raise ValueError(f"sample_hard_queries: hard must have the shape of lab "
                         f"{tuple(lab.shape)}, got {tuple(hard.shape)}")
    check_index_space("sample_hard_queries", "lab", lab.shape[0])
    check_positive_int("sample_hard_queries", "num_classes", num_classes)
    check_positive_int("sample_hard_queries", "num_queries", num_queries)
    if num_classes * num_queries >= 2**31:
        raise ValueError("sample_hard_queries: num_classes x num_queries must be below 2^31 "
                         "(counter space)")
    be = resolve_backend(backend, lab.device, "sample_hard_queries", NATIVE)
    if be != "reference":
        with _scope(be, lab.device):
            return hard_queries(lab, hard, num_classes, num_queries, seed)
    order, offsets, counts = cm.group_by_class(torch.where(hard, lab, -1), num_classes)
    rows = torch.arange(num_classes, device=lab.device)
    return reference_groups_sample(order, offsets, counts, rows, num_queries, seed, STREAM_QUERY)


def sample_in_groups(order, offsets, counts, row_group, per_row: int, seed: int, stream: int, *,
                     backend: str = "auto"):
    """For row r, ``per_row`` items uniform with replacement within group row_group[r] >= 0 of
    a grouping (order, offsets, counts): item order[offsets[g] + floor(u counts[g])] with u from
    counter r * per_row + i of Philox ``stream``. (R, per_row) int32, -1 where the group is
    empty or row_group[r] is -1 (no group). The sampler under hard queries (a group a class) and U2PL's queues (a group a
    class's filled slots)."""
    check_index_space("sample_in_groups", "order", order.numel())
    be = resolve_backend(backend, order.device, "sample_in_groups", NATIVE)
    if be != "reference":
        with _scope(be, order.device):
            return groups_sample(order, offsets, counts, row_group, per_row, seed, stream)
    return reference_groups_sample(order, offsets, counts, row_group, per_row, seed, stream)


def reference_groups_sample(order, offsets, counts, row_group, per_row, seed, stream):
    """sample_in_groups' reference: torch's Philox and the pick within a group."""
    R = row_group.numel()
    r = philox4x32(torch.arange(R, device=order.device)[:, None] * per_row
                   + torch.arange(per_row, device=order.device), seed, stream)
    grp = row_group.to(torch.int64)[:, None].expand(-1, per_row)
    ok = grp >= 0
    grp = grp.clamp(min=0)                  # a row without a group (-1) reads group 0, discarded
    pix = rc.pick_in_class(order, offsets, counts, grp, r[..., 0])
    return torch.where(ok & (counts[grp] > 0), pix, -1).to(torch.int32)


def sample_negatives(row_class: torch.Tensor, cdf: torch.Tensor, lab: torch.Tensor,
                     num_negatives: int, seed: int, *, backend: str = "auto",
                     check_values: bool | None = None):
    """Relation-weighted negatives: for row r of class c = row_class[r] (-1: none) draw
    ``num_negatives`` pixels; each one's class j ~ cdf row c (pixcon.reference.common.relation_cdf)
    and the pixel uniform with replacement within class j (counter r*N + n of stream
    STREAM_NEGATIVE, word 0 for the class and word 1 for the pixel). Returns (R, N) int32,
    -1 where the row has no class or no possible negative.
    A row class outside [-1, C) is an error on every backend (check_values: the host check and
    its message, else a device-side assert).
    """
    check_tensor("sample_negatives", "lab", lab, ndim=1, dtypes=INT_DTYPES, kind="(P,)")
    check_tensor("sample_negatives", "row_class", row_class, ndim=1, dtypes=INT_DTYPES,
                 device=lab.device, kind="(R,)", like="lab")
    check_tensor("sample_negatives", "cdf", cdf, ndim=2, dtypes=(torch.int64,), device=lab.device,
                 kind="(C, C)", like="lab")
    if cdf.shape[0] != cdf.shape[1]:
        raise ValueError(f"sample_negatives: cdf must be square (C, C), got {tuple(cdf.shape)}")
    check_index_space("sample_negatives", "lab", lab.shape[0])
    check_positive_int("sample_negatives", "num_negatives", num_negatives)
    if row_class.numel() * num_negatives >= 2**31:
        raise ValueError("sample_negatives: rows x num_negatives must be below 2^31 "
                         "(counter space)")
    # a row class past the table would read past it on the kernels: guarded on every backend
    guard_index_range("sample_negatives", "row_class", row_class, cdf.shape[0], "the cdf's classes",
                      check_values)
    be = resolve_backend(backend, lab.device, "sample_negatives", NATIVE)
    if be != "reference":
        with _scope(be, lab.device):
            return relation_negatives(row_class, cdf, lab, num_negatives, seed)
    C = cdf.shape[0]
    order, offsets, counts = cm.group_by_class(lab, C)
    R, N = row_class.numel(), num_negatives
    r = philox4x32(torch.arange(R, device=lab.device)[:, None] * N
                   + torch.arange(N, device=lab.device), seed, STREAM_NEGATIVE)
    c = row_class.to(torch.int64).clamp(min=0)
    j = torch.searchsorted(cdf[c].contiguous(), r[..., 0].contiguous(), right=True)  # (R, N)
    ok = (row_class[:, None] >= 0) & (j < C)
    j = j.clamp(max=C - 1)
    ok &= counts[j] > 0
    pix = rc.pick_in_class(order, offsets, counts, j, r[..., 1])
    return torch.where(ok, pix, -1).to(torch.int32)


def sparse_infonce(pool: torch.Tensor, q_idx: torch.Tensor, pos_idx: torch.Tensor,
                   neg_idx: torch.Tensor, *, temperature: float, pos_pool: torch.Tensor | None = None,
                   key_grad: bool = False, keys: torch.Tensor | None = None,
                   backend: str = "auto", check_values: bool | None = None):
    """Per-query InfoNCE with cosine logits over index sets, never an M x N x D tensor.

    pool: (P, D) rows or a (B, D, h, w) map whose rows are its pixels; queries q_idx (M,) and
    negatives neg_idx (M, N) are rows of pool (-1 = absent), positives pos_idx (M,) are rows of
    pos_pool (default: pool). loss_m = logsumexp([s_pos, s_neg...]) - s_pos with
    s = cos / temperature; 0 where q_idx is -1. Gradients reach the queries only unless
    key_grad=True, which also sends them to the negatives and positives (the keys).
    keys: (S, D) rows, pool's dtype, that neg_idx indexes instead of pool (a queue bank, as
    U2PL's); they get no gradient (key_grad must be False).
    check_values: check that every index is in range (a host sync; default on for CPU tensors,
    off for CUDA, env PIXCON_CHECK_VALUES): an out-of-range gather on a GPU reads other memory.
    Returns (M,) float32 (float64 for float64 pool)."""
    P = _check_pool("sparse_infonce", "pool", pool)
    D = pool.shape[1]
    dev = pool.device
    check_tensor("sparse_infonce", "q_idx", q_idx, ndim=1, dtypes=IDX, device=dev, kind="(M,)",
                 like="pool")
    M = q_idx.shape[0]
    check_tensor("sparse_infonce", "pos_idx", pos_idx, ndim=1, dtypes=IDX, device=dev,
                 kind="(M,)", like="pool")
    check_tensor("sparse_infonce", "neg_idx", neg_idx, ndim=2, dtypes=IDX, device=dev,
                 kind="(M, N)", like="pool")
    if pos_idx.shape[0] != M or neg_idx.shape[0] != M:
        raise ValueError(f"sparse_infonce: q_idx, pos_idx and neg_idx must have the same number "
                         f"of rows M, got {M}, {pos_idx.shape[0]}, {neg_idx.shape[0]}")
    check_temperature("sparse_infonce", "temperature", temperature)
    if pos_pool is None:
        pos_pool = pool if pool.dim() == 2 else cm.pixel_rows(pool)
    else:
        check_tensor("sparse_infonce", "pos_pool", pos_pool, ndim=2, dtypes=FLOAT_DTYPES,
                     device=dev, kind="(R, D)", like="pool")
        if pos_pool.shape[1] != D:
            raise ValueError(f"sparse_infonce: pos_pool rows must have D = {D} like pool, got "
                             f"{pos_pool.shape[1]}")
    S, key_name = P, "pool"
    if keys is not None:
        check_tensor("sparse_infonce", "keys", keys, ndim=2, dtypes=(pool.dtype,), device=dev,
                     kind="(S, D) in pool's dtype", like="pool")
        if keys.shape[1] != D:
            raise ValueError(f"sparse_infonce: keys rows must have D = {D} like pool, got "
                             f"{keys.shape[1]}")
        if key_grad:
            raise ValueError("sparse_infonce: keys get no gradient; key_grad must be False with "
                             "a separate key pool")
        S, key_name = keys.shape[0], "keys"
    check_index_space("sparse_infonce", "pool", P)
    check_index_space("sparse_infonce", key_name, S)
    guard_index_range("sparse_infonce", "q_idx", q_idx, P, "pool", check_values)
    guard_index_range("sparse_infonce", "neg_idx", neg_idx, S, key_name, check_values)
    guard_index_range("sparse_infonce", "pos_idx", pos_idx, pos_pool.shape[0], "pos_pool",
                      check_values)
    be = resolve_backend(backend, dev, "sparse_infonce", NATIVE)
    if be != "reference":
        with _scope(be, dev):
            return infonce(pool, q_idx, pos_idx, neg_idx, temperature, pos_pool, key_grad, keys)
    dt = torch.promote_types(pool.dtype, torch.float32)
    rows = (pool if pool.dim() == 2 else cm.pixel_rows(pool)).to(dt)
    if keys is not None:
        keys = keys.detach().to(dt)
    else:
        keys = rows if key_grad else rows.detach()
    pos = pos_pool.to(dt) if key_grad else pos_pool.detach().to(dt)
    a = cm.normalize(rows[q_idx.long().clamp(min=0)])
    p = cm.normalize(pos[pos_idx.long().clamp(min=0)])
    k = cm.normalize(keys[neg_idx.long().clamp(min=0)])
    s_neg = torch.einsum("md,mnd->mn", a, k).masked_fill(neg_idx < 0, float("-inf"))
    logits = torch.cat([(a * p).sum(-1, keepdim=True), s_neg], dim=1) / temperature
    loss = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return torch.where(q_idx >= 0, loss, 0.0)


__all__ = ["pixel_rows_at", "philox", "class_means", "sample_hard_queries", "sample_negatives", "sparse_infonce",
           "draw_seed"]
