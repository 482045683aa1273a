"""Queue-bank push (U2PL's per-class FIFO, pixcon.nn.UnreliableBank) without a host sync.

The launcher's caller has decided, per (class c, row p), whether row p goes into c's queue
(``keep``) and at which bank row (``slot``): a (C, P) mask and a (C, P) index, both from cumsums
on the device. A compaction (``nonzero``) would read the number of pairs back to the host; here
one program per (class, block of rows, block of D) stores its kept rows where they go. Every
destination row is written by exactly one (c, p) pair (the slots of one push are distinct), so
the result does not depend on program order.
"""
import torch
import triton
import triton.language as tl

from ._utils import gpu_config, next_pow2, pool_layout


@triton.jit
def _bank_push_kernel(rows_ptr, keep_ptr, slot_ptr, keys_ptr, P, D, HW, r_sb, r_ss, r_sd, k_sr,
                      BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    pm = p < P
    at = c.to(tl.int64) * P + p
    keep = tl.load(keep_ptr + at, mask=pm, other=0) != 0
    slot = tl.load(slot_ptr + at, mask=pm & keep, other=0)
    m = keep[:, None] & (d < D)[None, :]
    row = (p // HW).to(tl.int64) * r_sb + (p % HW).to(tl.int64) * r_ss     # pool_layout's rows
    v = tl.load(rows_ptr + row[:, None] + d[None, :].to(tl.int64) * r_sd, mask=m, other=0.0)
    tl.store(keys_ptr + slot[:, None] * k_sr + d[None, :].to(tl.int64), v, mask=m)


def bank_push(keys: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, slot: torch.Tensor):
    """keys[slot[c, p]] = rows[p] wherever keep[c, p]: keys (S, D) contiguous (written in
    place), rows (P, D) or a (B, D, HW) channels-first map (pixel p = b HW + s, read in place)
    in keys' dtype, keep (C, P) bool, slot (C, P) int64."""
    C, P = keep.shape
    D = keys.shape[1]
    if C == 0 or P == 0:
        return keys
    pool = rows if rows.dim() == 2 else rows.unsqueeze(-1)       # (B, D, HW, 1): a map's pixels
    pool, _, _, HW, s_b, s_s, s_d = pool_layout(pool)
    BLOCK_P = 64 if gpu_config() else 256
    BLOCK_D = min(next_pow2(D), 128)
    grid = (C, triton.cdiv(P, BLOCK_P), triton.cdiv(D, BLOCK_D))
    _bank_push_kernel[grid](pool, keep.to(torch.int8).contiguous(), slot.contiguous(), keys,
                            P, D, HW, s_b, s_s, s_d, keys.stride(0),
                            BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D)
    return keys
