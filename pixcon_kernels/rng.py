"""Philox4x32-10 inside Triton kernels, written out here (not tl.randint4x) so the numbers do not
depend on the Triton version: triton 3.6 and 3.7 treat 64-bit offsets differently. Counter
(c0, c1, 0, 0), key (seed_lo, seed_hi): identical to pixcon.reference.rng.philox4x32."""
import torch
import triton
import triton.language as tl

from ._utils import as_i32


@triton.jit
def philox4x32(seed, c0, c1):
    """Four uint32 blocks for counter blocks c0 (index) and c1 (stream), both int32/uint32."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = c0.to(tl.uint32, bitcast=True)
    c1 = c1.to(tl.uint32, bitcast=True)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def uniform_index(r, n):
    """(r * n) >> 32 for uint32 draws r and int32 counts n >= 0: an int64 index in [0, n)."""
    r64 = r.to(tl.int64) & 0xFFFFFFFF
    return (r64 * n.to(tl.int64)) >> 32


@triton.jit(do_not_specialize=["seed", "stream"])
def _philox_kernel(counter_ptr, out_ptr, n, seed, stream, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    c = tl.load(counter_ptr + offs, mask=m, other=0).to(tl.int32)
    r0, r1, r2, r3 = philox4x32(seed, c, c * 0 + stream)
    out = out_ptr + offs * 4
    tl.store(out, r0.to(tl.int64) & 0xFFFFFFFF, mask=m)
    tl.store(out + 1, r1.to(tl.int64) & 0xFFFFFFFF, mask=m)
    tl.store(out + 2, r2.to(tl.int64) & 0xFFFFFFFF, mask=m)
    tl.store(out + 3, r3.to(tl.int64) & 0xFFFFFFFF, mask=m)


def philox(counter: torch.Tensor, seed: int, stream: int = 0, block: int = 1024) -> torch.Tensor:
    """counter: int tensor of values in [0, 2^32). Returns counter.shape + (4,) int64."""
    c = (counter.to(torch.int64) & 0xFFFFFFFF).to(torch.int32).contiguous()  # wraps to int32 bits
    out = torch.empty(c.shape + (4,), dtype=torch.int64, device=c.device)
    n = c.numel()
    if n:
        _philox_kernel[(triton.cdiv(n, block),)](c, out, n, seed, as_i32(stream), BLOCK=block)
    return out
