"""Samplers on the counter-based generator (pixcon_kernels.rng); bit-identical to the torch
reference samplers for the same seed, whatever the device or launch grid.

Pixels are given grouped by class: ``order`` lists pixel indices sorted by class, class g holds
order[offsets[g] : offsets[g] + counts[g]] (see pixcon.reference.common.group_by_class).
"""
import torch
import triton
import triton.language as tl

from ._utils import as_i32, gpu_config
from .rng import philox4x32, uniform_index


@triton.jit(do_not_specialize=["seed", "stream"])
def _sample_in_groups_kernel(order_ptr, off_ptr, cnt_ptr, group_ptr, out_ptr, total, per_row,
                             seed, stream, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    g = tl.load(group_ptr + i // per_row, mask=m, other=-1)
    ok = m & (g >= 0)
    n = tl.load(cnt_ptr + g, mask=ok, other=0)
    ok = ok & (n > 0)
    r0, _, _, _ = philox4x32(seed, i, i * 0 + stream)
    off = tl.load(off_ptr + g, mask=ok, other=0)
    pix = tl.load(order_ptr + off + uniform_index(r0, n), mask=ok, other=-1)
    tl.store(out_ptr + i, tl.where(ok, pix, -1), mask=m)


def sample_in_groups(order, offsets, counts, row_group, per_row: int, seed: int, stream: int):
    """out[r, k] = a pixel uniform (with replacement) in group row_group[r], drawn with counter
    r * per_row + k; -1 where row_group[r] < 0 or the group is empty. Returns (R, per_row) int32."""
    R = row_group.numel()
    total = R * per_row
    out = torch.empty(R, per_row, dtype=torch.int32, device=order.device)
    if total:
        block = 256 if gpu_config() else 1024
        _sample_in_groups_kernel[(triton.cdiv(total, block),)](
            order.to(torch.int32), offsets.to(torch.int32), counts.to(torch.int32),
            row_group.to(torch.int32).contiguous(), out, total, per_row, seed, as_i32(stream),
            BLOCK=block)
    return out


@triton.jit
def negative_pixels(i, c, ok, cdf_ptr, order_ptr, off_ptr, cnt_ptr, C, n_steps, seed, stream):
    """The relation-weighted negatives of counters i (int32) for rows of class c (ok: valid
    lanes): Philox words (w0, w1) = philox(seed, i, stream)[:2]; the class is
    j = #{k: cdf[c, k] <= w0} and the pixel uniform within j by w1. -1 where the lane is not ok,
    the cdf row is exhausted (j = C) or class j is empty. Shared by the sampler and the ReCo
    InfoNCE kernel, which regenerates its negatives instead of reading them."""
    r0, r1, _, _ = philox4x32(seed, i, i * 0 + stream)
    r64 = r0.to(tl.int64) & 0xFFFFFFFF
    # class j = #{k: cdf[c, k] <= r}: binary search in the nondecreasing row (n_steps =
    # ceil(log2(C + 1)) halvings), O(log C) loads per draw and no C-wide tile in registers
    row = cdf_ptr + tl.maximum(c, 0).to(tl.int64) * C
    lo = c * 0
    hi = lo + C
    for _ in range(n_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(row + mid, mask=ok & active, other=0)
        below = v <= r64
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & (v > r64), mid, hi)
    j = lo
    ok = ok & (j < C)
    n = tl.load(cnt_ptr + j, mask=ok, other=0)
    ok = ok & (n > 0)
    off = tl.load(off_ptr + j, mask=ok, other=0)
    pix = tl.load(order_ptr + off + uniform_index(r1, n), mask=ok, other=-1)
    return tl.where(ok, pix, -1)


@triton.jit(do_not_specialize=["seed", "stream"])
def _sample_negatives_kernel(row_cls_ptr, cdf_ptr, order_ptr, off_ptr, cnt_ptr, out_ptr, total,
                             per_row, C, n_steps, seed, stream, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    c = tl.load(row_cls_ptr + i // per_row, mask=m, other=-1)
    pix = negative_pixels(i, c, m & (c >= 0), cdf_ptr, order_ptr, off_ptr, cnt_ptr, C, n_steps,
                          seed, stream)
    tl.store(out_ptr + i, pix, mask=m)


def sample_negatives(row_class, cdf, order, offsets, counts, per_row: int, seed: int, stream: int):
    """Relation-weighted negatives: for row r of class c = row_class[r] (-1: none) and k < per_row,
    counter i = r * per_row + k draws (w0, w1); the class is j = #{k: cdf[c, k] <= w0} and the
    pixel is uniform within j by w1. -1 where the row has no class or cdf row c is empty.
    cdf: (C, C) int64 nondecreasing thresholds in [0, 2^32]. Returns (R, per_row) int32."""
    R = row_class.numel()
    C = cdf.shape[0]
    total = R * per_row
    out = torch.empty(R, per_row, dtype=torch.int32, device=order.device)
    if total:
        block = 256 if gpu_config() else 1024
        _sample_negatives_kernel[(triton.cdiv(total, block),)](
            row_class.to(torch.int32).contiguous(), cdf.to(torch.int64).contiguous(),
            order.to(torch.int32), offsets.to(torch.int32), counts.to(torch.int32), out, total,
            per_row, C, max(C, 1).bit_length(), seed, as_i32(stream), BLOCK=block)
    return out
