"""Class sums and counts by label (segment reduction), deterministic and without host syncs.

Each program reduces a contiguous range of pixel tiles for a block of classes and channels with a
one-hot matrix product (exact float32 products, ``input_precision="ieee"``, never TF32) and writes
a partial; the partials are summed by torch in a fixed order, so the result does not depend on
the thread schedule (no float atomics)."""
import torch
import triton
import triton.language as tl

from ._utils import (acc_dtype, gpu_config, next_pow2, pixel_chunk, pixel_tile, pixel_tiles,
                     pool_layout, torch_acc_dtype)


@triton.jit
def _class_sums_kernel(x_ptr, lab_ptr, part_ptr, cnt_ptr, rows_ptr, scale_ptr, D, C, HW, s_b,
                       s_s, s_d, T, TPI, tiles_per_prog, ACC: tl.constexpr,
                       WRITE_ROWS: tl.constexpr, SCALE: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program g reduces tiles [g * tiles_per_prog, ...) of BLOCK_P pixels; a tile lies inside
    one image (TPI tiles per image of HW pixels), so its pixels are consecutive addresses of a
    (B, D, h, w) map (stride s_s = 1, specialised by Triton): each warp reads whole 32-byte
    sectors along the pixel axis instead of one sector per element. WRITE_ROWS: the first class
    block also writes the tile as (P, D) rows in the input dtype (the ReCo pre-pass). SCALE:
    each pixel's vector is multiplied by scale[p] first (unit rows: the inverse norms)."""
    g = tl.program_id(0)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    cnt = tl.zeros([BLOCK_C], dtype=tl.int32)
    t_start = g * tiles_per_prog
    for t in range(t_start, tl.minimum(t_start + tiles_per_prog, T)):
        b, hw, p_ok, p = pixel_tile(t, TPI, HW, BLOCK_P)
        lab = tl.load(lab_ptr + p, mask=p_ok, other=-1)
        xv = pixel_chunk(x_ptr, b, hw, p_ok, d, D, s_b, s_s, s_d)
        if WRITE_ROWS:
            if tl.program_id(1) == 0:
                tl.store(rows_ptr + p[:, None] * D + d[None, :], xv,
                         mask=p_ok[:, None] & d_ok[None, :])
        x = xv.to(ACC)
        if SCALE:
            x = x * tl.load(scale_ptr + p, mask=p_ok, other=0.0).to(ACC)[:, None]
        onehot = cls[:, None] == lab[None, :]                       # [BLOCK_C, BLOCK_P]
        if ACC == tl.float64:
            acc += tl.dot(onehot.to(ACC), x)
        else:
            acc += tl.dot(onehot.to(ACC), x, input_precision="ieee")
        cnt += tl.sum(onehot.to(tl.int32), axis=1)
    c_ok = cls < C
    tl.store(part_ptr + (g * C + cls[:, None]).to(tl.int64) * D + d[None, :], acc,
             mask=c_ok[:, None] & d_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(cnt_ptr + g * C + cls, cnt, mask=c_ok)


def class_sums(x: torch.Tensor, lab: torch.Tensor, num_classes: int, rows: bool = False,
               scale: torch.Tensor | None = None):
    """Per-class sums and counts of pixel vectors.

    x: (B, D, h, w) feature map or (P, D) rows, any float dtype; lab: (P,) int32/int64 class of
    each row, -1 (or any value outside [0, C)) ignored. Returns sums (C, D) in float32 (float64
    for float64 x) and counts (C,) int64; with ``rows``, also x's pixels as contiguous (P, D)
    rows in x's dtype, written by the same pass (one read of the map). scale: (P,) factors
    applied to each pixel's vector first (the sums of unit vectors, given inverse norms)."""
    x, P, D, HW, s_b, s_s, s_d = pool_layout(x)
    C = int(num_classes)
    lab = lab.to(torch.int32).contiguous()
    BLOCK_C = min(next_pow2(C), 64)
    BLOCK_D = min(next_pow2(D), 64)
    # GPU: 32-pixel tiles, no software pipelining (num_stages=1): the exact-fp32 FMA dot keeps
    # whole K-slices of both operands in registers, and deeper pipelining or longer steps spill
    # (sm_80/sm_90: 255 registers and kilobytes of spills at 128 pixels, 3 stages; see
    # pixcon_kernels/RESOURCES.md)
    gpu = gpu_config()
    BLOCK_P = 32 if gpu else 64
    # maxnreg: left free, ptxas settles on 128 registers for sm_90 and spills 12 bytes
    opts = dict(maxnreg=255) if gpu else {}
    # at most 512 programs; partials G x C x D floats kept under ~32 MiB
    T, TPI, G, tiles_per_prog = pixel_tiles(P, HW, BLOCK_P, min(512 if gpu else 4,
                                                              (8 << 20) // max(C * D, 1)))
    out_dt = torch_acc_dtype(x.dtype)
    if P == 0:            # no pixel: no launch (a masked load from an empty tensor is invalid)
        sums = torch.zeros(C, D, dtype=out_dt, device=x.device)
        counts = torch.zeros(C, dtype=torch.int64, device=x.device)
        return (sums, counts, torch.empty(0, D, dtype=x.dtype, device=x.device)) if rows \
            else (sums, counts)
    part = torch.empty(G, C, D, dtype=out_dt, device=x.device)
    cnt = torch.empty(G, C, dtype=torch.int32, device=x.device)
    out_rows = torch.empty(P if rows else 0, D, dtype=x.dtype, device=x.device)
    grid = (G, triton.cdiv(C, BLOCK_C), triton.cdiv(D, BLOCK_D))
    _class_sums_kernel[grid](x, lab, part, cnt, out_rows if rows else part,
                             part if scale is None else scale.contiguous(), D, C, HW, s_b, s_s,
                             s_d, T, TPI, tiles_per_prog, ACC=acc_dtype(x.dtype),
                             WRITE_ROWS=rows, SCALE=scale is not None, BLOCK_P=BLOCK_P,
                             BLOCK_C=BLOCK_C,
                             BLOCK_D=BLOCK_D, num_stages=1, **opts)
    sums, counts = part.sum(0), cnt.sum(0, dtype=torch.int64)
    return (sums, counts, out_rows) if rows else (sums, counts)
