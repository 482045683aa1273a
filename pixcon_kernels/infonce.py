"""InfoNCE over sparse pixel sets: per query row m, one positive and N negatives given as row
indices, cosine logits over a temperature, online log-sum-exp. Nothing of size M x N x D (nor
M x N) is ever stored: the forward keeps one (max, sum) pair per query, the backward recomputes
the logits from the indices and the saved log-sum-exp.

    s_j   = cos(a_m, k_j) / t,   k_0 = positive, k_1..N = negatives (index -1: absent)
    loss_m = logsumexp_j s_j - s_0          (0 where the query index is -1)
    dL/da  = g_m / (t |a|) * (sum_j w_j k^_j - (sum_j w_j cos_j) a^),  w_j = softmax_j - [j = 0]
    dL/dk_j = g_m w_j / (t |k_j|) * (a^ - cos_j k^_j)          (only with KEY_GRAD)

cos(a, k) = a.k / (max(|a|, eps) max(|k|, eps)) as torch.cosine_similarity.
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
                        dq_ptr, dk_ptr, dpos_ptr,
                        N, D, q_HW, q_sb, q_ss, q_sd, k_HW, k_sb, k_ss, k_sd, p_sr, p_sd,
                        dk_HW, dk_sb, dk_ss, dk_sd, inv_t, eps, ACC: tl.constexpr,
                        KEY_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
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
        if KEY_GRAD:
            a = tl.load(q_ptr + q_base + d.to(tl.int64) * q_sd, mask=d < Dv, other=0.0).to(ACC)
            tl.atomic_add(dpos_ptr + p_base + d.to(tl.int64) * p_sd,
                          w_pos * inv_t * p_inv * (a * a_inv - cos_pos * pv * p_inv),
                          mask=d < Dv)
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
        dk_rows = _row(tl.maximum(kidx, 0), dk_HW, dk_sb, dk_ss)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            k = tl.load(k_ptr + k_rows[:, None] + d[None, :].to(tl.int64) * k_sd,
                        mask=k_ok[:, None] & dm[None, :], other=0.0).to(ACC)
            acc = tl.load(dq_row + d, mask=dm, other=0.0)
            tl.store(dq_row + d, acc + tl.sum((w * k_inv)[:, None] * k, axis=0), mask=dm)
            if KEY_GRAD:
                a = tl.load(q_ptr + q_base + d.to(tl.int64) * q_sd, mask=dm, other=0.0).to(ACC)
                dk = (w * inv_t * k_inv)[:, None] * (a[None, :] * a_inv
                                                    - (cos * k_inv)[:, None] * k)
                tl.atomic_add(dk_ptr + dk_rows[:, None] + d[None, :].to(tl.int64) * dk_sd, dk,
                              mask=k_ok[:, None] & dm[None, :])
    # dq = (sum_j w_j k^_j - coef a^) / (t |a|)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        a = tl.load(q_ptr + q_base + d.to(tl.int64) * q_sd, mask=d < Dv, other=0.0).to(ACC)
        acc = tl.load(dq_row + d, mask=dm, other=0.0)
        tl.store(dq_row + d, (acc - coef * a * a_inv) * a_inv * inv_t, mask=dm)


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


def infonce_forward(pool, pos_pool, q_idx, pos_idx, neg_idx, temperature: float, eps=1e-8):
    """pool: (P, D) rows or a (B, D, h, w) map (queries and negatives are its rows); pos_pool:
    (R, D) rows; q_idx, pos_idx: (M,) int; neg_idx: (M, N) int (-1 = absent). Returns per-query
    loss and log-sum-exp, (M,) float32 (float64 for float64 pool)."""
    pool, P, D, HW, s_b, s_s, s_d = pool_layout(pool)
    M, N = neg_idx.shape
    dt = torch_acc_dtype(pool.dtype)
    loss = torch.empty(M, dtype=dt, device=pool.device)
    lse = torch.empty(M, dtype=dt, device=pool.device)
    if M == 0:
        return loss, lse
    BLOCK_N, BLOCK_D, opts = _blocks(D, pool.dtype)
    _infonce_fwd_kernel[(M,)](
        pool, pool, pos_pool, q_idx.to(torch.int32).contiguous(),
        pos_idx.to(torch.int32).contiguous(), neg_idx.to(torch.int32).contiguous(), loss, lse,
        N, D, HW, s_b, s_s, s_d, HW, s_b, s_s, s_d, pos_pool.stride(0), pos_pool.stride(1),
        1.0 / temperature, eps, ACC=acc_dtype(pool.dtype), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        **opts)
    return loss, lse


def infonce_backward(grad, pool, pos_pool, q_idx, pos_idx, neg_idx, lse, temperature: float,
                     key_grad: bool, eps=1e-8):
    """Returns (dq (M, D) gradient of each query row, dkeys, dpos): dkeys has pool's logical shape
    (contiguous) and dpos pos_pool's, both in the accumulation dtype and None unless key_grad."""
    pool, P, D, HW, s_b, s_s, s_d = pool_layout(pool)
    M, N = neg_idx.shape
    dt = torch_acc_dtype(pool.dtype)
    dq = torch.empty(M, D, dtype=dt, device=pool.device)
    if key_grad:
        dk = torch.zeros(pool.shape, dtype=dt, device=pool.device)
        dpos = torch.zeros(pos_pool.shape, dtype=dt, device=pool.device)
        _, _, _, dk_HW, dk_sb, dk_ss, dk_sd = pool_layout(dk)
        if dpos.stride() != pos_pool.stride():
            raise ValueError("pos_pool must be contiguous when key gradients are requested")
    else:
        dk = dpos = dq  # never written (KEY_GRAD is a compile-time False)
        dk_HW, dk_sb, dk_ss, dk_sd = 1, 0, 0, 0
    if M == 0:
        return dq, (dk if key_grad else None), (dpos if key_grad else None)
    BLOCK_N, BLOCK_D, opts = _blocks(D, pool.dtype)
    _infonce_bwd_kernel[(M,)](
        pool, pool, pos_pool, q_idx.to(torch.int32).contiguous(),
        pos_idx.to(torch.int32).contiguous(), neg_idx.to(torch.int32).contiguous(),
        lse.contiguous(), grad.contiguous(), dq, dk, dpos,
        N, D, HW, s_b, s_s, s_d, HW, s_b, s_s, s_d, pos_pool.stride(0), pos_pool.stride(1),
        dk_HW, dk_sb, dk_ss, dk_sd, 1.0 / temperature, eps, ACC=acc_dtype(pool.dtype),
        KEY_GRAD=key_grad, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, **opts)
    return dq, (dk if key_grad else None), (dpos if key_grad else None)
