"""Deliberately broken kernels for test_kernels_compile.py (never launched)."""
import triton
import triton.language as tl

SCALE = 3  # a plain global: the interpreter reads it, the compiler raises NameError


@triton.jit
def _global_read_kernel(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE, mask=i < n)


@triton.jit
def _spilling_kernel(x_ptr, BLOCK: tl.constexpr):
    # a BLOCK x BLOCK fp32 tile and its transpose held across a data-dependent loop by few warps
    # (BLOCK = 128, 2 warps: 256 values a lane each, beyond the 255 registers)
    i = tl.arange(0, BLOCK)
    t = tl.load(x_ptr + i[:, None] * BLOCK + i[None, :])
    for k in range(tl.load(x_ptr).to(tl.int32)):
        t = t * tl.load(x_ptr + k) + tl.trans(t)
    tl.store(x_ptr + i[:, None] * BLOCK + i[None, :], t)
