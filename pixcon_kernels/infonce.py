"""InfoNCE over sparse pixel sets: per query row m, one positive and N negatives given as row
indices, cosine logits over a temperature, online log-sum-exp. Nothing of size M x N x D (nor
M x N) is ever stored: the forward keeps one (max, sum) pair per query, the backward recomputes
the logits from the indices and the saved log-sum-exp.

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
def _sq_norm(ptr, base, s_d, Dv, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Squared norm of the first Dv elements (Dv = D for a valid row, 0 for an absent one:
    masks are then plain comparisons, never a scalar bool combined into a block mask, which
    the Triton 3.9 interpreter rejects)."""
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(0, Dv, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(ptr + base + d.to(tl.int64) * s_d, mask=d < Dv, other=0.0).to(ACC)
        acc += v * v
    return tl.sum(acc, axis=0)


@triton.jit
def _dot(a_ptr, a_base, a_sd, b_ptr, b_base, b_sd, Dv, ACC: tl.constexpr,
         BLOCK_D: tl.constexpr):
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(0, Dv, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < Dv
        a = tl.load(a_ptr + a_base + d.to(tl.int64) * a_sd, mask=dm, other=0.0).to(ACC)
        b = tl.load(b_ptr + b_base + d.to(tl.int64) * b_sd, mask=dm, other=0.0).to(ACC)
        acc += a * b
    return tl.sum(acc, axis=0)


@triton.jit
def _neg_block(q_ptr, q_base, q_sd, k_ptr, k_rows, k_sd, k_ok, D, ACC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Dot products with the query and squared norms of a block of negative rows."""
    dot = tl.zeros([BLOCK_N], dtype=ACC)
    ksq = tl.zeros([BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        a = tl.load(q_ptr + q_base + d.to(tl.int64) * q_sd, mask=dm, other=0.0).to(ACC)
        k = tl.load(k_ptr + k_rows[:, None] + d[None, :].to(tl.int64) * k_sd,
                    mask=k_ok[:, None] & dm[None, :], other=0.0).to(ACC)
        dot += tl.sum(k * a[None, :], axis=1)
        ksq += tl.sum(k * k, axis=1)
    return dot, ksq


@triton.jit
def _infonce_fwd_kernel(q_ptr, k_ptr, pos_ptr, qidx_ptr, pidx_ptr, nidx_ptr, loss_ptr, lse_ptr,
                        N, D, q_HW, q_sb, q_ss, q_sd, k_HW, k_sb, k_ss, k_sd, p_sr, p_sd,
                        inv_t, eps, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    m = tl.program_id(0)
    qi = tl.load(qidx_ptr + m)
    ok = qi >= 0
    Dv = tl.where(ok, D, 0)                 # valid lengths: D, N for a query, 0 for none
    Nv = tl.where(ok, N, 0)
    pi = tl.load(pidx_ptr + m)
    q_base = _row(tl.maximum(qi, 0), q_HW, q_sb, q_ss)
    p_base = tl.maximum(pi, 0).to(tl.int64) * p_sr
    a_inv = 1.0 / tl.maximum(tl.sqrt(_sq_norm(q_ptr, q_base, q_sd, Dv, ACC, BLOCK_D)), eps)
    p_inv = 1.0 / tl.maximum(tl.sqrt(_sq_norm(pos_ptr, p_base, p_sd, Dv, ACC, BLOCK_D)), eps)
    s_pos = _dot(q_ptr, q_base, q_sd, pos_ptr, p_base, p_sd, Dv, ACC, BLOCK_D) \
        * a_inv * p_inv * inv_t
    m_run = s_pos
    l_run = s_pos * 0.0 + 1.0
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kidx = tl.load(nidx_ptr + m.to(tl.int64) * N + n, mask=n < Nv, other=-1)
        k_ok = kidx >= 0
        dot, ksq = _neg_block(q_ptr, q_base, q_sd, k_ptr, _row(tl.maximum(kidx, 0), k_HW, k_sb,
                              k_ss), k_sd, k_ok, D, ACC, BLOCK_N, BLOCK_D)
        s = dot * a_inv / tl.maximum(tl.sqrt(ksq), eps) * inv_t
        s = tl.where(k_ok, s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, axis=0))
        l_run = l_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m_run = m_new
    lse = m_run + tl.log(l_run)
    tl.store(loss_ptr + m, tl.where(ok, lse - s_pos, 0.0))
    tl.store(lse_ptr + m, tl.where(ok, lse, 0.0))


@triton.jit
def _infonce_bwd_kernel(q_ptr, k_ptr, pos_ptr, qidx_ptr, pidx_ptr, nidx_ptr, lse_ptr, g_ptr,
                        dq_ptr, N, D, q_HW, q_sb, q_ss, q_sd, k_HW, k_sb, k_ss, k_sd, p_sr, p_sd,
                        inv_t, eps, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    m = tl.program_id(0)
    qi = tl.load(qidx_ptr + m)
    ok = qi >= 0
    Dv = tl.where(ok, D, 0)                 # valid lengths: D, N for a query, 0 for none
    Nv = tl.where(ok, N, 0)
    pi = tl.load(pidx_ptr + m)
    g = tl.load(g_ptr + m).to(ACC)
    g = tl.where(ok, g, 0.0)
    lse = tl.load(lse_ptr + m).to(ACC)
    q_base = _row(tl.maximum(qi, 0), q_HW, q_sb, q_ss)
    p_base = tl.maximum(pi, 0).to(tl.int64) * p_sr
    dq_row = dq_ptr + m.to(tl.int64) * D
    a_inv = 1.0 / tl.maximum(tl.sqrt(_sq_norm(q_ptr, q_base, q_sd, Dv, ACC, BLOCK_D)), eps)
    p_inv = 1.0 / tl.maximum(tl.sqrt(_sq_norm(pos_ptr, p_base, p_sd, Dv, ACC, BLOCK_D)), eps)
    cos_pos = _dot(q_ptr, q_base, q_sd, pos_ptr, p_base, p_sd, Dv, ACC, BLOCK_D) * a_inv * p_inv
    w_pos = g * (tl.exp(cos_pos * inv_t - lse) - 1.0)
    coef = w_pos * cos_pos                                  # sum_j w_j cos_j
    # dq <- w_pos * p^ (then += sum_j w_j k^_j over the negatives)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        pv = tl.load(pos_ptr + p_base + d.to(tl.int64) * p_sd, mask=d < Dv, other=0.0).to(ACC)
        tl.store(dq_row + d, w_pos * pv * p_inv, mask=dm)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kidx = tl.load(nidx_ptr + m.to(tl.int64) * N + n, mask=n < Nv, other=-1)
        k_ok = kidx >= 0
        k_rows = _row(tl.maximum(kidx, 0), k_HW, k_sb, k_ss)
        dot, ksq = _neg_block(q_ptr, q_base, q_sd, k_ptr, k_rows, k_sd, k_ok, D, ACC, BLOCK_N,
                              BLOCK_D)
        k_inv = 1.0 / tl.maximum(tl.sqrt(ksq), eps)
        cos = dot * a_inv * k_inv
        w = tl.where(k_ok, g * tl.exp(cos * inv_t - lse), 0.0)
        coef += tl.sum(w * cos, axis=0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            k = tl.load(k_ptr + k_rows[:, None] + d[None, :].to(tl.int64) * k_sd,
                        mask=k_ok[:, None] & dm[None, :], other=0.0).to(ACC)
            acc = tl.load(dq_row + d, mask=dm, other=0.0)
            tl.store(dq_row + d, acc + tl.sum((w * k_inv)[:, None] * k, axis=0), mask=dm)
    # dq = (sum_j w_j k^_j - coef a^) / (t |a|)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        a = tl.load(q_ptr + q_base + d.to(tl.int64) * q_sd, mask=d < Dv, other=0.0).to(ACC)
        acc = tl.load(dq_row + d, mask=dm, other=0.0)
        tl.store(dq_row + d, (acc - coef * a * a_inv) * a_inv * inv_t, mask=dm)


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
    # GPU: 16 x 32 key tiles (fewer than 72 registers, no spill on sm_80/sm_90 with triton 3.6-3.9;
    # wider tiles spilled a few bytes on sm_80/sm_90 under 3.6)
    BLOCK_D = min(next_pow2(D), 32 if gpu_config() else 128)
    BLOCK_N = 16 if gpu_config() else 64
    if gpu_config() and dtype == torch.float64:
        BLOCK_D = min(BLOCK_D, 16)              # fp64 values take two registers each
    # maxnreg: without a bound ptxas sometimes settles on 64 registers and spills a few bytes
    opts = dict(maxnreg=255) if gpu_config() else {}
    return BLOCK_N, BLOCK_D, opts


def _key_layout(pool, keys, layout):
    """The negatives' tensor and layout: keys' rows when given (U2PL's bank), else pool's."""
    if keys is None:
        return (pool, *layout)
    keys, _, _, k_HW, k_sb, k_ss, k_sd = pool_layout(keys)
    return keys, k_HW, k_sb, k_ss, k_sd


def infonce_forward(pool, pos_pool, q_idx, pos_idx, neg_idx, temperature: float, eps=1e-8,
                    keys=None):
    """pool: (P, D) rows or a (B, D, h, w) map (queries and negatives are its rows); pos_pool:
    (R, D) rows; q_idx, pos_idx: (M,) int; neg_idx: (M, N) int (-1 = absent); keys: (S, D) rows
    the negatives index instead of pool's. Returns per-query loss and log-sum-exp, (M,) float32
    (float64 for float64 pool)."""
    pool, P, D, HW, s_b, s_s, s_d = pool_layout(pool)
    keys, k_HW, k_sb, k_ss, k_sd = _key_layout(pool, keys, (HW, s_b, s_s, s_d))
    M, N = neg_idx.shape
    dt = torch_acc_dtype(pool.dtype)
    loss = torch.empty(M, dtype=dt, device=pool.device)
    lse = torch.empty(M, dtype=dt, device=pool.device)
    if M == 0:
        return loss, lse
    BLOCK_N, BLOCK_D, opts = _blocks(D, pool.dtype)
    _infonce_fwd_kernel[(M,)](
        pool, keys, pos_pool, q_idx.to(torch.int32).contiguous(),
        pos_idx.to(torch.int32).contiguous(), neg_idx.to(torch.int32).contiguous(), loss, lse,
        N, D, HW, s_b, s_s, s_d, k_HW, k_sb, k_ss, k_sd, pos_pool.stride(0), pos_pool.stride(1),
        1.0 / temperature, eps, ACC=acc_dtype(pool.dtype), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        **opts)
    return loss, lse


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
    BLOCK_N, BLOCK_D, opts = _blocks(D, pool.dtype)
    _infonce_bwd_kernel[(M,)](
        pool, keys, pos_pool, q_idx.to(torch.int32).contiguous(),
        pos_idx.to(torch.int32).contiguous(), neg_idx.to(torch.int32).contiguous(),
        lse.contiguous(), grad.contiguous(), dq,
        N, D, HW, s_b, s_s, s_d, k_HW, k_sb, k_ss, k_sd, pos_pool.stride(0), pos_pool.stride(1),
        1.0 / temperature, eps, ACC=acc_dtype(pool.dtype), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        **opts)
    if not key_grad:
        return dq, None, None
    slots = torch.arange(M, device=pool.device)
    dk = _key_grad(pool, pool, q_idx, neg_idx.reshape(-1), slots.repeat_interleave(N), lse,
                   grad, temperature, False, eps)
    dpos = _key_grad(pool, pos_pool, q_idx, pos_idx.reshape(-1), slots, lse, grad,
                     temperature, True, eps)
    return dq, dk, dpos
