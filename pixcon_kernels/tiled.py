"""Tiled supervised contrast (anchors x keys, flash-attention pattern), the primitive shared by
ContrastiveSeg, the dense mode and CAC. s = a . k / t is recomputed per (anchor tile, key tile)
on tensor cores and never stored:

  forward (one program per anchor tile, two sweeps over the key tiles):
    pass 1: NL_r = online log-sum-exp of s_rk over keys of another label
    pass 2: term_r = mean over keys of the same label (r itself excluded in-batch) of
            softplus(NL_r - s_rp); W_r = the sum of sigmoid(NL_r - s_rp)
  backward: ds_rk = (c_r W_r + g_r) e^{s_rk - NL_r} (negatives; g the gradient of NL itself), -c_r sigmoid(NL_r - s_rk) (positives),
            c_r = grad_r / |P(r)|; da = ds k / t (one program per anchor tile, looping over key
            tiles), dk = ds^T a / t (one program per key tile, looping over anchor tiles): two
            kernels, no atomics, deterministic.

A key tile with no negative (pass 1) or no positive (pass 2) of the anchor tile is skipped from
its labels alone; with anchors and keys sorted by label (the caller does it) pass 2 touches only
the anchor tile's own classes. Labels -1 mark absent rows. fp32 inputs use 3xTF32 dots
("tf32x3", fp32-level accuracy on tensor cores), fp16/bf16 native dots with fp32 accumulation,
fp64 exact dots. Bottleneck: the logits GEMMs (forward 1 + 1/C passes, backward 2 recomputes and
2 gradient GEMMs); floor: 2 M N D FLOPs per GEMM at the tensor-core rate, inputs read once.
"""
import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, gpu_config, next_pow2, torch_acc_dtype


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """s (BLOCK_M, BLOCK_N) = a[rows] . k[cols] / t, accumulated over D in BLOCK_D chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * D + d[None, :],
                    mask=(rows < M)[:, None] & (d < D)[None, :], other=0.0)
        k = tl.load(k_ptr + cols[:, None].to(tl.int64) * D + d[None, :],
                    mask=(cols < N)[:, None] & (d < D)[None, :], other=0.0)
        s += _dot(a, tl.trans(k), PREC)
    return s * inv_t


@triton.jit
def _masks(ya, yk, rows, cols, IN_BATCH: tl.constexpr):
    valid = (ya[:, None] >= 0) & (yk[None, :] >= 0)
    same = (ya[:, None] == yk[None, :]) & valid
    neg = valid & (ya[:, None] != yk[None, :])
    if IN_BATCH:
        same = same & (rows[:, None] != cols[None, :])
    return neg, same


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _tiled_fwd_kernel(a_ptr, ya_ptr, k_ptr, yk_ptr, nl_ptr, term_ptr, w_ptr, npos_ptr, M, N, D,
                      inv_t, IN_BATCH: tl.constexpr, POSITIVES: tl.constexpr, ACC: tl.constexpr,
                      PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ya = tl.load(ya_ptr + rows, mask=rows < M, other=-1)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):                                   # pass 1: negatives
        cols = n0 + tl.arange(0, BLOCK_N)
        yk = tl.load(yk_ptr + cols, mask=cols < N, other=-1)
        neg, _ = _masks(ya, yk, rows, cols, IN_BATCH)
        if tl.max(neg.to(tl.int32)) > 0:
            s = _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC, PREC, BLOCK_M,
                        BLOCK_N, BLOCK_D)
            s = tl.where(neg, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            finite = m_new > float("-inf")
            m_ref = tl.where(finite, m_new, 0.0)                       # no inf - inf anywhere
            e = tl.where(neg, tl.exp(s - m_ref[:, None]), 0.0)
            l = l * tl.exp(tl.where(finite, m, 0.0) - m_ref) + tl.sum(e, axis=1)
            m = m_new
    nl = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    sp = tl.zeros([BLOCK_M], dtype=ACC)
    w = tl.zeros([BLOCK_M], dtype=ACC)
    cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
    if POSITIVES:
        for n0 in range(0, N, BLOCK_N):                               # pass 2: positives
            cols = n0 + tl.arange(0, BLOCK_N)
            yk = tl.load(yk_ptr + cols, mask=cols < N, other=-1)
            _, pos = _masks(ya, yk, rows, cols, IN_BATCH)
            if tl.max(pos.to(tl.int32)) > 0:
                s = _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC, PREC, BLOCK_M,
                            BLOCK_N, BLOCK_D)
                x = nl[:, None] - s
                sp += tl.sum(tl.where(pos, _softplus(x), 0.0), axis=1)
                w += tl.sum(tl.where(pos, 1.0 / (1.0 + tl.exp(-x)), 0.0), axis=1)
                cnt += tl.sum(pos.to(tl.int32), axis=1)
    rm = rows < M
    tl.store(nl_ptr + rows, nl, mask=rm)
    tl.store(term_ptr + rows, sp / tl.maximum(cnt, 1).to(ACC), mask=rm)
    tl.store(w_ptr + rows, w, mask=rm)
    tl.store(npos_ptr + rows, cnt, mask=rm)


@triton.jit
def _dlogits(s, neg, pos, nl, cw, c):
    """d term / d s for one tile: c W e^{s - NL} on negatives, -c sigmoid(NL - s) on positives."""
    e = tl.where(neg, tl.exp(s - tl.where(neg, nl[:, None], 0.0)) * cw[:, None], 0.0)
    return e - tl.where(pos, c[:, None] / (1.0 + tl.exp(s - nl[:, None])), 0.0)


@triton.jit
def _tiled_bwd_da_kernel(a_ptr, ya_ptr, k_ptr, yk_ptr, nl_ptr, cw_ptr, c_ptr, da_ptr, M, N, D,
                         inv_t, IN_BATCH: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                         PREC_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         D_PAD: tl.constexpr):
    """da[rows] = sum over key tiles of ds k / t (one program per anchor tile)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    ya = tl.load(ya_ptr + rows, mask=rm, other=-1)
    nl = tl.load(nl_ptr + rows, mask=rm, other=0.0)
    cw = tl.load(cw_ptr + rows, mask=rm, other=0.0)
    c = tl.load(c_ptr + rows, mask=rm, other=0.0)
    dfull = tl.arange(0, D_PAD)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        yk = tl.load(yk_ptr + cols, mask=cols < N, other=-1)
        neg, pos = _masks(ya, yk, rows, cols, IN_BATCH)
        live = (neg & (cw != 0.0)[:, None]) | (pos & (c != 0.0)[:, None])
        if tl.max(live.to(tl.int32)) > 0:
            s = _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC, PREC, BLOCK_M,
                        BLOCK_N, BLOCK_D)
            ds = _dlogits(s, neg, pos, nl, cw, c)
            k = tl.load(k_ptr + cols[:, None].to(tl.int64) * D + dfull[None, :],
                        mask=(cols < N)[:, None] & (dfull < D)[None, :], other=0.0).to(ACC)
            acc += _dot(ds, k, PREC_G)
    tl.store(da_ptr + rows[:, None].to(tl.int64) * D + dfull[None, :], acc * inv_t,
             mask=rm[:, None] & (dfull < D)[None, :])


@triton.jit
def _tiled_bwd_dk_kernel(a_ptr, ya_ptr, k_ptr, yk_ptr, nl_ptr, cw_ptr, c_ptr, dk_ptr, M, N, D,
                         inv_t, IN_BATCH: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                         PREC_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         D_PAD: tl.constexpr):
    """dk[cols] = sum over anchor tiles of ds^T a / t (one program per key tile)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    yk = tl.load(yk_ptr + cols, mask=cm, other=-1)
    dfull = tl.arange(0, D_PAD)
    acc = tl.zeros([BLOCK_N, D_PAD], dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < M
        ya = tl.load(ya_ptr + rows, mask=rm, other=-1)
        c = tl.load(c_ptr + rows, mask=rm, other=0.0)
        cw = tl.load(cw_ptr + rows, mask=rm, other=0.0)
        neg, pos = _masks(ya, yk, rows, cols, IN_BATCH)
        live = (neg & (cw != 0.0)[:, None]) | (pos & (c != 0.0)[:, None])
        if tl.max(live.to(tl.int32)) > 0:
            nl = tl.load(nl_ptr + rows, mask=rm, other=0.0)
            s = _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC, PREC, BLOCK_M,
                        BLOCK_N, BLOCK_D)
            ds = _dlogits(s, neg, pos, nl, cw, c)
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * D + dfull[None, :],
                        mask=rm[:, None] & (dfull < D)[None, :], other=0.0).to(ACC)
            acc += _dot(tl.trans(ds), a, PREC_G)
    tl.store(dk_ptr + cols[:, None].to(tl.int64) * D + dfull[None, :], acc * inv_t,
             mask=cm[:, None] & (dfull < D)[None, :])


def _precision(dtype):
    """Dot precision of the logits (operands in the input dtype; only fp32 needs 3xTF32)."""
    return "tf32x3" if dtype == torch.float32 else "ieee"


def _grad_precision(dtype):
    """Dot precision of the gradient GEMMs (ds and the rows are fp32, fp64 for fp64 inputs)."""
    return "ieee" if dtype == torch.float64 else "tf32x3"


def _config(D, dtype, backward):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). GPU: 64 x 32 logit tiles in forward, 32 x 32 in
    backward (a BLOCK x D accumulator lives in registers), logits summed over 32-wide D chunks
    (larger tiles spill: every 2-D tile costs BLOCK_M BLOCK_N / threads registers, pointers
    twice that); the interpreter: large tiles (its cost is per program)."""
    if not gpu_config():
        return 64, 64, next_pow2(D), 4
    if dtype == torch.float64:
        return 16, 16, min(next_pow2(D), 32), 4
    if backward:
        return 32, 32, 32, 8
    return 64, 32, 32, 4


def tiled_forward(a, ya, k, yk, temperature, in_batch, positives=True):
    """a (M, D), k (N, D) contiguous, labels int32 (M,), (N,); k is a when in_batch.
    Returns (terms, npos int32, nl, w); positives=False skips pass 2 (terms, npos, w zero)."""
    a, k = a.contiguous(), k.contiguous()
    M, D = a.shape
    N = k.shape[0]
    acc = torch_acc_dtype(a.dtype)
    nl = torch.empty(M, dtype=acc, device=a.device)
    term, w = torch.empty_like(nl), torch.empty_like(nl)
    npos = torch.empty(M, dtype=torch.int32, device=a.device)
    if M == 0:
        return term, npos, nl, w
    bm, bn, bd, nw = _config(D, a.dtype, False)
    _tiled_fwd_kernel[(triton.cdiv(M, bm),)](
        a, ya.to(torch.int32), k, yk.to(torch.int32), nl, term, w, npos, M, N, D,
        1.0 / temperature, IN_BATCH=in_batch, POSITIVES=positives, ACC=acc_dtype(a.dtype), PREC=_precision(a.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=nw, num_stages=1, maxnreg=255)
    return term, npos, nl, w


def tiled_backward(grad, a, ya, k, yk, nl, w, npos, temperature, in_batch, key_grad,
                   grad_nl=None):
    """Gradients (da, dk) of sum(grad * terms + grad_nl * nl) in the accumulation dtype; dk is
    None unless key_grad (in-batch: da already holds both sides)."""
    a, k = a.contiguous(), k.contiguous()
    M, D = a.shape
    N = k.shape[0]
    acc = torch_acc_dtype(a.dtype)
    c = torch.where(npos > 0, grad.to(acc) / npos.clamp(min=1).to(acc), 0.0).contiguous()
    cw = c * w if grad_nl is None else c * w + grad_nl.to(acc)      # weight of e^{s - NL}
    cw = cw.contiguous()
    da = torch.zeros(M, D, dtype=acc, device=a.device)
    dk = torch.zeros(N, D, dtype=acc, device=a.device) if (key_grad or in_batch) else None
    if M == 0 or N == 0:
        return da, dk
    bm, bn, bd, nw = _config(D, a.dtype, True)
    args = (a, ya.to(torch.int32), k, yk.to(torch.int32), nl.contiguous(), cw, c)
    meta = dict(IN_BATCH=in_batch, ACC=acc_dtype(a.dtype), PREC=_precision(a.dtype),
                PREC_G=_grad_precision(a.dtype),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, D_PAD=next_pow2(D), num_warps=nw,
                num_stages=1, maxnreg=255)
    _tiled_bwd_da_kernel[(triton.cdiv(M, bm),)](*args, da, M, N, D, 1.0 / temperature, **meta)
    if dk is not None:
        _tiled_bwd_dk_kernel[(triton.cdiv(N, bn),)](*args, dk, M, N, D, 1.0 / temperature,
                                                    **meta)
    if in_batch:
        return da + dk, None
    return da, dk
