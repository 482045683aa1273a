"""Pixel x anchor contrast (Contextrast's L_PA), fused, straight from the NCHW embedding.

The kernels read x (B, D, h, w) in tiles of BLOCK_P consecutive pixels of one image (whole
32-byte sectors along the pixel axis) and the pixels' inverse norms (``inv_norms``: one pass,
P floats), so the unit rows z = x * inv are never materialised. The logits
S = z . a / t (P x C, C the classes: 76 bytes a pixel at C = 19 against 1 KiB of embedding)
are computed once, on tensor cores (3xTF32 for fp32/bf16/fp16 inputs: fp32-level accuracy;
fp64 dots for fp64), and stored; every later step reads S instead of recomputing it.

  forward   logits: S, and per program the online (max, sum-exp) of S over the negatives
            of each anchor -> NL_c = logsumexp over c's negatives
            terms: per class, sums over its positives of softplus(NL_c - S) and sigmoid(NL_c - S)
  backward  g = dL/dS from S alone: -G_c sigmoid(NL_c - S) on c's positives,
            G_c Sig_c exp(S - NL_c) on c's negatives
            anchors: da_c = sum_p g_pc z_p / t        (partials over pixel ranges)
            pixels:  dz_p = sum_c g_pc a_c / t, and with unit rows
                     dx_p = inv_p (dz_p - z_p (z_p . dz_p)),  z_p . dz_p = sum_c g_pc S_pc
                     written straight into the NCHW gradient (the radial term needs no pass
                     over D: it is a sum over the logits); given the gradient dS of the
                     layer's class sums (anchor_dx's dsums), dz_p += dS_{gt_p} and
                     z_p . dz_p += inv_p (x_p . dS_{gt_p}): one write of the gradient

Classes are tiled (BLOCK_C a GPU block), so registers and shared memory do not grow with C.
Negatives are given per pixel by ``negcls``: -1 = nobody's negative; R1 (``ONLY_OWN`` False):
negative of every anchor c != negcls; R2 (``ONLY_OWN`` True): negative of anchor negcls only.
"""
import torch
import triton
import triton.language as tl

from ._utils import (acc_dtype, gpu_config, next_pow2, pixel_chunk, pixel_tile, pixel_tiles,
                     pool_layout, torch_acc_dtype)


@triton.jit
def _inv_norm_kernel(x_ptr, inv_ptr, D, HW, s_b, s_s, s_d, TPI, eps, ACC: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b, hw, pm, p = pixel_tile(tl.program_id(0), TPI, HW, BLOCK_P)
    sq = tl.zeros([BLOCK_P], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        x = pixel_chunk(x_ptr, b, hw, pm, d0 + tl.arange(0, BLOCK_D), D, s_b, s_s, s_d).to(ACC)
        sq += tl.sum(x * x, axis=1)
    tl.store(inv_ptr + p, 1.0 / tl.maximum(tl.sqrt(sq), eps), mask=pm)


@triton.jit
def _masks(gt_ptr, neg_ptr, p, pm, c, C, ONLY_OWN: tl.constexpr):
    gt = tl.load(gt_ptr + p, mask=pm, other=-1)
    nc = tl.load(neg_ptr + p, mask=pm, other=-1)
    cm = (c < C)[None, :]
    pos = (gt[:, None] == c[None, :]) & cm
    if ONLY_OWN:
        neg = (nc[:, None] == c[None, :]) & cm
    else:
        neg = (nc[:, None] >= 0) & (nc[:, None] != c[None, :]) & cm
    return pos, neg


@triton.jit
def _logits_kernel(x_ptr, inv_ptr, a_ptr, gt_ptr, neg_ptr, s_ptr, m_ptr, l_ptr, C, D, HW, s_b,
                   s_s, s_d, T, TPI, tiles_per_prog, inv_t, ACC: tl.constexpr,
                   PREC: tl.constexpr, ONLY_OWN: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (g, cb): S for its tiles and class block (stored), and the online (max, sum-exp)
    of S over each class's negatives in its tiles (a partial)."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), ACC)
    l = tl.zeros([BLOCK_C], dtype=ACC)
    t0 = g * tiles_per_prog
    for t in range(t0, tl.minimum(t0 + tiles_per_prog, T)):
        b, hw, pm, p = pixel_tile(t, TPI, HW, BLOCK_P)
        s = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = pixel_chunk(x_ptr, b, hw, pm, d, D, s_b, s_s, s_d).to(ACC)
            a = tl.load(a_ptr + c[:, None] * D + d[None, :],
                        mask=(c < C)[:, None] & (d < D)[None, :], other=0.0).to(ACC)
            s += tl.dot(x, tl.trans(a), input_precision=PREC)
        s = s * (tl.load(inv_ptr + p, mask=pm, other=0.0).to(ACC) * inv_t)[:, None]
        tl.store(s_ptr + p[:, None] * C + c[None, :], s, mask=pm[:, None] & (c < C)[None, :])
        _, neg = _masks(gt_ptr, neg_ptr, p, pm, c, C, ONLY_OWN)
        s = tl.where(neg, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        finite = m_new > float("-inf")
        m_ref = tl.where(finite, m_new, 0.0)                     # no inf - inf anywhere
        l = l * tl.exp(tl.where(finite, m, 0.0) - m_ref) \
            + tl.sum(tl.where(neg, tl.exp(s - m_ref[None, :]), 0.0), axis=0)
        m = m_new
    tl.store(m_ptr + g * C + c, m, mask=c < C)
    tl.store(l_ptr + g * C + c, l, mask=c < C)


@triton.jit
def _spixel_tile(s_ptr, p, pm, c, C):
    return tl.load(s_ptr + p[:, None] * C + c[None, :], mask=pm[:, None] & (c < C)[None, :],
                   other=0.0)


@triton.jit
def _terms_kernel(s_ptr, gt_ptr, nl_ptr, loss_ptr, sig_ptr, C, P, per_prog,
                  ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (g, cb): per class, sums over its positives in pixels [g per_prog, ...) of
    softplus(NL_c - S) and sigmoid(NL_c - S) (S read, not recomputed)."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    nl = tl.load(nl_ptr + c, mask=c < C, other=float("-inf")).to(ACC)
    has = nl > float("-inf")
    acc_l = tl.zeros([BLOCK_C], dtype=ACC)
    acc_s = tl.zeros([BLOCK_C], dtype=ACC)
    p0 = g * per_prog
    for q0 in range(p0, tl.minimum(p0 + per_prog, P), BLOCK_P):
        p = q0 + tl.arange(0, BLOCK_P)
        pm = p < P
        gt = tl.load(gt_ptr + p, mask=pm, other=-1)
        pos = (gt[:, None] == c[None, :]) & has[None, :]
        x = tl.where(pos, nl[None, :] - _spixel_tile(s_ptr, p.to(tl.int64), pm, c, C).to(ACC), 0.0)
        acc_l += tl.sum(tl.where(pos, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))),
                                 0.0), axis=0)
        acc_s += tl.sum(tl.where(pos, 1.0 / (1.0 + tl.exp(-x)), 0.0), axis=0)
    tl.store(loss_ptr + g * C + c, acc_l, mask=c < C)
    tl.store(sig_ptr + g * C + c, acc_s, mask=c < C)


@triton.jit
def _dlogits(s_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, p, pm, c, C, ACC: tl.constexpr,
             ONLY_OWN: tl.constexpr):
    """(g, S) for a [BLOCK_P, BLOCK_C] tile: g = dLoss/dS from the stored S."""
    cmask = c < C
    nl = tl.load(nl_ptr + c, mask=cmask, other=float("-inf")).to(ACC)
    has = (nl > float("-inf"))[None, :]
    gc = tl.load(gc_ptr + c, mask=cmask, other=0.0).to(ACC)          # upstream grad per class
    coef = tl.load(coef_ptr + c, mask=cmask, other=0.0).to(ACC)      # g_c * sum sigmoid
    s = _spixel_tile(s_ptr, p, pm, c, C).to(ACC)
    pos, neg = _masks(gt_ptr, neg_ptr, p, pm, c, C, ONLY_OWN)
    nl_safe = tl.where(has, nl[None, :], 0.0)
    x = tl.where(pos & has, nl_safe - s, 0.0)
    ds = tl.where(pos & has, -gc[None, :] / (1.0 + tl.exp(-x)), 0.0)
    ds += tl.where(neg & has, tl.exp(s - nl_safe) * coef[None, :], 0.0)
    return ds, s


@triton.jit
def _da_kernel(x_ptr, inv_ptr, s_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, da_ptr, C, D,
               HW, s_b, s_s, s_d, T, TPI, tiles_per_prog, inv_t, ACC: tl.constexpr,
               PREC: tl.constexpr, ONLY_OWN: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (g, cb, db): partial da[g, class block, D block] = g^T z / t over its tiles."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    da = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    t0 = g * tiles_per_prog
    for t in range(t0, tl.minimum(t0 + tiles_per_prog, T)):
        b, hw, pm, p = pixel_tile(t, TPI, HW, BLOCK_P)
        ds, _ = _dlogits(s_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, p, pm, c, C, ACC,
                         ONLY_OWN)
        z = pixel_chunk(x_ptr, b, hw, pm, d, D, s_b, s_s, s_d).to(ACC) \
            * tl.load(inv_ptr + p, mask=pm, other=0.0).to(ACC)[:, None]
        da += tl.dot(tl.trans(ds), z, input_precision=PREC)
    tl.store(da_ptr + (g * C + c[:, None]).to(tl.int64) * D + d[None, :], da * inv_t,
             mask=(c < C)[:, None] & (d < D)[None, :])


@triton.jit
def _dx_kernel(x_ptr, inv_ptr, a_ptr, s_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, ds_ptr,
               dx_ptr, C, D, HW, s_b, s_s, s_d, o_b, o_s, o_d, TPI, inv_t, eps,
               ACC: tl.constexpr, PREC: tl.constexpr, ONLY_OWN: tl.constexpr,
               NORMALIZE: tl.constexpr, HAS_DS: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program t writes the gradient of tile t's pixels into dx (strides o_*), once: for each D
    chunk dz = sum over class blocks of g @ a / t (+ dS_gt: the gradient of the layer's class
    sums, HAS_DS), then dx = inv (dz - z r), r = sum_c g S (+ z . dS_gt)."""
    b, hw, pm, p = pixel_tile(tl.program_id(0), TPI, HW, BLOCK_P)
    inv = tl.load(inv_ptr + p, mask=pm, other=0.0).to(ACC)
    if HAS_DS:
        gt = tl.load(gt_ptr + p, mask=pm, other=-1)
        ok = pm & (gt >= 0) & (gt < C)
        row = tl.maximum(gt, 0).to(tl.int64) * D
    if NORMALIZE:
        r = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            ds, s = _dlogits(s_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, p, pm,
                             c0 + tl.arange(0, BLOCK_C), C, ACC, ONLY_OWN)
            r += tl.sum(ds * s, axis=1)
        if HAS_DS:                                   # z . dS_gt = inv (x . dS_gt)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                gv = tl.load(ds_ptr + row[:, None] + d[None, :],
                             mask=ok[:, None] & (d < D)[None, :], other=0.0).to(ACC)
                x = pixel_chunk(x_ptr, b, hw, pm, d, D, s_b, s_s, s_d).to(ACC)
                r += tl.sum(gv * x, axis=1) * inv
        # z = x / max(|x|, eps): the radial term only where the norm is above eps
        r = tl.where(inv * eps < 1.0, r, 0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dz = tl.zeros([BLOCK_P, BLOCK_D], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ds, _ = _dlogits(s_ptr, gt_ptr, neg_ptr, nl_ptr, gc_ptr, coef_ptr, p, pm, c, C, ACC,
                             ONLY_OWN)
            a = tl.load(a_ptr + c[:, None] * D + d[None, :],
                        mask=(c < C)[:, None] & (d < D)[None, :], other=0.0).to(ACC)
            dz += tl.dot(ds, a, input_precision=PREC)
        dx = dz * inv_t
        if HAS_DS:
            dx += tl.load(ds_ptr + row[:, None] + d[None, :],
                          mask=ok[:, None] & (d < D)[None, :], other=0.0).to(ACC)
        if NORMALIZE:
            x = pixel_chunk(x_ptr, b, hw, pm, d, D, s_b, s_s, s_d).to(ACC)
            dx = (dx - x * (r * inv)[:, None]) * inv[:, None]
        tl.store(dx_ptr + b.to(tl.int64) * o_b + hw[:, None].to(tl.int64) * o_s
                 + d[None, :].to(tl.int64) * o_d, dx, mask=pm[:, None] & (d < D)[None, :])


@triton.jit
def _unit_sums_bwd_kernel(x_ptr, inv_ptr, gt_ptr, g_ptr, dx_ptr, C, D, HW, s_b, s_s, s_d, o_b,
                          o_s, o_d, TPI, eps, ACC: tl.constexpr, NORMALIZE: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gradient of the class sums S_c = sum_{gt_p = c} z_p (z = x inv) for tile t's pixels,
    given G = dL/dS (C, D): dx = inv (G_gt - z (z . G_gt)) (G_gt for raw rows), 0 where the
    pixel is ignored; written into dx (strides o_*)."""
    b, hw, pm, p = pixel_tile(tl.program_id(0), TPI, HW, BLOCK_P)
    gt = tl.load(gt_ptr + p, mask=pm, other=-1)
    ok = pm & (gt >= 0) & (gt < C)
    row = tl.maximum(gt, 0).to(tl.int64) * D
    inv = tl.load(inv_ptr + p, mask=pm, other=0.0).to(ACC)
    if NORMALIZE:
        gx = tl.zeros([BLOCK_P], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            gv = tl.load(g_ptr + row[:, None] + d[None, :], mask=ok[:, None] & (d < D)[None, :],
                         other=0.0).to(ACC)
            gx += tl.sum(gv * pixel_chunk(x_ptr, b, hw, pm, d, D, s_b, s_s, s_d).to(ACC), axis=1)
        rr = tl.where(inv * eps < 1.0, gx * inv * inv, 0.0)      # (z . G) / |x|, above eps
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dx = tl.load(g_ptr + row[:, None] + d[None, :], mask=ok[:, None] & (d < D)[None, :],
                     other=0.0).to(ACC)
        if NORMALIZE:
            dx = (dx - pixel_chunk(x_ptr, b, hw, pm, d, D, s_b, s_s, s_d).to(ACC) * rr[:, None]) \
                * inv[:, None]
        tl.store(dx_ptr + b.to(tl.int64) * o_b + hw[:, None].to(tl.int64) * o_s
                 + d[None, :].to(tl.int64) * o_d, dx, mask=pm[:, None] & (d < D)[None, :])


def _precision(dtype):
    return "ieee" if dtype == torch.float64 else "tf32x3"


def _setup(x, C, block_p=64):
    """Layout of x and the tiles: BLOCK_P pixels of one image x BLOCK_C classes, D in BLOCK_D
    chunks. On a GPU the class dimension is tiled (32 classes a block: registers and shared
    memory stay bounded for any C); the interpreter takes all classes at once (its cost is per
    program, not per register) and few programs."""
    x, P, D, HW, s_b, s_s, s_d = pool_layout(x)
    gpu = gpu_config()
    wide = x.dtype == torch.float64                     # fp64 values take two registers
    BLOCK_C = min(next_pow2(C), 16 if wide else 32) if gpu else next_pow2(C)
    BLOCK_D = min(next_pow2(D), 32) if gpu else min(next_pow2(D), 128)
    BLOCK_P = block_p
    T, TPI, G, tiles_per_prog = pixel_tiles(P, HW, BLOCK_P, 264 if gpu else 4)
    meta = dict(ACC=acc_dtype(x.dtype), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D)
    # 8 warps, no software pipelining, 32-wide D chunks: with 4 warps, pipelined loads or 64-wide
    # chunks the 3xTF32 dots (each operand split in two) spill on sm_80 (RESOURCES.md)
    opts = dict(maxnreg=255, num_warps=8, num_stages=1) if gpu else {}
    lay = dict(x=x, P=P, D=D, HW=HW, strides=(s_b, s_s, s_d), T=T, TPI=TPI, G=G,
               tiles_per_prog=tiles_per_prog, n_cb=triton.cdiv(C, BLOCK_C))
    return lay, meta, opts


def inv_norms(x, eps: float = 1e-8):
    """(P,) 1 / max(|x_p|, eps) of the pixels of x (B, D, h, w) or rows (P, D), in float32
    (float64 for float64 x): one read of x."""
    lay, meta, opts = _setup(x, 1)
    inv = torch.empty(lay["P"], dtype=torch_acc_dtype(x.dtype), device=x.device)
    if lay["P"]:
        _inv_norm_kernel[(lay["T"],)](lay["x"], inv, lay["D"], lay["HW"], *lay["strides"],
                                      lay["TPI"], eps, ACC=meta["ACC"], BLOCK_P=meta["BLOCK_P"],
                                      BLOCK_D=meta["BLOCK_D"], **opts)
    return inv


def anchor_forward(x, inv, anchors, gt, negcls, temperature: float, only_own: bool):
    """x (B, D, h, w) (or (P, D) rows), inv (P,) the factors making its rows unit (ones for raw
    rows), anchors (C, D), gt (P,) (-1 ignored), negcls (P,). Returns per-class sums of
    softplus(NL_c - s) over positives (C,), NL (C,) (-inf: no negative), per-class sums of
    sigmoid(NL_c - s) (C,) and the logits S (P, C), in float32 (float64 for float64 x)."""
    C = anchors.shape[0]
    lay, meta, opts = _setup(x, C)
    dt = torch_acc_dtype(x.dtype)
    dev, P, G = x.device, lay["P"], lay["G"]
    anchors = anchors.to(dt).contiguous()
    gt, negcls = gt.to(torch.int32).contiguous(), negcls.to(torch.int32).contiguous()
    S = torch.empty(P, C, dtype=dt, device=dev)
    m = torch.empty(G, C, dtype=dt, device=dev)
    l = torch.empty(G, C, dtype=dt, device=dev)
    inv_t = 1.0 / temperature
    _logits_kernel[(G, lay["n_cb"])](
        lay["x"], inv.contiguous(), anchors, gt, negcls, S, m, l, C, lay["D"], lay["HW"],
        *lay["strides"], lay["T"], lay["TPI"], lay["tiles_per_prog"], inv_t,
        PREC=_precision(x.dtype), ONLY_OWN=only_own, **meta, **opts)
    mx = m.amax(dim=0)
    mx_safe = torch.where(torch.isfinite(mx), mx, 0.0)
    tot = (l * torch.exp(torch.where(torch.isfinite(m), m, mx_safe) - mx_safe)).sum(0)
    nl = torch.where(tot > 0, mx_safe + torch.log(tot.clamp(min=torch.finfo(dt).tiny)),
                     float("-inf"))
    per_prog = lay["tiles_per_prog"] * meta["BLOCK_P"]
    G2 = triton.cdiv(max(P, 1), per_prog)
    loss = torch.empty(G2, C, dtype=dt, device=dev)
    sig = torch.empty(G2, C, dtype=dt, device=dev)
    _terms_kernel[(G2, lay["n_cb"])](S, gt, nl, loss, sig, C, P, per_prog, ACC=meta["ACC"],
                                     BLOCK_P=meta["BLOCK_P"], BLOCK_C=meta["BLOCK_C"], **opts)
    return loss.sum(0), nl, sig.sum(0), S


def _backward_args(grad, x, inv, anchors, gt, negcls, nl, sigsum):
    dt = torch_acc_dtype(x.dtype)
    grad = grad.to(dt).contiguous()
    return (inv.contiguous(), anchors.to(dt).contiguous(),
            (gt.to(torch.int32).contiguous(), negcls.to(torch.int32).contiguous(),
             nl.contiguous(), grad, (grad * sigsum).contiguous()))


def anchor_da(grad, x, inv, anchors, gt, negcls, nl, sigsum, S, temperature: float,
              only_own: bool):
    """Gradient (C, D) w.r.t. the anchors of sum_c grad[c] * loss_sum[c], from the stored
    logits S (partials over pixel ranges, summed in order)."""
    C = anchors.shape[0]
    dt = torch_acc_dtype(x.dtype)
    inv, _, common = _backward_args(grad, x, inv, anchors, gt, negcls, nl, sigsum)
    # 32-pixel tiles on a GPU (64 sit at 188-255 registers and spill on sm_80 for some
    # specialisations, e.g. images of at most 64 pixels)
    ly, mt, opts = _setup(x, C, 32 if gpu_config() else 64)
    D = ly["D"]
    da = torch.empty(ly["G"], C, D, dtype=dt, device=x.device)
    _da_kernel[(ly["G"], ly["n_cb"], triton.cdiv(D, mt["BLOCK_D"]))](
        ly["x"], inv, S, *common, da, C, D, ly["HW"], *ly["strides"], ly["T"], ly["TPI"],
        ly["tiles_per_prog"], 1.0 / temperature, PREC=_precision(x.dtype), ONLY_OWN=only_own,
        **mt, **opts)
    return da.sum(0)


def anchor_dx(grad, x, inv, anchors, gt, negcls, nl, sigsum, S, dsums, temperature: float,
              only_own: bool, normalize: bool, eps: float = 1e-8):
    """Gradient w.r.t. x (x's shape and strides; through the unit rows x * inv when
    ``normalize``) of sum_c grad[c] * loss_sum[c], from the stored logits S, plus that of the
    class sums of its unit rows given their gradient dsums (C, D) (empty: none): one write."""
    C = anchors.shape[0]
    lay, meta, opts = _setup(x, C)
    dt = torch_acc_dtype(x.dtype)
    inv, anchors, common = _backward_args(grad, x, inv, anchors, gt, negcls, nl, sigsum)
    has_ds = dsums.numel() > 0
    dsums = dsums.to(dt).contiguous() if has_ds else anchors
    dx = torch.empty_like(lay["x"], dtype=dt)
    _, _, _, _, o_b, o_s, o_d = pool_layout(dx)
    _dx_kernel[(lay["T"],)](
        lay["x"], inv, anchors, S, *common, dsums, dx, C, lay["D"], lay["HW"], *lay["strides"],
        o_b, o_s, o_d, lay["TPI"], 1.0 / temperature, eps, PREC=_precision(x.dtype),
        ONLY_OWN=only_own, NORMALIZE=normalize, HAS_DS=has_ds, **meta, **opts)
    return dx


def unit_sums_backward(grad_sums, x, inv, gt, normalize: bool, eps: float = 1e-8):
    """Gradient w.r.t. x (x's shape and strides) of the class sums of its unit rows x * inv
    (its raw rows without ``normalize``) by class gt, given grad_sums (C, D)."""
    C = grad_sums.shape[0]
    lay, meta, opts = _setup(x, C)
    dt = torch_acc_dtype(x.dtype)
    dx = torch.empty_like(lay["x"], dtype=dt)
    _, _, _, _, o_b, o_s, o_d = pool_layout(dx)
    if lay["P"]:
        _unit_sums_bwd_kernel[(lay["T"],)](
            lay["x"], inv.contiguous(), gt.to(torch.int32).contiguous(),
            grad_sums.to(dt).contiguous(), dx, C, lay["D"], lay["HW"], *lay["strides"], o_b, o_s,
            o_d, lay["TPI"], eps, ACC=meta["ACC"], NORMALIZE=normalize,
            BLOCK_P=meta["BLOCK_P"], BLOCK_D=meta["BLOCK_D"], **opts)
    return dx
