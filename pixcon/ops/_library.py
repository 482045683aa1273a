"""Every fused primitive as one ``pixcon::`` op (torch.library), the way torchvision registers
``roi_align``: the schema here, with its CUDA kernel (the Triton launcher; pixcon_kernels is
imported lazily: TRITON_INTERPRET must be set before triton is imported, and pixcon must import
without triton), one fake kernel and one autograd registration beside it; the CPU kernel comes
from C++ (csrc/cpu/*.cpp, ``TORCH_LIBRARY_IMPL(pixcon, CPU)``). torch.compile traces the ops
without graph breaks and opcheck tests each one.

One name per op, a kernel per device: a caller never names a backend here. The public loss
chooses it once (``kernels(backend, device)``): "native" is the CPU kernel of each op, "triton"
on CUDA tensors the CUDA kernel, and "triton" on CPU tensors (the tests' interpreter) the same
Triton functions registered over the CPU key for the duration of one scope
(:func:`triton_on_cpu`). The ops without a CPU kernel (ReCo's one-pass kernel, the ragged EDT)
are for CUDA tensors and for that scope. The CUDA kernels of ``sample_anchors``, ``class_ranks``
and ``group_columns`` are torch code, not Triton: inside that scope CPU tensors run it too."""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch import Tensor


from ..core.common import EPS   # each norm clamped to at least EPS (the C++ kernels' too)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pool_size(pool: Tensor):
    if pool.dim() == 2:
        return pool.shape[0], pool.shape[1]
    B, D, h, w = pool.shape
    return B * h * w, D


# --- counter-based random numbers ------------------------------------------------------------
@torch.library.custom_op("pixcon::philox", mutates_args=(), device_types="cuda")
def philox(counter: Tensor, seed: int, stream: int) -> Tensor:
    from pixcon_kernels.rng import philox as launch
    return launch(counter, seed, stream)


@philox.register_fake
def _(counter, seed, stream):
    return counter.new_empty(counter.shape + (4,), dtype=torch.int64)


# --- distance transform ----------------------------------------------------------------------
@torch.library.custom_op("pixcon::edt", mutates_args=(), device_types="cuda")
def edt(labels: Tensor, background: int, squared: bool) -> Tensor:
    """The batched exact EDT (Triton); labels are read in their own dtype. float32 distances, or
    squared distances (exact below 2^24: the losses' maps)."""
    from pixcon_kernels.edt import distance_transform as launch
    return launch(labels, background, squared)


@edt.register_fake
def _(labels, background, squared):
    return labels.new_empty(labels.shape, dtype=torch.float32)


@torch.library.custom_op("pixcon::edt_exact", mutates_args=(), device_types="cuda")
def edt_exact(labels: Tensor, background: int) -> Tensor:
    """Squared distances in float64, exact integers (the public squared=True). A second op, not
    a flag of pixcon::edt, so that each op's output dtype is fixed (Inductor with torch 2.13
    misread a float64 pixcon::edt output as float32 inside a Contextrast graph)."""
    from pixcon_kernels.edt import distance_transform as launch
    return launch(labels, background, True, exact=True)


@edt_exact.register_fake
def _(labels, background):
    return labels.new_empty(labels.shape, dtype=torch.float64)


@torch.library.custom_op("pixcon::edt_ragged", mutates_args=(), device_types="cuda")
def edt_ragged(flat: Tensor, shapes: list[int], background: int, squared: bool) -> Tensor:
    """Maps of different sizes packed one after another in ``flat`` (shapes: N, H, W per
    map set, flattened), transformed in one launch per pass."""
    from pixcon_kernels.edt import distance_transform_ragged as launch
    it = iter(shapes)
    return launch(flat, list(zip(it, it, it)), background, squared)


@edt_ragged.register_fake
def _(flat, shapes, background, squared):
    return flat.new_empty(flat.shape, dtype=torch.float32)


# --- class sums ------------------------------------------------------------------------------
@torch.library.custom_op("pixcon::class_sums", mutates_args=(), device_types="cuda")
def class_sums(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    from pixcon_kernels.segment import class_sums as launch
    return launch(x, labels, num_classes)


@class_sums.register_fake
def _(x, labels, num_classes):
    _, D = _pool_size(x)
    return (x.new_empty(num_classes, D, dtype=_acc(x.dtype)),
            x.new_empty(num_classes, dtype=torch.int64))


# --- samplers --------------------------------------------------------------------------------
@torch.library.custom_op("pixcon::sample_in_groups", mutates_args=(), device_types="cuda")
def sample_in_groups(order: Tensor, offsets: Tensor, counts: Tensor, row_group: Tensor,
                     per_row: int, seed: int, stream: int) -> Tensor:
    from pixcon_kernels.sampling import sample_in_groups as launch
    return launch(order, offsets, counts, row_group, per_row, seed, stream)


@sample_in_groups.register_fake
def _(order, offsets, counts, row_group, per_row, seed, stream):
    return order.new_empty(row_group.numel(), per_row, dtype=torch.int32)


@torch.library.custom_op("pixcon::sample_negatives", mutates_args=(), device_types="cuda")
def sample_negatives(row_class: Tensor, cdf: Tensor, order: Tensor, offsets: Tensor,
                     counts: Tensor, per_row: int, seed: int, stream: int) -> Tensor:
    from pixcon_kernels.sampling import sample_negatives as launch
    return launch(row_class, cdf, order, offsets, counts, per_row, seed, stream)


@sample_negatives.register_fake
def _(row_class, cdf, order, offsets, counts, per_row, seed, stream):
    return order.new_empty(row_class.numel(), per_row, dtype=torch.int32)


# --- ContrastiveSeg's hard anchors ------------------------------------------------------------
@torch.library.custom_op("pixcon::sample_anchors", mutates_args=(), device_types="cuda")
def sample_anchors(gt: Tensor, pred: Tensor, max_samples: int, max_views: int,
                   seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(index (M,), labels (M,), T (), n_view ()) int64: pixcon.ops.contrastiveseg's sampler.
    Its CUDA kernel is the torch form (two stable sorts; no host sync), its CPU kernel
    compiled (csrc/cpu/hard_anchors.cpp)."""
    from .contrastiveseg import sample_anchors_torch
    return sample_anchors_torch(gt, pred, max_samples=max_samples, max_views=max_views,
                                seed=seed)


@sample_anchors.register_fake
def _(gt, pred, max_samples, max_views, seed):
    one = gt.new_empty((max_samples,), dtype=torch.int64)
    return one, torch.empty_like(one), one.new_empty(()), one.new_empty(())


# --- U2PL's class ranks and class groups ----------------------------------------------------
@torch.library.custom_op("pixcon::class_ranks", mutates_args=(), device_types="cuda")
def class_ranks(prob: Tensor) -> Tensor:
    """(P, C) int64: each class's position in its pixel's descending order of prob (P, C), ties
    in class order. The CUDA kernel is the torch form (pixcon.core.u2pl.ranks: a stable sort),
    the CPU kernel compiled (csrc/cpu/groups.cpp)."""
    from ..core.u2pl import ranks
    return ranks(prob)


@class_ranks.register_fake
def _(prob):
    return prob.new_empty(prob.shape, dtype=torch.int64)


@torch.library.custom_op("pixcon::group_columns", mutates_args=(), device_types="cuda")
def group_columns(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(order (C P,), offsets (C,), counts (C,)) int64 grouping the rows of a (P, C) bool mask
    by column (pixcon.core.u2pl.group_columns, its torch form and the CUDA kernel; the CPU
    kernel is compiled, the same permutation)."""
    from ..core.u2pl import group_columns as torch_form
    return torch_form(mask)


@group_columns.register_fake
def _(mask):
    P, C = mask.shape
    return (mask.new_empty(P * C, dtype=torch.int64), mask.new_empty(C, dtype=torch.int64),
            mask.new_empty(C, dtype=torch.int64))


# --- queue-bank push (U2PL) ------------------------------------------------------------------
@torch.library.custom_op("pixcon::bank_push", mutates_args=("keys",), device_types="cuda")
def bank_push(keys: Tensor, rows: Tensor, keep: Tensor, slot: Tensor) -> None:
    """keys[slot[c, p]] = rows[p] wherever keep[c, p], with no host sync (the Triton push).
    rows: (P, D), or a (B, D, HW) channels-first map read in place (pixel p = b HW + s), on
    both kernels."""
    from pixcon_kernels.bank import bank_push as launch
    launch(keys, rows, keep, slot)


@bank_push.register_fake
def _(keys, rows, keep, slot):
    return None


# --- sparse InfoNCE --------------------------------------------------------------------------
@torch.library.custom_op("pixcon::sparse_infonce", mutates_args=(), device_types="cuda")
def sparse_infonce(pool: Tensor, pos_pool: Tensor, q_idx: Tensor, pos_idx: Tensor,
                   neg_idx: Tensor, temperature: float, key_grad: bool, keep_direction: bool,
                   keys: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, v, cbar) per query. keys: the negatives' rows when they are not pool's (no
    gradient). keep_direction (without key_grad): also keep each query's softmax-weighted mean
    unit key v (M, D) and mean cosine cbar (M,), so that the backward is a scale and a scatter;
    else both are empty and the backward recomputes."""
    from pixcon_kernels.infonce import infonce_forward
    direction = keep_direction and not key_grad
    loss, lse, v, cbar = infonce_forward(pool, pos_pool, q_idx, pos_idx, neg_idx, temperature,
                                         keys=keys, keep_direction=direction)
    if not direction:
        v, cbar = loss.new_empty(0), loss.new_empty(0)
    return loss, lse, v, cbar


@sparse_infonce.register_fake
def _(pool, pos_pool, q_idx, pos_idx, neg_idx, temperature, key_grad, keep_direction, keys=None):
    M, D, dt = neg_idx.shape[0], pool.shape[1], _acc(pool.dtype)
    direction = keep_direction and not key_grad
    return (pool.new_empty(M, dtype=dt), pool.new_empty(M, dtype=dt),
            pool.new_empty((M, D) if direction else (0,), dtype=dt),
            pool.new_empty(M if direction else 0, dtype=dt))


@torch.library.custom_op("pixcon::sparse_infonce_backward", mutates_args=(), device_types="cuda")
def sparse_infonce_backward(grad: Tensor, pool: Tensor, pos_pool: Tensor, q_idx: Tensor,
                            pos_idx: Tensor, neg_idx: Tensor, lse: Tensor, temperature: float,
                            key_grad: bool, keys: Optional[Tensor] = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """(dq (M, D), dkeys (pool's shape), dpos (pos_pool's shape)) of sum_m grad[m] * loss[m],
    in the accumulation dtype; dkeys and dpos are empty unless key_grad. The autograd formula
    adds dq into dkeys at the query rows."""
    from pixcon_kernels.infonce import infonce_backward
    dq, dk, dpos = infonce_backward(grad, pool, pos_pool, q_idx, pos_idx, neg_idx, lse,
                                    temperature, key_grad, keys=keys)
    empty = dq.new_empty(0)
    return dq, (empty if dk is None else dk), (empty if dpos is None else dpos)


@sparse_infonce_backward.register_fake
def _(grad, pool, pos_pool, q_idx, pos_idx, neg_idx, lse, temperature, key_grad, keys=None):
    M, D, dt = neg_idx.shape[0], pool.shape[1], _acc(pool.dtype)
    return (pool.new_empty(M, D, dtype=dt),
            pool.new_empty(pool.shape if key_grad else (0,), dtype=dt),
            pool.new_empty(pos_pool.shape if key_grad else (0,), dtype=dt))


def _infonce_setup(ctx, inputs, output):
    pool, pos_pool, q_idx, pos_idx, neg_idx, temperature, key_grad, keep_direction, keys = inputs
    ctx.save_for_backward(pool, pos_pool, q_idx, pos_idx, neg_idx, keys, *output)
    ctx.temperature, ctx.key_grad = temperature, key_grad
    ctx.direction = keep_direction and not key_grad
    _remember_scope(ctx)


def _infonce_backward(ctx, grad_loss, _glse, _gv, _gc):
    pool, pos_pool, q_idx, pos_idx, neg_idx, keys, loss, lse, v, cbar = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    if ctx.direction:                # the forward kept each query's direction: scale, scatter
        dq = _query_grads_from_direction(grad_loss, pool, pos_pool, q_idx, pos_idx, loss, lse,
                                         v, cbar, ctx.temperature, EPS)
    else:
        with _scope(ctx):
            dq, dk, dpos = sparse_infonce_backward(grad_loss, pool, pos_pool, q_idx, pos_idx,
                                                   neg_idx, lse, ctx.temperature, ctx.key_grad,
                                                   keys)
    if not ctx.key_grad:
        return (_scatter(dq, q_idx, pool).to(pool.dtype),) + (None,) * 8
    dpool = _add_query_grads(dk, dq, q_idx, pool)
    return (dpool.to(pool.dtype), dpos.to(pos_pool.dtype)) + (None,) * 7


torch.library.register_autograd("pixcon::sparse_infonce", _infonce_backward,
                                setup_context=_infonce_setup)


def _pool_rows(pool, idx):
    """Rows idx (M,) of a (P, D) pool or pixels of a (B, D, h, w) one, as (M, D)."""
    if pool.dim() == 2:
        return pool[idx]
    h, w = pool.shape[2:]
    return pool.permute(0, 2, 3, 1)[idx // (h * w), (idx // w) % h, idx % w]


def _query_grads_from_direction(g, pool, pos_pool, q_idx, pos_idx, loss, lse, v, cbar, t, eps):
    """dL/da_m = g_m / (t |a_m|) ((v_m - p^_m) - (cbar_m - cos_0m) a^_m) from what the
    forward kept (v: softmax-weighted mean unit key, cbar: softmax-weighted mean cosine;
    cos_0 = t (lse - loss), the positive's cosine). (M, D); rows of absent queries are zero."""
    dt = v.dtype
    a = _pool_rows(pool, q_idx.clamp(min=0).long()).to(dt)
    a_inv = 1.0 / a.norm(dim=1, keepdim=True).clamp(min=eps)
    p = pos_pool[pos_idx.clamp(min=0).long()].to(dt)
    p_hat = p / p.norm(dim=1, keepdim=True).clamp(min=eps)
    cos0 = (lse - loss) * t
    coef = (g.to(dt) * (q_idx >= 0).to(dt))[:, None] * a_inv / t
    return coef * ((v - p_hat) - (cbar - cos0)[:, None] * (a * a_inv))


@torch.library.custom_op("pixcon::scatter_rows", mutates_args=())
def scatter_rows(rows: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """A zero map shaped and strided like ``like`` (B, D, h, w) in rows' dtype, with rows[m]
    (M, D) added at flat pixel index[m] (-1 skipped): the backward of a gather of pixel rows.
    One op, a kernel per device: this torch code serves every device, the CPU has a compiled
    kernel (csrc/cpu/scatter.cpp: pixel order within channel planes; here, row by row, each
    row's values lie h*w floats apart)."""
    return _index_put_rows(torch.zeros_like(like, dtype=rows.dtype), rows, index)


@scatter_rows.register_fake
def _(rows, index, like):
    return torch.empty_like(like, dtype=rows.dtype)


def _scatter(dq, q_idx, pool):
    """dpool of a fresh gradient: scatter_rows for a (B, D, h, w) pool, rows added into zeros
    for a (P, D) one."""
    if pool.dim() == 4:
        return scatter_rows(dq, q_idx, pool)
    return _add_query_grads(None, dq, q_idx, pool)


def _add_query_grads(dpool, dq, q_idx, pool):
    """dpool (or zeros of pool's shape) plus each query's gradient row dq[m] at row q_idx[m]
    (-1 rows skipped); rows of a (B, D, h, w) pool are its pixels. Bitwise the same at any
    thread count: on CPU a (P, D) pool takes ``index_add_`` (rows added in index order) and a
    map scatter_rows' compiled kernel (repeated pixels added in a fixed order); elsewhere
    ``index_put_(accumulate=True)``, which CUDA runs sorted (deterministic)."""
    if pool.device.type == "cpu" and pool.dim() == 2:
        dpool = torch.zeros_like(pool, dtype=dq.dtype) if dpool is None else dpool
        return dpool.index_add_(0, q_idx.clamp(min=0).to(torch.int64),
                                dq * (q_idx >= 0)[:, None])
    import pixcon
    if pool.device.type == "cpu" and pixcon.HAS_C:     # the compiled map scatter
        out = scatter_rows(dq, q_idx, pool)
        return out if dpool is None else dpool.add_(out)
    if dpool is None:        # in pool's own layout (channels-last stays so): autograd then takes
        dpool = torch.zeros_like(pool, dtype=dq.dtype)   # it as .grad instead of copying it
    return _index_put_rows(dpool, dq, q_idx)


def _index_put_rows(dpool, dq, q_idx):
    """dpool += dq[m] at row (pixel) q_idx[m], -1 skipped, with index_put_(accumulate=True)."""
    rows = dpool.permute(0, 2, 3, 1) if dpool.dim() == 4 else dpool   # (.., D) view of the rows
    valid = q_idx >= 0
    p = q_idx.clamp(min=0).to(torch.int64)
    dq = dq * valid[:, None]
    if dpool.dim() == 4:
        h, w = dpool.shape[2:]
        index = (p // (h * w), (p // w) % h, p % w)
    else:
        index = (p,)
    rows.index_put_(index, dq, accumulate=True)
    return dpool


# --- ReCo in one gather pass ------------------------------------------------------------------
@torch.library.custom_op("pixcon::rows_and_class_sums", mutates_args=(), device_types="cuda")
def rows_and_class_sums(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor,
                                                                                Tensor]:
    """One read of a (B, D, h, w) map: its pixels as contiguous (P, D) rows in its dtype, and
    the class sums (C, D) and counts (C,) (no gradient: the ReCo pre-pass)."""
    from pixcon_kernels.segment import class_sums as launch
    sums, counts, rows = launch(x, labels, num_classes, rows=True)
    return rows, sums, counts


@rows_and_class_sums.register_fake
def _(x, labels, num_classes):
    P, D = _pool_size(x)
    return (x.new_empty(P, D), x.new_empty(num_classes, D, dtype=_acc(x.dtype)),
            x.new_empty(num_classes, dtype=torch.int64))


@torch.library.custom_op("pixcon::reco_infonce", mutates_args=(), device_types="cuda")
def reco_infonce(emb: Tensor, rows: Tensor, means: Tensor, queries: Tensor, num_queries: int,
                 cdf: Tensor, order: Tensor, offsets: Tensor, counts: Tensor,
                 num_negatives: int, seed: int, stream: int,
                 temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ReCo's per-query InfoNCE with in-kernel negatives (pixcon_kernels.reco): (loss, lse,
    u, scale). ``rows`` are emb's pixels (rows_and_class_sums); emb itself is only the
    gradient's destination: d loss_m / d emb at pixel queries[m] = scale_m * u_m."""
    from pixcon_kernels.reco import reco_infonce as launch
    return launch(rows, means, queries, num_queries, cdf, order, offsets, counts, num_negatives,
                  seed, stream, temperature)


@reco_infonce.register_fake
def _(emb, rows, means, queries, num_queries, cdf, order, offsets, counts, num_negatives, seed,
      stream, temperature):
    M, dt = queries.shape[0], _acc(rows.dtype)
    return (rows.new_empty(M, dtype=dt), rows.new_empty(M, dtype=dt),
            rows.new_empty(M, rows.shape[1], dtype=dt), rows.new_empty(M, dtype=dt))


def _reco_setup(ctx, inputs, output):
    emb, queries = inputs[0], inputs[3]
    _, _, u, scale = output
    ctx.save_for_backward(emb, queries, u, scale)     # emb: the input itself, for its layout


def _reco_backward(ctx, grad_loss, _glse, _gu, _gs):
    emb, queries, u, scale = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(scale)
    dq = (grad_loss.to(u.dtype) * scale)[:, None] * u
    return (_scatter(dq, queries, emb).to(emb.dtype),) + (None,) * 12


torch.library.register_autograd("pixcon::reco_infonce", _reco_backward, setup_context=_reco_setup)


# --- class sums: gradient (anchors that are not detached) ------------------------------------
def _class_sums_setup(ctx, inputs, output):
    x, labels, num_classes = inputs
    ctx.save_for_backward(labels)
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype


def _class_sums_backward(ctx, grad_sums, grad_counts):
    (labels,) = ctx.saved_tensors
    valid = (labels >= 0) & (labels < grad_sums.shape[0])
    g = grad_sums[labels.clamp(min=0, max=grad_sums.shape[0] - 1).long()] * valid[:, None]
    if len(ctx.x_shape) == 4:                       # (B, D, h, w) map: rows are its pixels
        B, D, h, w = ctx.x_shape
        g = g.view(B, h, w, D).permute(0, 3, 1, 2)
    return g.to(ctx.x_dtype), None, None


torch.library.register_autograd("pixcon::class_sums", _class_sums_backward,
                                setup_context=_class_sums_setup)


# --- Contextrast: unit rows of the NCHW embedding, pixel x anchor contrast (L_PA) -----------
@torch.library.custom_op("pixcon::inv_norms", mutates_args=(), device_types="cuda")
def inv_norms(x: Tensor) -> Tensor:
    """(P,) 1 / max(|x_p|, eps) of the pixels of a (B, D, h, w) map or (P, D) rows."""
    from pixcon_kernels.anchor import inv_norms as launch
    return launch(x)


@inv_norms.register_fake
def _(x):
    return x.new_empty(_pool_size(x)[0], dtype=_acc(x.dtype))


@torch.library.custom_op("pixcon::unit_class_sums", mutates_args=(), device_types="cuda")
def unit_class_sums(x: Tensor, gt: Tensor, num_classes: int,
                    normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Class sums (C, D) and counts of the rows x_p * inv_p, and inv (P,): 1 / max(|x_p|, eps)
    (ones with ``normalize`` False); differentiable w.r.t. x through the normalisation. The CPU
    kernel makes all three in one read of x; the Triton kernels in two (inv_norms, then the
    scaled class sums)."""
    from pixcon_kernels.anchor import inv_norms as norms
    from pixcon_kernels.segment import class_sums as launch
    inv = norms(x) if normalize else \
        torch.ones(_pool_size(x)[0], dtype=_acc(x.dtype), device=x.device)
    return (*launch(x, gt, num_classes, scale=inv), inv)


@unit_class_sums.register_fake
def _(x, gt, num_classes, normalize):
    P, D = _pool_size(x)
    return (x.new_empty(num_classes, D, dtype=_acc(x.dtype)),
            x.new_empty(num_classes, dtype=torch.int64), x.new_empty(P, dtype=_acc(x.dtype)))


@torch.library.custom_op("pixcon::unit_class_sums_backward", mutates_args=(), device_types="cuda")
def unit_class_sums_backward(grad_sums: Tensor, x: Tensor, inv: Tensor, gt: Tensor,
                             normalize: bool) -> Tensor:
    from pixcon_kernels.anchor import unit_sums_backward
    return unit_sums_backward(grad_sums, x, inv, gt, normalize).to(x.dtype)


@unit_class_sums_backward.register_fake
def _(grad_sums, x, inv, gt, normalize):
    return torch.empty_like(x)


def _unit_sums_setup(ctx, inputs, output):
    x, gt, num_classes, normalize = inputs
    ctx.save_for_backward(x, output[2], gt)
    ctx.normalize = normalize
    _remember_scope(ctx)


def _unit_sums_backward(ctx, grad_sums, _grad_counts, _grad_inv):
    x, inv, gt = ctx.saved_tensors
    if grad_sums is None:
        return None, None, None, None
    with _scope(ctx):
        dx = unit_class_sums_backward(grad_sums, x, inv, gt, ctx.normalize)
    return dx, None, None, None


torch.library.register_autograd("pixcon::unit_class_sums", _unit_sums_backward,
                                setup_context=_unit_sums_setup)


@torch.library.custom_op("pixcon::anchor_contrast", mutates_args=(), device_types="cuda")
def anchor_contrast(x: Tensor, inv: Tensor, anchors: Tensor, gt: Tensor, negcls: Tensor,
                    temperature: float, only_own: bool, normalize: bool,
                    keep_logits: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-class loss sums, NL, sigmoid sums, logits S (P, C)) of the rows x_p * inv_p
    against the anchors. keep_logits: the Triton kernel keeps S for backward (never
    recomputed); the CPU kernel (csrc/cpu/anchor.cpp) keeps nothing of size P x C and
    recomputes its tiles in backward (S empty)."""
    if not keep_logits:
        raise ValueError("pixcon::anchor_contrast: the Triton kernel keeps its logits "
                         "(keep_logits=True)")
    from pixcon_kernels.anchor import anchor_forward
    return anchor_forward(x, inv, anchors, gt, negcls, temperature, only_own)


@anchor_contrast.register_fake
def _(x, inv, anchors, gt, negcls, temperature, only_own, normalize, keep_logits):
    C, dt = anchors.shape[0], _acc(x.dtype)
    P = _pool_size(x)[0]
    return (x.new_empty(C, dtype=dt), x.new_empty(C, dtype=dt), x.new_empty(C, dtype=dt),
            x.new_empty((P, C) if keep_logits else (0,), dtype=dt))


# The backward in two ops, so that a caller can fold the gradient of the layer's class sums (which
# needs the anchors' gradient of every layer first) into the one write of the pixels' gradient.
@torch.library.custom_op("pixcon::anchor_contrast_da", mutates_args=(), device_types="cuda")
def anchor_contrast_da(grad: Tensor, x: Tensor, inv: Tensor, anchors: Tensor, gt: Tensor,
                       negcls: Tensor, nl: Tensor, sigsum: Tensor, logits: Tensor,
                       temperature: float, only_own: bool,
                       normalize: bool) -> tuple[Tensor, Tensor]:
    """Backward pass A: (the anchors' gradient (C, D), what pass B reuses: an empty tensor on
    both devices). The Triton kernels reread the kept logits; the CPU kernel keeps nothing, pass
    B remakes its sparse weights (one anchor row a pixel, a product at BANE's negatives)."""
    from pixcon_kernels.anchor import anchor_da
    da = anchor_da(grad, x, inv, anchors, gt, negcls, nl, sigsum, logits, temperature, only_own)
    return da.to(anchors.dtype), x.new_empty(0, dtype=_acc(x.dtype))


@anchor_contrast_da.register_fake
def _(grad, x, inv, anchors, gt, negcls, nl, sigsum, logits, temperature, only_own, normalize):
    return torch.empty_like(anchors), x.new_empty(0, dtype=_acc(x.dtype))


@torch.library.custom_op("pixcon::anchor_contrast_dx", mutates_args=(), device_types="cuda")
def anchor_contrast_dx(grad: Tensor, x: Tensor, inv: Tensor, anchors: Tensor, gt: Tensor,
                       negcls: Tensor, nl: Tensor, sigsum: Tensor, logits: Tensor, kept: Tensor,
                       dsums: Tensor, temperature: float, only_own: bool,
                       normalize: bool) -> Tensor:
    """Backward pass B: the gradient w.r.t. x of the anchor terms and, given dsums (C, D) (empty:
    none), of the class sums of x's unit rows by gt, written once."""
    from pixcon_kernels.anchor import anchor_dx
    return anchor_dx(grad, x, inv, anchors, gt, negcls, nl, sigsum, logits, dsums, temperature,
                     only_own, normalize).to(x.dtype)


@anchor_contrast_dx.register_fake
def _(grad, x, inv, anchors, gt, negcls, nl, sigsum, logits, kept, dsums, temperature, only_own,
      normalize):
    return torch.empty_like(x)


def anchor_contrast_grads(grad, x, inv, anchors, gt, negcls, nl, sigsum, logits, args,
                          dsums_of=None):
    """(dx, da) of sum_c grad[c] * loss_sum[c]: pass A, then dsums_of(da) (the gradient of the
    layer's class sums, or None), then pass B. args: (temperature, only_own, normalize)."""
    da, kept = anchor_contrast_da(grad, x, inv, anchors, gt, negcls, nl, sigsum, logits, *args)
    dsums = dsums_of(da) if dsums_of is not None else None
    if dsums is None:
        dsums = x.new_empty(0, dtype=_acc(x.dtype))
    dx = anchor_contrast_dx(grad, x, inv, anchors, gt, negcls, nl, sigsum, logits, kept, dsums,
                            *args)
    return dx, da


def _anchor_setup(ctx, inputs, output):
    x, inv, anchors, gt, negcls, temperature, only_own, normalize, _keep = inputs
    _, nl, sigsum, logits = output
    ctx.save_for_backward(x, inv, anchors, gt, negcls, nl, sigsum, logits)
    ctx.args = (temperature, only_own, normalize)
    _remember_scope(ctx)


def _anchor_backward(ctx, grad_loss, grad_nl, grad_sig, grad_logits):
    x, inv, anchors, gt, negcls, nl, sigsum, logits = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(nl)
    with _scope(ctx):
        dx, da = anchor_contrast_grads(grad_loss, x, inv, anchors, gt, negcls, nl, sigsum,
                                       logits, ctx.args)
    return dx, None, da, None, None, None, None, None, None


torch.library.register_autograd("pixcon::anchor_contrast", _anchor_backward,
                                setup_context=_anchor_setup)


# --- pixcon::tiled_contrast: the tiled supervised contrast (ContrastiveSeg, dense, CAC) -----
# One op, a kernel per device, the way torchvision registers roi_align: the schema here, the CPU
# kernel in C++ (csrc/cpu/tiled.cpp, TORCH_LIBRARY_IMPL(pixcon, CPU)), the CUDA kernel the
# Triton launcher below, one fake kernel, one autograd registration. Rows come in any order;
# each kernel sorts them by label itself. Under the Triton interpreter the CUDA kernel also
# serves CPU tensors inside ``triton_on_cpu()`` (the tests' one scoped switch).
@torch.library.custom_op("pixcon::tiled_contrast", mutates_args=(), device_types="cuda")
def tiled_contrast_op(a: Tensor, ya: Tensor, k: Optional[Tensor], yk: Optional[Tensor],
                      temperature: float, positives: bool, block: list[int],
                      precision: str = "fp32") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(terms, npos int64, nl, w), per anchor in the callers' order; k, yk None: in-batch (keys
    = anchors, r not its own positive); positives=False: only nl (terms, npos, w zero). block:
    [BLOCK_M, BLOCK_N] tile sizes of the CPU kernel ([] = its own choice; Triton ignores it).
    precision: of the products for fp32 inputs on tensor cores, "fp32" (3xTF32), "tf32" or
    "bf16" (pixcon.ops._common.PRECISIONS); the CPU kernel multiplies in fp32 whatever it
    says."""
    from pixcon_kernels.tiled import tiled_forward
    in_batch = k is None
    pa, a_s, ya_s, _, k_s, yk_s = _by_label(a, ya, k, yk)
    terms, npos, nl, w = tiled_forward(a_s, ya_s, k_s, yk_s, temperature, in_batch, positives,
                                       precision)
    return (_unsort(terms, pa), _unsort(npos.to(torch.int64), pa), _unsort(nl, pa),
            _unsort(w, pa))


@torch.library.custom_op("pixcon::tiled_contrast_backward", mutates_args=(), device_types="cuda")
def tiled_contrast_backward(grad: Tensor, grad_nl: Tensor, a: Tensor, ya: Tensor,
                            k: Optional[Tensor], yk: Optional[Tensor], nl: Tensor, w: Tensor,
                            npos: Tensor, temperature: float, key_grad: bool, block: list[int],
                            precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """(da, dk) of sum(grad * terms + grad_nl * nl); dk is empty unless key_grad (in-batch: da
    holds both sides)."""
    from pixcon_kernels.tiled import tiled_backward
    in_batch = k is None
    pa, a_s, ya_s, pk, k_s, yk_s = _by_label(a, ya, k, yk)
    da, dk = tiled_backward(grad[pa], a_s, ya_s, k_s, yk_s, nl[pa], w[pa], npos[pa].to(torch.int32),
                            temperature, in_batch, key_grad and not in_batch, grad_nl[pa],
                            precision)
    dk = a.new_empty(0) if dk is None else _unsort(dk, pk).to(k.dtype)
    return _unsort(da, pa).to(a.dtype), dk


def _by_label(a, ya, k, yk):
    """(pa, a, ya, pk, k, yk) with rows stably sorted by label; k None (in-batch): the keys are
    the sorted anchors."""
    pa = torch.sort(ya, stable=True).indices
    a_s, ya_s = a[pa], ya[pa]
    if k is None:
        return pa, a_s, ya_s, pa, a_s, ya_s
    pk = torch.sort(yk, stable=True).indices
    return pa, a_s, ya_s, pk, k[pk], yk[pk]


def _unsort(x, perm):
    out = torch.empty_like(x)
    out[perm] = x
    return out


@tiled_contrast_op.register_fake
def _(a, ya, k, yk, temperature, positives, block, precision="fp32"):
    M, dt = a.shape[0], _acc(a.dtype)
    return (a.new_empty(M, dtype=dt), a.new_empty(M, dtype=torch.int64),
            a.new_empty(M, dtype=dt), a.new_empty(M, dtype=dt))


@tiled_contrast_backward.register_fake
def _(grad, grad_nl, a, ya, k, yk, nl, w, npos, temperature, key_grad, block, precision="fp32"):
    return torch.empty_like(a), (torch.empty_like(k) if key_grad and k is not None
                                 else a.new_empty(0))


def _tiled_setup(ctx, inputs, output):
    a, ya, k, yk, temperature, positives, block, precision = inputs
    _, npos, nl, w = output
    ctx.save_for_backward(a, ya, k, yk, nl, w, npos)
    ctx.temperature, ctx.block, ctx.precision = temperature, block, precision
    _remember_scope(ctx)


def _tiled_backward(ctx, g_terms, g_npos, g_nl, g_w):
    a, ya, k, yk, nl, w, npos = ctx.saved_tensors
    g_terms = torch.zeros_like(nl) if g_terms is None else g_terms
    g_nl = torch.zeros_like(nl) if g_nl is None else g_nl
    key_grad = k is not None and ctx.needs_input_grad[2]
    with _scope(ctx):
        da, dk = tiled_contrast_backward(g_terms, g_nl, a, ya, k, yk, nl, w, npos,
                                         ctx.temperature, key_grad, ctx.block, ctx.precision)
    return da, None, (dk if key_grad else None), None, None, None, None, None


torch.library.register_autograd("pixcon::tiled_contrast", _tiled_backward,
                                setup_context=_tiled_setup)


_TRITON_ON_CPU = [False]
# The ops whose CUDA kernel is a Triton launcher (or, for sample_anchors, torch code on the Triton
# ops), in the order they are defined above.
_TRITON_OPS = (philox, edt, edt_exact, edt_ragged, class_sums, sample_in_groups,
               sample_negatives, sample_anchors, class_ranks, group_columns, bank_push, sparse_infonce, sparse_infonce_backward, rows_and_class_sums, reco_infonce,
               inv_norms, unit_class_sums, unit_class_sums_backward, anchor_contrast,
               anchor_contrast_da, anchor_contrast_dx, tiled_contrast_op, tiled_contrast_backward)


@contextlib.contextmanager
def triton_on_cpu():
    """Within this block every op's CPU tensors run its Triton kernels (under
    TRITON_INTERPRET=1): the Triton functions registered for the CPU key over the C++ kernels,
    which are back when the block ends. For the "triton" backend on a CPU machine (the tests).
    A forward run inside it runs its backward inside it too, wherever that is called."""
    if _TRITON_ON_CPU[0]:
        yield
        return
    with torch.library._scoped_library("pixcon", "IMPL") as lib, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for op in _TRITON_OPS:
            lib.impl(op._name, op._init_fn, "CPU")
        _TRITON_ON_CPU[0] = True
        try:
            yield
        finally:
            _TRITON_ON_CPU[0] = False


def kernels(backend: str, device: torch.device):
    """The scope a public loss runs its fused primitives in, once it has chosen ``backend``
    ("native" or "triton"): the ops' own kernel per device, or, for "triton" on CPU tensors,
    :func:`triton_on_cpu` (under torch.compile the registered kernels are traced as they are)."""
    if backend == "triton" and device.type == "cpu" and not torch.compiler.is_compiling():
        return triton_on_cpu()
    return contextlib.nullcontext()


def compiled_cpu(device: torch.device) -> bool:
    """Whether the ops run their compiled CPU kernels here (CPU tensors outside
    triton_on_cpu): for inputs shaped to a kernel's liking, never for a choice of method."""
    return device.type == "cpu" and not _TRITON_ON_CPU[0]


def triton_here(device: torch.device) -> bool:
    """Whether the ops run their Triton kernels here (CUDA tensors, or inside triton_on_cpu):
    where ops that exist only as Triton kernels (ReCo's one-pass InfoNCE) can be used."""
    return device.type == "cuda" or _TRITON_ON_CPU[0]


def _remember_scope(ctx):
    ctx.triton_on_cpu = _TRITON_ON_CPU[0]          # backward runs the forward's kernels


def _scope(ctx):
    return triton_on_cpu() if getattr(ctx, "triton_on_cpu", False) else contextlib.nullcontext()
