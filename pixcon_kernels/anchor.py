"""Pixel x anchor contrast (Contextrast's L_PA), fused: logits s = z . a / t are recomputed per
pixel tile (an exact-fp32 ``tl.dot`` over D, never TF32) and never stored.

  pass 1: NL_c = logsumexp over the negatives of anchor c of s[:, c]   (per-program partials)
  pass 2: per class c, sum over its positives of softplus(NL_c - s[p, c]) and of its sigmoid
  backward: ds = pos * (-sigmoid(NL_c - s) g_c) + neg * exp(s - NL_c) g_c sigsum_c,
            dz = ds a / t, da = ds^T z / t                              (per-program partials)

Negatives are given per pixel by ``negcls``: -1 = nobody's negative; R1 (``ONLY_OWN`` False):
negative of every anchor c != negcls; R2 (``ONLY_OWN`` True): negative of anchor negcls only.
"""
import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, interpreting, next_pow2, torch_acc_dtype


@triton.jit
def _dot(a, b, ACC: tl.constexpr):
    if ACC == tl.float64:
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _logits(z_ptr, a_ptr, p, c, P, C, D, inv_t, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        z = tl.load(z_ptr + p[:, None].to(tl.int64) * D + d[None, :],
                    mask=(p < P)[:, None] & (d < D)[None, :], other=0.0).to(ACC)
        a = tl.load(a_ptr + c[:, None] * D + d[None, :], mask=(c < C)[:, None] & (d < D)[None, :],
                    other=0.0).to(ACC)
        s += _dot(z, tl.trans(a), ACC)
    return s * inv_t


@triton.jit
def _masks(gt_ptr, neg_ptr, p, c, P, C, ONLY_OWN: tl.constexpr):
    pm = p < P
    gt = tl.load(gt_ptr + p, mask=pm, other=-1)
    nc = tl.load(neg_ptr + p, mask=pm, other=-1)
    cm = (c < C)[None, :]
    pos = (gt[:, None] == c[None, :]) & cm
    if ONLY_OWN:
        neg = (nc[:, None] == c[None, :]) & cm
    else:
        neg = (nc[:, None] >= 0) & (nc[:, None] != c[None, :]) & cm
    return gt, pos, neg


@triton.jit
def _neg_lse_kernel(z_ptr, a_ptr, gt_ptr, neg_ptr, m_ptr, l_ptr, P, C, D, per_prog, inv_t,
                    ACC: tl.constexpr, ONLY_OWN: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), ACC)
    l = tl.zeros([BLOCK_C], dtype=ACC)
    start = g * per_prog
    for p0 in range(start, tl.minimum(start + per_prog, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        s = _logits(z_ptr, a_ptr, p, c, P, C, D, inv_t, ACC, BLOCK_P, BLOCK_C, BLOCK_D)
        _, _, neg = _masks(gt_ptr, neg_ptr, p, c, P, C, ONLY_OWN)
        s = tl.where(neg, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        finite = m_new > float("-inf")
        m_ref = tl.where(finite, m_new, 0.0)                     # no inf - inf anywhere
        scale = tl.exp(tl.where(finite, m, 0.0) - m_ref)
        e = tl.where(neg, tl.exp(s - m_ref[None, :]), 0.0)
        l = l * scale + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + g * C + c, m, mask=c < C)
    tl.store(l_ptr + g * C + c, l, mask=c < C)


@triton.jit
def _pos_kernel(z_ptr, a_ptr, gt_ptr, neg_ptr, nl_ptr, loss_ptr, sig_ptr, P, C, D, per_prog,
                inv_t, ACC: tl.constexpr, ONLY_OWN: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    nl = tl.load(nl_ptr + c, mask=c < C, other=float("-inf")).to(ACC)
    has = nl > float("-inf")
    acc_l = tl.zeros([BLOCK_C], dtype=ACC)
    acc_s = tl.zeros([BLOCK_C], dtype=ACC)
    start = g * per_prog
    for p0 in range(start, tl.minimum(start + per_prog, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        s = _logits(z_ptr, a_ptr, p, c, P, C, D, inv_t, ACC, BLOCK_P, BLOCK_C, BLOCK_D)
        _, pos, _ = _masks(gt_ptr, neg_ptr, p, c, P, C, ONLY_OWN)
        pos = pos & has[None, :]
        x = tl.where(pos, nl[None, :] - s, 0.0)
        softplus = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        sig = 1.0 / (1.0 + tl.exp(-x))
        acc_l += tl.sum(tl.where(pos, softplus, 0.0), axis=0)
        acc_s += tl.sum(tl.where(pos, sig, 0.0), axis=0)
    tl.store(loss_ptr + g * C + c, acc_l, mask=c < C)
    tl.store(sig_ptr + g * C + c, acc_s, mask=c < C)


@triton.jit
def _bwd_kernel(z_ptr, a_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, dz_ptr, da_ptr, P, C,
                D, per_prog, inv_t, ACC: tl.constexpr, ONLY_OWN: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    nl = tl.load(nl_ptr + c, mask=cmask, other=float("-inf")).to(ACC)
    has = nl > float("-inf")
    gc = tl.load(gc_ptr + c, mask=cmask, other=0.0).to(ACC)          # upstream grad per class
    coef = tl.load(coef_ptr + c, mask=cmask, other=0.0).to(ACC)      # g_c * sum sigmoid
    a_d = tl.load(a_ptr + c[:, None] * D + d[None, :], mask=cmask[:, None] & dm[None, :],
                  other=0.0).to(ACC)
    da = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    start = g * per_prog
    for p0 in range(start, tl.minimum(start + per_prog, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < P
        s = _logits(z_ptr, a_ptr, p, c, P, C, D, inv_t, ACC, BLOCK_P, BLOCK_C, BLOCK_D)
        _, pos, neg = _masks(gt_ptr, neg_ptr, p, c, P, C, ONLY_OWN)
        pos = pos & has[None, :]
        nl_safe = tl.where(has, nl, 0.0)[None, :]
        x = tl.where(pos, nl_safe - s, 0.0)
        ds = tl.where(pos, -gc[None, :] / (1.0 + tl.exp(-x)), 0.0)
        ds += tl.where(neg & has[None, :], tl.exp(s - nl_safe) * coef[None, :], 0.0)
        ds = ds * inv_t
        dz = _dot(ds, a_d, ACC)                                          # [P, BLOCK_D]
        tl.store(dz_ptr + p[:, None].to(tl.int64) * D + d[None, :], dz,
                 mask=pm[:, None] & dm[None, :])
        z = tl.load(z_ptr + p[:, None].to(tl.int64) * D + d[None, :],
                    mask=pm[:, None] & dm[None, :], other=0.0).to(ACC)
        da += _dot(tl.trans(ds), z, ACC)
    tl.store(da_ptr + (g * C + c[:, None]).to(tl.int64) * D + d[None, :], da,
             mask=cmask[:, None] & dm[None, :])


def _setup(z, C):
    P, D = z.shape
    BLOCK_C = next_pow2(C)
    BLOCK_D = min(next_pow2(D), 64 if not interpreting() else 128)
    BLOCK_P = 64
    n_tiles = triton.cdiv(max(P, 1), BLOCK_P)
    G = max(1, min(n_tiles, 4 if interpreting() else 264))
    per_prog = triton.cdiv(n_tiles, G) * BLOCK_P
    G = triton.cdiv(max(P, 1), per_prog)
    return P, D, G, per_prog, dict(ACC=acc_dtype(z.dtype), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
                                   BLOCK_D=BLOCK_D)


def anchor_forward(z, anchors, gt, negcls, temperature: float, only_own: bool):
    """z (P, D), anchors (C, D), gt (P,) (-1 ignored), negcls (P,). Returns per-class sums of
    softplus(NL_c - s) over positives (C,), NL (C,) (-inf: no negative) and per-class sums of
    sigmoid(NL_c - s) (C,), in float32 (float64 for float64 z)."""
    z = z.contiguous()
    anchors = anchors.to(z.dtype).contiguous()
    gt = gt.to(torch.int32).contiguous()
    negcls = negcls.to(torch.int32).contiguous()
    C = anchors.shape[0]
    P, D, G, per_prog, kw = _setup(z, C)
    dt = torch_acc_dtype(z.dtype)
    m = torch.empty(G, C, dtype=dt, device=z.device)
    l = torch.empty(G, C, dtype=dt, device=z.device)
    inv_t = 1.0 / temperature
    _neg_lse_kernel[(G,)](z, anchors, gt, negcls, m, l, P, C, D, per_prog, inv_t,
                          ONLY_OWN=only_own, **kw)
    mx = m.amax(dim=0)
    mx_safe = torch.where(torch.isfinite(mx), mx, 0.0)
    tot = (l * torch.exp(torch.where(torch.isfinite(m), m, mx_safe) - mx_safe)).sum(0)
    nl = torch.where(tot > 0, mx_safe + torch.log(tot.clamp(min=torch.finfo(dt).tiny)),
                     float("-inf"))
    loss = torch.empty(G, C, dtype=dt, device=z.device)
    sig = torch.empty(G, C, dtype=dt, device=z.device)
    _pos_kernel[(G,)](z, anchors, gt, negcls, nl, loss, sig, P, C, D, per_prog, inv_t,
                      ONLY_OWN=only_own, **kw)
    return loss.sum(0), nl, sig.sum(0)


def anchor_backward(grad, z, anchors, gt, negcls, nl, sigsum, temperature: float,
                    only_own: bool):
    """Gradients of sum_c grad[c] * loss_sum[c] w.r.t. z (P, D) and anchors (C, D)."""
    z = z.contiguous()
    anchors = anchors.to(z.dtype).contiguous()
    gt = gt.to(torch.int32).contiguous()
    negcls = negcls.to(torch.int32).contiguous()
    C = anchors.shape[0]
    P, D, G, per_prog, kw = _setup(z, C)
    dt = torch_acc_dtype(z.dtype)
    grad = grad.to(dt).contiguous()
    coef = (grad * sigsum).contiguous()
    dz = torch.empty(P, D, dtype=dt, device=z.device)
    da = torch.empty(G, C, D, dtype=dt, device=z.device)
    _bwd_kernel[(G, triton.cdiv(D, kw["BLOCK_D"]))](
        z, anchors, gt, negcls, nl.contiguous(), grad, coef, dz, da, P, C, D, per_prog,
        1.0 / temperature, ONLY_OWN=only_own, **kw)
    return dz, da.sum(0)
