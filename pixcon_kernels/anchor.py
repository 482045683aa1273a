"""Pixel x anchor contrast (Contextrast's L_PA), fused: logits s = z . a / t are recomputed per
pixel tile (an exact-fp32 ``tl.dot`` over D, never TF32) and never stored.

  pass 1: NL_c = logsumexp over the negatives of anchor c of s[:, c]   (per-program partials)
  pass 2: per class c, sum over its positives of softplus(NL_c - s[p, c]) and of its sigmoid
  backward: ds = pos * (-sigmoid(NL_c - s) g_c) + neg * exp(s - NL_c) g_c sigsum_c,
            dz = ds a / t (one program per pixel tile, looping over class blocks),
            da = ds^T z / t (per-program partials over pixel ranges, per class and D block)

Classes are tiled (BLOCK_C on a GPU), so registers and shared memory do not grow with C.
Bottleneck: the logits GEMM (P x C x D, exact fp32 FMA, recomputed once per D block in the da
pass); floor: reading z once per pass, P x D x 4 bytes.

Negatives are given per pixel by ``negcls``: -1 = nobody's negative; R1 (``ONLY_OWN`` False):
negative of every anchor c != negcls; R2 (``ONLY_OWN`` True): negative of anchor negcls only.
"""
import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, gpu_config, next_pow2, torch_acc_dtype


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
    """Program (g, cb): online (max, sum-exp) over its pixel range for class block cb."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
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
    """Program (g, cb): sums of softplus(NL_c - s) and sigmoid(NL_c - s) over its positives."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
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
def _dlogits(z_ptr, a_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, p, c, P, C, D, inv_t,
             ACC: tl.constexpr, ONLY_OWN: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """dLoss/ds for a [BLOCK_P, BLOCK_C] tile of logits (recomputed), already times 1/t."""
    cmask = c < C
    nl = tl.load(nl_ptr + c, mask=cmask, other=float("-inf")).to(ACC)
    has = nl > float("-inf")
    gc = tl.load(gc_ptr + c, mask=cmask, other=0.0).to(ACC)          # upstream grad per class
    coef = tl.load(coef_ptr + c, mask=cmask, other=0.0).to(ACC)      # g_c * sum sigmoid
    s = _logits(z_ptr, a_ptr, p, c, P, C, D, inv_t, ACC, BLOCK_P, BLOCK_C, BLOCK_D)
    _, pos, neg = _masks(gt_ptr, neg_ptr, p, c, P, C, ONLY_OWN)
    pos = pos & has[None, :]
    nl_safe = tl.where(has, nl, 0.0)[None, :]
    x = tl.where(pos, nl_safe - s, 0.0)
    ds = tl.where(pos, -gc[None, :] / (1.0 + tl.exp(-x)), 0.0)
    ds += tl.where(neg & has[None, :], tl.exp(s - nl_safe) * coef[None, :], 0.0)
    return ds * inv_t


@triton.jit
def _bwd_dz_kernel(z_ptr, a_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, dz_ptr, P, C, D,
                   inv_t, ACC: tl.constexpr, ONLY_OWN: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program t owns pixel rows t*BLOCK_P...: dz = sum over class blocks of ds @ a, accumulated
    in its own rows of dz (no other program writes them)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    rows = p[:, None].to(tl.int64) * D
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ds = _dlogits(z_ptr, a_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, p, c, P, C, D,
                      inv_t, ACC, ONLY_OWN, BLOCK_P, BLOCK_C, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = pm[:, None] & (d < D)[None, :]
            a = tl.load(a_ptr + c[:, None] * D + d[None, :],
                        mask=(c < C)[:, None] & (d < D)[None, :], other=0.0).to(ACC)
            dz = _dot(ds, a, ACC)
            if c0 > 0:
                dz += tl.load(dz_ptr + rows + d[None, :], mask=dm, other=0.0)
            tl.store(dz_ptr + rows + d[None, :], dz, mask=dm)


@triton.jit
def _bwd_da_kernel(z_ptr, a_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, da_ptr, P, C, D,
                   per_prog, inv_t, ACC: tl.constexpr, ONLY_OWN: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (g, cb, db): partial da[g, class block, D block] = ds^T @ z over its pixels."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    da = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    start = g * per_prog
    for p0 in range(start, tl.minimum(start + per_prog, P), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ds = _dlogits(z_ptr, a_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, p, c, P, C, D,
                      inv_t, ACC, ONLY_OWN, BLOCK_P, BLOCK_C, BLOCK_D)
        z = tl.load(z_ptr + p[:, None].to(tl.int64) * D + d[None, :],
                    mask=(p < P)[:, None] & dm[None, :], other=0.0).to(ACC)
        da += _dot(tl.trans(ds), z, ACC)
    tl.store(da_ptr + (g * C + c[:, None]).to(tl.int64) * D + d[None, :], da,
             mask=(c < C)[:, None] & dm[None, :])


def _setup(z, C):
    """Tiles: BLOCK_P pixels x BLOCK_C classes, D in BLOCK_D chunks. On a GPU the class
    dimension is tiled (32 classes a block: registers and shared memory stay bounded for any C,
    ADE20K's 150 and COCO-Stuff's 171 included); the interpreter takes all classes at once
    (its cost is per program, not per register)."""
    P, D = z.shape
    gpu = gpu_config()
    wide = z.dtype == torch.float64                     # fp64 values take two registers
    BLOCK_C = min(next_pow2(C), 16 if wide else 32) if gpu else next_pow2(C)
    BLOCK_D = min(next_pow2(D), 16 if gpu else 128)
    BLOCK_P = 32 if gpu and wide else 64
    n_tiles = triton.cdiv(max(P, 1), BLOCK_P)
    G = max(1, min(n_tiles, 264 if gpu else 4))
    per_prog = triton.cdiv(n_tiles, G) * BLOCK_P
    G = triton.cdiv(max(P, 1), per_prog)
    # num_stages=1: pipelining the D loop's loads spills the exact-fp32 FMA dots. maxnreg=255:
    # without an explicit bound ptxas sometimes settles on 64-72 registers and spills a few
    # bytes (seen on sm_90); with it these kernels take what they need and spill nothing
    # (RESOURCES.md).
    opts = dict(num_stages=1, maxnreg=255) if gpu else {}
    return P, D, G, per_prog, triton.cdiv(C, BLOCK_C), dict(
        ACC=acc_dtype(z.dtype), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, **opts)


def _prepare(z, anchors, gt, negcls):
    return (z.contiguous(), anchors.to(z.dtype).contiguous(), gt.to(torch.int32).contiguous(),
            negcls.to(torch.int32).contiguous())


def anchor_forward(z, anchors, gt, negcls, temperature: float, only_own: bool):
    """z (P, D), anchors (C, D), gt (P,) (-1 ignored), negcls (P,). Returns per-class sums of
    softplus(NL_c - s) over positives (C,), NL (C,) (-inf: no negative) and per-class sums of
    sigmoid(NL_c - s) (C,), in float32 (float64 for float64 z)."""
    z, anchors, gt, negcls = _prepare(z, anchors, gt, negcls)
    C = anchors.shape[0]
    P, D, G, per_prog, n_cb, kw = _setup(z, C)
    dt = torch_acc_dtype(z.dtype)
    m = torch.empty(G, C, dtype=dt, device=z.device)
    l = torch.empty(G, C, dtype=dt, device=z.device)
    inv_t = 1.0 / temperature
    _neg_lse_kernel[(G, n_cb)](z, anchors, gt, negcls, m, l, P, C, D, per_prog, inv_t,
                               ONLY_OWN=only_own, **kw)
    mx = m.amax(dim=0)
    mx_safe = torch.where(torch.isfinite(mx), mx, 0.0)
    tot = (l * torch.exp(torch.where(torch.isfinite(m), m, mx_safe) - mx_safe)).sum(0)
    nl = torch.where(tot > 0, mx_safe + torch.log(tot.clamp(min=torch.finfo(dt).tiny)),
                     float("-inf"))
    loss = torch.empty(G, C, dtype=dt, device=z.device)
    sig = torch.empty(G, C, dtype=dt, device=z.device)
    _pos_kernel[(G, n_cb)](z, anchors, gt, negcls, nl, loss, sig, P, C, D, per_prog, inv_t,
                           ONLY_OWN=only_own, **kw)
    return loss.sum(0), nl, sig.sum(0)


def anchor_backward(grad, z, anchors, gt, negcls, nl, sigsum, temperature: float,
                    only_own: bool):
    """Gradients of sum_c grad[c] * loss_sum[c] w.r.t. z (P, D) and anchors (C, D)."""
    z, anchors, gt, negcls = _prepare(z, anchors, gt, negcls)
    C = anchors.shape[0]
    P, D, G, per_prog, n_cb, kw = _setup(z, C)
    dt = torch_acc_dtype(z.dtype)
    grad = grad.to(dt).contiguous()
    coef = (grad * sigsum).contiguous()
    nl = nl.contiguous()
    dz = torch.empty(P, D, dtype=dt, device=z.device)
    da = torch.empty(G, C, D, dtype=dt, device=z.device)
    inv_t = 1.0 / temperature
    # dz on a GPU: 32-pixel tiles and 8 warps (64-pixel tiles or 4 warps spill a few bytes on
    # sm_90 with some triton releases)
    kw_dz = dict(kw, BLOCK_P=32, num_warps=8) if gpu_config() else kw
    _bwd_dz_kernel[(triton.cdiv(max(P, 1), kw_dz["BLOCK_P"]),)](
        z, anchors, gt, negcls, nl, grad, coef, dz, P, C, D, inv_t, ONLY_OWN=only_own, **kw_dz)
    _bwd_da_kernel[(G, n_cb, triton.cdiv(D, kw["BLOCK_D"]))](
        z, anchors, gt, negcls, nl, grad, coef, da, P, C, D, per_prog, inv_t,
        ONLY_OWN=only_own, **kw)
    return dz, da.sum(0)
