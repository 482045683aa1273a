"""ReCo's InfoNCE in one gather pass (specs/reco.md §1).

Inputs are what one read of the embedding produced (segment.class_sums with rows=True): the
pixels as contiguous (P, D) rows in the input dtype, and the class means. Program m takes query
m = c * Q + q and

* regenerates its negatives from their Philox counters (m * N + n, the STREAM_NEGATIVE words
  the sampler uses: sampling.negative_pixels), so the M x N index tensor is never written,
  saved or read;
* gathers each negative as one contiguous row (vector loads) and computes its norm from the
  row in registers (no separate norm gather: a 4-byte scalar would cost a 32-byte sector);
* runs an online softmax over [positive, negatives] that also accumulates the softmax-weighted
  unit keys v = sum_j p_j k^_j and cosines cbar = sum_j p_j cos_j.

The query's gradient then needs no second pass over the keys:

    dL_m/da = g_m / (t |a|) * ((v - p^) - (cbar - cos_0) a^)  =  g_m * scale_m * u_m

so the kernel writes u_m (D floats) and scale_m = 1 / (t |a|) and backward is a scale and a
scatter (pixcon.ops._library). Saved for backward: u, scale and the query indices; the seed
is a Python int.
"""
import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, as_i32, gpu_config, next_pow2, torch_acc_dtype
from .sampling import negative_pixels


@triton.jit(do_not_specialize=["seed", "stream"])
def _reco_infonce_kernel(rows_ptr, means_ptr, q_ptr, cdf_ptr, order_ptr, off_ptr, cnt_ptr,
                         loss_ptr, lse_ptr, u_ptr, scale_ptr, Q, N, D, C, n_steps, seed, stream,
                         inv_t, eps, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    m = tl.program_id(0)
    c = m // Q
    qi = tl.load(q_ptr + m)
    ok = qi >= 0
    Dv = tl.where(ok, D, 0)                 # valid lengths: D, N for a query, 0 for none
    Nv = tl.where(ok, N, 0)
    d = tl.arange(0, BLOCK_D)
    a = tl.load(rows_ptr + tl.maximum(qi, 0).to(tl.int64) * D + d, mask=d < Dv,
                other=0.0).to(ACC)
    p = tl.load(means_ptr + c.to(tl.int64) * D + d, mask=d < Dv, other=0.0).to(ACC)
    a_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(a * a, axis=0)), eps)
    p_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), eps)
    cos0 = tl.sum(a * p, axis=0) * a_inv * p_inv
    s0 = cos0 * inv_t
    # online softmax over [positive, negatives]: running max, sum, weighted keys and cosines
    m_run = s0
    l_run = s0 * 0.0 + 1.0
    v = p * p_inv
    cb = cos0
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < Nv
        kidx = negative_pixels(m * N + n, n * 0 + c, n_ok, cdf_ptr, order_ptr, off_ptr, cnt_ptr,
                               C, n_steps, seed, stream)
        k_ok = kidx >= 0
        k = tl.load(rows_ptr + tl.maximum(kidx, 0).to(tl.int64)[:, None] * D + d[None, :],
                    mask=k_ok[:, None] & (d < D)[None, :], other=0.0).to(ACC)
        k_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps)
        cos = tl.sum(k * a[None, :], axis=1) * a_inv * k_inv
        s = tl.where(k_ok, cos * inv_t, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, axis=0))
        alpha = tl.exp(m_run - m_new)
        e = tl.exp(s - m_new)                              # 0 for absent negatives
        l_run = l_run * alpha + tl.sum(e, axis=0)
        v = v * alpha + tl.sum((e * k_inv)[:, None] * k, axis=0)
        cb = cb * alpha + tl.sum(e * tl.where(k_ok, cos, 0.0), axis=0)
        m_run = m_new
    lse = m_run + tl.log(l_run)
    u = v / l_run - p * p_inv - (cb / l_run - cos0) * a * a_inv
    tl.store(u_ptr + m.to(tl.int64) * D + d, tl.where(ok, u, 0.0), mask=d < D)
    tl.store(scale_ptr + m, tl.where(ok, a_inv * inv_t, 0.0))
    tl.store(loss_ptr + m, tl.where(ok, lse - s0, 0.0))
    tl.store(lse_ptr + m, tl.where(ok, lse, 0.0))


def _blocks(D: int, dtype: torch.dtype):
    """The whole row in one tile (BLOCK_D = next_pow2(D)); GPU: at most 4096 key elements and
    16 negatives a block (16 x 256 in fp32: 32 registers a thread at 4 warps; more negatives a
    block, each with its Philox words and class search, took 209-232 registers at D = 40),
    half the elements for fp64."""
    BLOCK_D = next_pow2(D)
    gpu = gpu_config()
    budget = 4096 if gpu else 16384
    if dtype == torch.float64:
        budget //= 2
    BLOCK_N = max(2, min(16 if gpu else 64, budget // BLOCK_D))
    return BLOCK_N, BLOCK_D


def reco_infonce(rows, means, queries, num_queries: int, cdf, order, offsets, counts,
                 num_negatives: int, seed: int, stream: int, temperature: float, eps=1e-8):
    """rows: (P, D) contiguous pixel rows; means: (C, D) positives (row c for class c);
    queries: (C * Q,) int pixel indices (-1 = none), query m of class m // Q; cdf (C, C) int64,
    order/offsets/counts: the relation-weighted negative sampler's tables. Returns (loss, lse,
    u, scale): (M,), (M,), (M, D), (M,) in float32 (float64 for float64 rows)."""
    M = queries.numel()
    P, D = rows.shape
    C = cdf.shape[0]
    dt = torch_acc_dtype(rows.dtype)
    dev = rows.device
    loss = torch.empty(M, dtype=dt, device=dev)
    lse = torch.empty(M, dtype=dt, device=dev)
    u = torch.empty(M, D, dtype=dt, device=dev)
    scale = torch.empty(M, dtype=dt, device=dev)
    if M == 0:
        return loss, lse, u, scale
    BLOCK_N, BLOCK_D = _blocks(D, rows.dtype)
    _reco_infonce_kernel[(M,)](
        rows.contiguous(), means.to(dt).contiguous(), queries.to(torch.int32).contiguous(),
        cdf.to(torch.int64).contiguous(), order.to(torch.int32).contiguous(),
        offsets.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous(),
        loss, lse, u, scale, num_queries, num_negatives, D, C, max(C, 1).bit_length(), seed,
        as_i32(stream), 1.0 / temperature, eps, ACC=acc_dtype(rows.dtype), BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D, num_warps=4,
        # left free, ptxas settles on 64 registers at D = 40 on sm_90 and spills 8 bytes
        **(dict(maxnreg=255) if gpu_config() else {}))
    return loss, lse, u, scale
