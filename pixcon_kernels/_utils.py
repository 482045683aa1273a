"""Launcher helpers shared by the kernels."""
import os

import torch
import triton
import triton.language as tl


SMS = 132                 # an H100 SXM: launchers that split work aim at about four programs a SM
PROGRAMS = 4 * SMS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_config() -> bool:
    """Whether launchers choose the block sizes, warps and grids of a GPU launch.

    Always on a GPU. Under the interpreter the default is a CPU-friendly configuration (few large
    programs, since the interpreter's cost is per program); ``PIXCON_LAUNCH_CONFIG=gpu`` makes it
    choose exactly what a GPU would, so that every code path a GPU takes (partial sums over many
    programs, small tiles, class blocks) runs and is compared with the reference on CPU
    (tests/test_gpu_config.py). Read at each launch, so tests can switch it."""
    if not interpreting():
        return True
    mode = os.environ.get("PIXCON_LAUNCH_CONFIG", "interpreter")
    if mode not in ("interpreter", "gpu"):
        raise ValueError(f"PIXCON_LAUNCH_CONFIG must be 'interpreter' or 'gpu', got {mode!r}")
    return mode == "gpu"


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation type: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pool_layout(pool: torch.Tensor):
    """Describe a pool of D-vectors for pointer arithmetic: row p lives at
    base + (p // HW) * s_b + (p % HW) * s_s and its element d at + d * s_d.

    pool: (P, D) rows, or a (B, D, h, w) feature map whose rows are its pixels (any memory
    format in which h and w merge, e.g. contiguous or channels_last). Returns (pool, P, D, HW,
    s_b, s_s, s_d); pool is made contiguous only if h and w do not merge."""
    if pool.dim() == 2:
        P, D = pool.shape
        return pool, P, D, max(P, 1), 0, pool.stride(0), pool.stride(1)
    B, D, h, w = pool.shape
    if h > 1 and pool.stride(2) != w * pool.stride(3):
        pool = pool.contiguous()
    s_s = pool.stride(3) if w > 1 else pool.stride(2)
    return pool, B * h * w, D, max(h * w, 1), pool.stride(0), s_s, pool.stride(1)


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def as_i32(v: int) -> int:
    """A value in [0, 2^32) as the int32 with the same bits (Triton types Python ints >= 2^31
    as int64, which would change the kernel's integer width)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


# --- pixel tiles of a (B, D, h, w) map: BLOCK_P consecutive pixels of one image ---------------
@triton.jit
def pixel_tile(t, TPI, HW, BLOCK_P: tl.constexpr):
    """Tile t (TPI tiles per image of HW pixels): image b, its pixels hw (BLOCK_P consecutive,
    hw < HW valid) and their flat indices p (int64). Consecutive pixels are consecutive
    addresses of an NCHW map (stride 1, which Triton specialises): whole 32-byte sectors."""
    b = t // TPI
    hw = (t % TPI) * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, hw, hw < HW, b.to(tl.int64) * HW + hw


@triton.jit
def pixel_chunk(x_ptr, b, hw, pm, d, D, s_b, s_s, s_d):
    """x[b, d, hw] as a [BLOCK_P, BLOCK_D] tile (strides of pool_layout)."""
    return tl.load(x_ptr + b.to(tl.int64) * s_b + hw[:, None].to(tl.int64) * s_s
                   + d[None, :].to(tl.int64) * s_d, mask=pm[:, None] & (d < D)[None, :],
                   other=0.0)


def pixel_tiles(P: int, HW: int, block_p: int, max_progs: int):
    """(T, TPI, G, tiles_per_prog): T tiles of block_p pixels, TPI a image, spread over at
    most max_progs programs of tiles_per_prog consecutive tiles each."""
    TPI = triton.cdiv(max(HW, 1), block_p)
    T = TPI * triton.cdiv(max(P, 1), max(HW, 1))
    G = max(1, min(T, max_progs))
    tiles_per_prog = triton.cdiv(T, G)
    return T, TPI, triton.cdiv(T, tiles_per_prog), tiles_per_prog
