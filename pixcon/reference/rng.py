"""Counter-based random numbers in plain torch integer ops (the randomness contract, DESIGN §3).

Philox4x32-10 with counter (c0, c1, 0, 0) and key (seed low 32 bits, seed high 32 bits) -- the
generator Triton's ``tl.randint4x`` implements (for an int64 offset ``c1 << 32 | c0`` on triton
3.7+). ``pixcon_kernels.rng`` computes the same numbers inside Triton kernels and ``pixcon._C``
on the CPU; tests check all three bit for bit.

pixcon uses c0 for the index of the draw and c1 for the *stream* (which sampler draws), so the
samplers of one loss never share numbers. Every sampler maps a 32-bit draw ``r`` to an index in
``[0, n)`` by ``(r * n) >> 32`` (multiply-shift; its bias is below n / 2^32, i.e. < 1e-4 for any
class of fewer than 400k pixels) -- integer arithmetic, so every backend gets the same index.
"""
from __future__ import annotations

import torch

from ..core.rng import STREAM_ANCHOR, STREAM_NEGATIVE, STREAM_QUERY, draw_seed, uniform_index

__all__ = ["STREAM_ANCHOR", "STREAM_NEGATIVE", "STREAM_QUERY", "draw_seed", "uniform_index",
           "philox4x32"]

MASK32 = 0xFFFFFFFF
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b, with a < 2^32 in int64 and b < 2^32.
    Split a into 16-bit halves so every partial product fits in int64."""
    p_lo = (a & 0xFFFF) * b            # < 2^48
    p_hi = (a >> 16) * b               # < 2^48
    t = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2^49
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox4x32(counter: torch.Tensor, seed: int, stream: int = 0) -> torch.Tensor:
    """Philox4x32-10 of counters (counter, stream, 0, 0) under key ``seed`` (a 64-bit int).

    counter: integer tensor with values in [0, 2^32). Returns ``counter.shape + (4,)`` int64 in
    [0, 2^32)."""
    c0 = counter.to(torch.int64) & MASK32
    c1 = torch.full_like(c0, stream & MASK32)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & MASK32, seed >> 32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, ROUND_B)
        hi_a, lo_a = _mulhilo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


