"""Exact Euclidean distance transform of batched label maps (binary or multi-label), two passes:

  column pass: G(x, y) = distance along column x to the nearest pixel whose label differs from
               L(x, y) (one lane per column, a sweep down and a sweep up);
  row pass:    D^2(x, y) = min_x' (x - x')^2 + [L(x', y) == L(x, y)] G(x', y)^2  (brute-force
               min-plus over the row, chunked over x'; exact integers, no atomics).

Background pixels (L == background) get 0; a pixel with no differing pixel anywhere gets +inf.
Row cost is O(W) per pixel: right for the BANE pyramid (W <= 512); at W = 2048 it is ~4 GOP
per 1024x2048 image (milliseconds on an H100-class GPU)."""
import torch
import triton
import triton.language as tl

from ._utils import gpu_config, next_pow2

# "no differing pixel along this column": a constexpr, since a plain module global read inside
# @triton.jit compiles only under the interpreter (the compiler raises NameError)
FAR = tl.constexpr(1 << 30)
MAX_SIDE = 32767       # G^2 + W^2 must stay below 2^31


@triton.jit
def _edt_cols_kernel(lab_ptr, g_ptr, H, W, bg, BLOCK_W: tl.constexpr):
    """One lane per column, sequential over rows (coalesced along x): a downward sweep stores
    the distance to the nearest differing pixel above, an upward sweep combines it with the one
    below and stores G^2 (saturated to FAR; 0 on background)."""
    n = tl.program_id(0).to(tl.int64)
    x = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    xm = x < W
    base = lab_ptr + n * H * W + x
    gbase = g_ptr + n * H * W + x
    prev = tl.load(base, mask=xm, other=0)
    up = tl.full([BLOCK_W], FAR, tl.int32)
    tl.store(gbase, up, mask=xm)
    for y in range(1, H):
        cur = tl.load(base + y * W, mask=xm, other=0)
        up = tl.where(cur != prev, 1, tl.minimum(up + 1, FAR))
        tl.store(gbase + y * W, up, mask=xm)
        prev = cur
    down = tl.full([BLOCK_W], FAR, tl.int32)
    nxt = tl.load(base + (H - 1) * W, mask=xm, other=0)
    for i in range(0, H):
        y = H - 1 - i
        cur = tl.load(base + y * W, mask=xm, other=0)
        if i > 0:
            down = tl.where(cur != nxt, 1, tl.minimum(down + 1, FAR))
        g = tl.minimum(tl.load(gbase + y * W, mask=xm, other=0), down)
        g2 = tl.where(g >= 32768, FAR, g * g)
        tl.store(gbase + y * W, tl.where(cur == bg, 0, g2), mask=xm)
        nxt = cur


@triton.jit
def _edt_rows_kernel(lab_ptr, g_ptr, out_ptr, R, W, bg, SQUARED: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_S: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)                  # rows of N*H
    x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    rm = r < R
    m = rm[:, None] & (x < W)[None, :]
    row = r.to(tl.int64) * W
    lab = tl.load(lab_ptr + row[:, None] + x[None, :], mask=m, other=0)      # [R, X]
    best = tl.full([BLOCK_R, BLOCK_X], 2147483647, tl.int32)
    for s0 in range(0, W, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sm = rm[:, None] & (s < W)[None, :]
        ls = tl.load(lab_ptr + row[:, None] + s[None, :], mask=sm, other=0)  # [R, S]
        gs = tl.load(g_ptr + row[:, None] + s[None, :], mask=sm, other=FAR)
        d = x[:, None] - s[None, :]                                          # [X, S]
        same = ls[:, None, :] == lab[:, :, None]                             # [R, X, S]
        cost = (d * d)[None, :, :] + tl.where(same, gs[:, None, :], 0)
        cost = tl.where(sm[:, None, :], cost, 2147483647)
        best = tl.minimum(best, tl.min(cost, axis=2))
    best = tl.where(lab == bg, 0, best)
    inf = best >= FAR
    val = best.to(tl.float32)
    if not SQUARED:
        val = tl.sqrt(val)
    tl.store(out_ptr + row[:, None] + x[None, :], tl.where(inf, float("inf"), val), mask=m)


def distance_transform(labels: torch.Tensor, background: int, squared: bool) -> torch.Tensor:
    """labels: (..., H, W) integer/bool. Returns float32 distances of the same shape."""
    H, W = labels.shape[-2:]
    if H > MAX_SIDE or W > MAX_SIDE:
        raise ValueError(f"distance_transform: sides up to {MAX_SIDE} supported, got {H}x{W}")
    out = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    N = labels.numel() // max(H * W, 1)
    if N == 0 or H == 0 or W == 0:
        return out
    lab = labels.reshape(N, H, W).to(torch.int32).contiguous()
    g = torch.empty(N, H, W, dtype=torch.int32, device=labels.device)
    BLOCK_W = min(next_pow2(W), 128 if gpu_config() else 1024)
    _edt_cols_kernel[(N, triton.cdiv(W, BLOCK_W))](lab, g, H, W, background, BLOCK_W=BLOCK_W)
    # interpreter: many rows per program (cost is per program); GPU: one row, a [64, 64] tile
    BLOCK_X = min(next_pow2(W), 64)
    BLOCK_S = min(next_pow2(W), 32 if gpu_config() else 64)
    BLOCK_R = 1 if gpu_config() else max(1, 32768 // (BLOCK_X * BLOCK_S))
    R = N * H
    _edt_rows_kernel[(triton.cdiv(R, BLOCK_R), triton.cdiv(W, BLOCK_X))](
        lab, g, out, R, W, background, SQUARED=squared, BLOCK_R=BLOCK_R, BLOCK_X=BLOCK_X,
        BLOCK_S=BLOCK_S)
    return out
