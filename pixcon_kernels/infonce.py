"""InfoNCE over sparse pixel sets: per query row m, one positive and N negatives given as row
indices, cosine logits over a temperature, online log-sum-exp. Nothing of size M x N x D (nor
M x N) is ever stored: the forward keeps one (max, sum) pair per query, the backward recomputes
the logits from the indices and the saved log-sum-exp; or, without key gradients, the forward
also keeps each query's softmax-weighted mean unit key (one D-row a query: keep_direction) and
the backward is a scale and a scatter, reading no key again. A program holds its query's row
and walks the negatives in whole-row tiles (D up to 512: 8 rows of 512 per tile on a GPU),
each key row read once.

    s_j   = cos(a_m, k_j) / t,   k_0 = positive, k_1..N = negatives (index -1: absent)
    loss_m = logsumexp_j s_j - s_0          (0 where the query index is -1)
    dL/da  = g_m / (t |a|) * (sum_j w_j k^_j - (sum_j w_j cos_j) a^),  w_j = softmax_j - [j = 0]
    dL/dk_j = g_m w_j / (t |k_j|) * (a^ - cos_j k^_j)          (only with key gradients)

cos(a, k) = a.k / (max(|a|, eps) max(|k|, eps)) as torch.cosine_similarity.

Key gradients are gathered, not scattered: the (query, key) pairs are sorted by key (a stable
sort of the index tensors, no host sync) and one program per key row walks its pairs in that
order, recomputing each pair's weight, so that

    dk_r = 1 / (t |k_r|) * (sum_{pairs (m, r)} w a^_m - (sum w cos) k^_r)

is summed in a fixed order: the same bits whatever order programs run in (float atomics added
in program order, which rounds differently on every run of a GPU).
"""
import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, gpu_config, next_pow2, pool_layout, torch_acc_dtype


@triton.jit
def _row(p, HW, s_b, s_s):
    """Element offset of row p >= 0 (int32: pools have fewer than 2^31 rows, checked by the op;
    a 32-bit division is a few instructions where a 64-bit one is a long subroutine)."""
    return (p // HW).to(tl.int64) * s_b + (p % HW).to(tl.int64) * s_s


@triton.jit
def _key_tile(k_ptr, k_rows, k_sd, k_ok, d, dm, ACC: tl.constexpr):
    """A block of negative rows, whole: (BLOCK_N, D_PAD), zeros where absent or past D."""
    return tl.load(k_ptr + k_rows[:, None] + d[None, :].to(tl.int64) * k_sd,
                   mask=k_ok[:, None] & dm[None, :], other=0.0).to(ACC)


@triton.jit
def _query_and_positive(q_ptr, pos_ptr, qi, pi, Dv, d, q_HW, q_sb, q_ss, q_sd, p_sr, p_sd, eps,
                        ACC: tl.constexpr):
    """Query row a and positive row p (D_PAD wide, zeros past Dv: an absent query reads
    nothing), their inverse norms and cos(a, p)."""
    a = tl.load(q_ptr + _row(tl.maximum(qi, 0), q_HW, q_sb, q_ss) + d.to(tl.int64) * q_sd,
                mask=d < Dv, other=0.0).to(ACC)
    p = tl.load(pos_ptr + tl.maximum(pi, 0).to(tl.int64) * p_sr + d.to(tl.int64) * p_sd,
                mask=d < Dv, other=0.0).to(ACC)
    a_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(a * a, axis=0)), eps)
    p_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), eps)
    return a, p, a_inv, p_inv, tl.sum(a * p, axis=0) * a_inv * p_inv


@triton.jit
def _infonce_fwd_kernel(q_ptr, k_ptr, pos_ptr, qidx_ptr, pidx_ptr, nidx_ptr, loss_ptr, lse_ptr,
                        v_ptr, cbar_ptr, N, D, q_HW, q_sb, q_ss, q_sd, k_HW, k_sb, k_ss, k_sd,
                        p_sr, p_sd, inv_t, eps, ACC: tl.constexpr, KEEP_DIR: tl.constexpr,
                        BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """One query a program: its row, positive and running sums in registers, the negatives in
    whole-row tiles (each key row read once, its dot product and norm from the same tile).
    KEEP_DIR: also the softmax-weighted mean unit key v (D,) and mean cosine cbar, rescaled with
    the running maximum like the sum itself (flash attention's output accumulator), so that the
    backward is a scale and a scatter."""
    m = tl.program_id(0)
    qi = tl.load(qidx_ptr + m)
    ok = qi >= 0
    Dv = tl.where(ok, D, 0)                 # valid lengths: D, N for a query, 0 for none
    Nv = tl.where(ok, N, 0)
    pi = tl.load(pidx_ptr + m)
    d = tl.arange(0, D_PAD)
    dm = d < D
    a, p, a_inv, p_inv, cos_pos = _query_and_positive(q_ptr, pos_ptr, qi, pi, Dv, d, q_HW, q_sb,
                                                      q_ss, q_sd, p_sr, p_sd, eps, ACC)
    s_pos = cos_pos * inv_t
    m_run = s_pos
    l_run = s_pos * 0.0 + 1.0
    v = p * p_inv                           # KEEP_DIR: sum of e^(s - m_run) k^ (positive first)
    c = s_pos                               #           sum of e^(s - m_run) s
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kidx = tl.load(nidx_ptr + m.to(tl.int64) * N + n, mask=n < Nv, other=-1)
        k_ok = kidx >= 0
        k = _key_tile(k_ptr, _row(tl.maximum(kidx, 0), k_HW, k_sb, k_ss), k_sd, k_ok, d, dm, ACC)
        k_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps)
        s = tl.sum(k * a[None, :], axis=1) * a_inv * k_inv * inv_t
        s = tl.where(k_ok, s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, axis=0))
        scale = tl.exp(m_run - m_new)
        e = tl.exp(s - m_new)               # 0 for absent keys
        l_run = l_run * scale + tl.sum(e, axis=0)
        if KEEP_DIR:
            v = v * scale + tl.sum((e * k_inv)[:, None] * k, axis=0)
            c = c * scale + tl.sum(e * tl.where(k_ok, s, 0.0), axis=0)
        m_run = m_new
    lse = m_run + tl.log(l_run)
    tl.store(loss_ptr + m, tl.where(ok, lse - s_pos, 0.0))
    tl.store(lse_ptr + m, tl.where(ok, lse, 0.0))
    if KEEP_DIR:
        tl.store(v_ptr + m.to(tl.int64) * D + d, tl.where(ok, v / l_run, 0.0), mask=dm)
        tl.store(cbar_ptr + m, tl.where(ok, c / l_run / inv_t, 0.0))


@triton.jit
def _infonce_bwd_kernel(q_ptr, k_ptr, pos_ptr, qidx_ptr, pidx_ptr, nidx_ptr, lse_ptr, g_ptr,
                        dq_ptr, N, D, q_HW, q_sb, q_ss, q_sd, k_HW, k_sb, k_ss, k_sd, p_sr, p_sd,
                        inv_t, eps, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                        D_PAD: tl.constexpr):
    """One query a program, dq accumulated in registers and stored once (no round trip through
    memory between iterations); the logits recomputed from whole-row key tiles."""
    m = tl.program_id(0)
    qi = tl.load(qidx_ptr + m)
    ok = qi >= 0
    Dv = tl.where(ok, D, 0)                 # valid lengths: D, N for a query, 0 for none
    Nv = tl.where(ok, N, 0)
    pi = tl.load(pidx_ptr + m)
    g = tl.load(g_ptr + m).to(ACC)
    g = tl.where(ok, g, 0.0)
    lse = tl.load(lse_ptr + m).to(ACC)
    d = tl.arange(0, D_PAD)
    dm = d < D
    a, p, a_inv, p_inv, cos_pos = _query_and_positive(q_ptr, pos_ptr, qi, pi, Dv, d, q_HW, q_sb,
                                                      q_ss, q_sd, p_sr, p_sd, eps, ACC)
    w_pos = g * (tl.exp(cos_pos * inv_t - lse) - 1.0)
    coef = w_pos * cos_pos                                  # sum_j w_j cos_j
    dq = w_pos * p_inv * p                                  # sum_j w_j k^_j
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kidx = tl.load(nidx_ptr + m.to(tl.int64) * N + n, mask=n < Nv, other=-1)
        k_ok = kidx >= 0
        k = _key_tile(k_ptr, _row(tl.maximum(kidx, 0), k_HW, k_sb, k_ss), k_sd, k_ok, d, dm, ACC)
        k_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps)
        cos = tl.sum(k * a[None, :], axis=1) * a_inv * k_inv
        w = tl.where(k_ok, g * tl.exp(cos * inv_t - lse), 0.0)
        coef += tl.sum(w * cos, axis=0)
        dq += tl.sum((w * k_inv)[:, None] * k, axis=0)
    # dq = (sum_j w_j k^_j - coef a^) / (t |a|)
    tl.store(dq_ptr + m.to(tl.int64) * D + d, (dq - coef * a * a_inv) * a_inv * inv_t, mask=dm)


@triton.jit
def _infonce_dkey_kernel(q_ptr, k_ptr, qidx_ptr, pair_ptr, seg_ptr, lse_ptr, g_ptr, dk_ptr,
                         D, q_HW, q_sb, q_ss, q_sd, k_HW, k_sb, k_ss, k_sd,
                         dk_HW, dk_sb, dk_ss, dk_sd, inv_t, eps, ACC: tl.constexpr,
                         POSITIVE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program r: the gradient of key row r from its pairs seg[r]..seg[r+1] (query slots m in
    key-sorted order). POSITIVE: the pairs are positives, weight g (softmax - 1)."""
    r = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    k = tl.load(k_ptr + _row(r, k_HW, k_sb, k_ss) + d.to(tl.int64) * k_sd, mask=dm,
                other=0.0).to(ACC)
    k_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(k * k, axis=0)), eps)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    coef = tl.sum(acc, axis=0)
    lo = tl.load(seg_ptr + r)
    hi = tl.load(seg_ptr + r + 1)
    for i in range(lo, hi):
        m = tl.load(pair_ptr + i)
        qi = tl.load(qidx_ptr + m)
        a = tl.load(q_ptr + _row(qi, q_HW, q_sb, q_ss) + d.to(tl.int64) * q_sd, mask=dm,
                    other=0.0).to(ACC)
        a_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(a * a, axis=0)), eps)
        cos = tl.sum(a * k, axis=0) * a_inv * k_inv
        w = tl.load(g_ptr + m).to(ACC) * tl.exp(cos * inv_t - tl.load(lse_ptr + m).to(ACC))
        if POSITIVE:
            w -= tl.load(g_ptr + m).to(ACC)
        acc += w * a_inv * a
        coef += w * cos
    tl.store(dk_ptr + _row(r, dk_HW, dk_sb, dk_ss) + d.to(tl.int64) * dk_sd,
             inv_t * k_inv * (acc - coef * k_inv * k), mask=dm)


def _key_grad(pool, keys, q_idx, key_of_pair, query_of_pair, lse, grad, temperature, positive,
              eps):
    """The gradient of every row of keys ((R, D) rows or a map) from the pairs (query slot,
    key row) given flat; pairs with a key < 0 or an absent query are dropped. Sorted by key
    (stable: pair order within a key is fixed), one program per key row."""
    keys, R, D, k_HW, k_sb, k_ss, k_sd = pool_layout(keys)
    pool, _, _, q_HW, q_sb, q_ss, q_sd = pool_layout(pool)
    dk = torch.empty(keys.shape, dtype=torch_acc_dtype(pool.dtype), device=pool.device)
    _, _, _, dk_HW, dk_sb, dk_ss, dk_sd = pool_layout(dk)
    valid = (key_of_pair >= 0) & (q_idx[query_of_pair] >= 0)
    sort_key = torch.where(valid, key_of_pair.to(torch.int64), R)
    sorted_key, order = torch.sort(sort_key, stable=True)
    seg = torch.searchsorted(sorted_key, torch.arange(R + 1, device=pool.device))
    pairs = query_of_pair[order].to(torch.int32)
    if R == 0:
        return dk
    _infonce_dkey_kernel[(R,)](
        pool, keys, q_idx.to(torch.int32).contiguous(), pairs, seg, lse.contiguous(),
        grad.contiguous(), dk, D, q_HW, q_sb, q_ss, q_sd, k_HW, k_sb, k_ss, k_sd,
        dk_HW, dk_sb, dk_ss, dk_sd, 1.0 / temperature, eps, ACC=acc_dtype(pool.dtype),
        POSITIVE=positive, BLOCK_D=next_pow2(D))
    return dk


def _blocks(D: int, dtype: torch.dtype):
    """(BLOCK_N, D_PAD, launch options): whole-row key tiles of about 4096 values on a GPU
    (16 rows at D = 256, 8 at 512, at least 2; fp64 values take two registers each: half), 64
    rows under the interpreter."""
    D_PAD = next_pow2(D)
    if gpu_config():
        budget = 2048 if dtype == torch.float64 else 4096
        BLOCK_N = max(2, min(16, budget // D_PAD))
    else:
        BLOCK_N = 64
    # maxnreg: without a bound ptxas sometimes settles on 64 registers and spills a few bytes
    opts = dict(maxnreg=255) if gpu_config() else {}
    return BLOCK_N, D_PAD, opts


def _key_layout(pool, keys, layout):
    """The negatives' tensor and layout: keys' rows when given (U2PL's bank), else pool's."""
    if keys is None:
        return (pool, *layout)
    keys, _, _, k_HW, k_sb, k_ss, k_sd = pool_layout(keys)
    return keys, k_HW, k_sb, k_ss, k_sd


def infonce_forward(pool, pos_pool, q_idx, pos_idx, neg_idx, temperature: float, eps=1e-8,
                    keys=None, keep_direction: bool = False):
    """pool: (P, D) rows or a (B, D, h, w) map (queries and negatives are its rows); pos_pool:
    (R, D) rows; q_idx, pos_idx: (M,) int; neg_idx: (M, N) int (-1 = absent); keys: (S, D) rows
    the negatives index instead of pool's. Returns per-query loss and log-sum-exp, (M,) float32
    (float64 for float64 pool), and with keep_direction each query's softmax-weighted mean unit
    key v (M, D) and mean cosine cbar (M,) (else None, None)."""
    pool, P, D, HW, s_b, s_s, s_d = pool_layout(pool)
    keys, k_HW, k_sb, k_ss, k_sd = _key_layout(pool, keys, (HW, s_b, s_s, s_d))
    M, N = neg_idx.shape
    dt = torch_acc_dtype(pool.dtype)
    loss = torch.empty(M, dtype=dt, device=pool.device)
    lse = torch.empty(M, dtype=dt, device=pool.device)
    v = torch.empty((M, D) if keep_direction else (0,), dtype=dt, device=pool.device)
    cbar = torch.empty(M if keep_direction else 0, dtype=dt, device=pool.device)
    if M == 0:
        return loss, lse, *((v, cbar) if keep_direction else (None, None))
    BLOCK_N, D_PAD, opts = _blocks(D, pool.dtype)
    _infonce_fwd_kernel[(M,)](
        pool, keys, pos_pool, q_idx.to(torch.int32).contiguous(),
        pos_idx.to(torch.int32).contiguous(), neg_idx.to(torch.int32).contiguous(), loss, lse,
        v, cbar, N, D, HW, s_b, s_s, s_d, k_HW, k_sb, k_ss, k_sd, pos_pool.stride(0),
        pos_pool.stride(1), 1.0 / temperature, eps, ACC=acc_dtype(pool.dtype),
        KEEP_DIR=bool(keep_direction), BLOCK_N=BLOCK_N, D_PAD=D_PAD, **opts)
    return loss, lse, *((v, cbar) if keep_direction else (None, None))


def infonce_backward(grad, pool, pos_pool, q_idx, pos_idx, neg_idx, lse, temperature: float,
                     key_grad: bool, eps=1e-8, keys=None):
    """Returns (dq (M, D) gradient of each query row, dkeys, dpos): dkeys has pool's logical shape
    (contiguous) and dpos pos_pool's, both in the accumulation dtype and None unless key_grad
    (which a separate ``keys`` tensor excludes: it gets no gradient)."""
    if keys is not None and key_grad:
        raise ValueError("infonce_backward: a separate key pool gets no gradient")
    pool, P, D, HW, s_b, s_s, s_d = pool_layout(pool)
    keys, k_HW, k_sb, k_ss, k_sd = _key_layout(pool, keys, (HW, s_b, s_s, s_d))
    M, N = neg_idx.shape
    dt = torch_acc_dtype(pool.dtype)
    dq = torch.empty(M, D, dtype=dt, device=pool.device)
    if M == 0:
        zeros = (torch.zeros(pool.shape, dtype=dt, device=pool.device),
                 torch.zeros(pos_pool.shape, dtype=dt, device=pool.device))
        return dq, *(zeros if key_grad else (None, None))
    BLOCK_N, D_PAD, opts = _blocks(D, pool.dtype)
    _infonce_bwd_kernel[(M,)](
        pool, keys, pos_pool, q_idx.to(torch.int32).contiguous(),
        pos_idx.to(torch.int32).contiguous(), neg_idx.to(torch.int32).contiguous(),
        lse.contiguous(), grad.contiguous(), dq,
        N, D, HW, s_b, s_s, s_d, k_HW, k_sb, k_ss, k_sd, pos_pool.stride(0), pos_pool.stride(1),
        1.0 / temperature, eps, ACC=acc_dtype(pool.dtype), BLOCK_N=BLOCK_N, D_PAD=D_PAD,
        **opts)
    if not key_grad:
        return dq, None, None
    slots = torch.arange(M, device=pool.device)
    dk = _key_grad(pool, pool, q_idx, neg_idx.reshape(-1), slots.repeat_interleave(N), lse,
                   grad, temperature, False, eps)
    dpos = _key_grad(pool, pos_pool, q_idx, pos_idx.reshape(-1), slots, lse, grad,
                     temperature, True, eps)
    return dq, dk, dpos
