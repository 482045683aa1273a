"""Contextrast's per-layer statistics on CPU in tiles of pixels, recomputed in backward: the
CPU kernels of the ops pixcon::inv_norms, unit_class_sums and anchor_contrast (and their
backwards), registered in pixcon.ops._library.

The "native" L_PA needs, per layer, the unit pixel rows z = x / max(||x||, eps) of the NCHW
embedding twice: summed per class (the anchors) and against the fused anchors (the P x C
logits). Made once as a (P, D) tensor, autograd keeps them (and their permuted copy) for
backward: two embedding-sized copies per layer. Here z is never made at all: every product
with z is a product with the raw columns x of one tile (at most ``TILE`` pixels of one image,
straight from the NCHW embedding) scaled per pixel by inv = 1 / max(||x||, eps). What is saved
is the embedding itself (an input), the norms (P,), the anchors (C, D), the labels and (C,)
statistics. Tiles keep the NCHW layout: columns (D, n) of one image, logits (C, n).

    class sums     S_c = sum_{p : g_p = c} inv_p x_p                             (C, D)
    logits         s_{c,p} = inv_p (a_c . x_p) / t                               (C, n)
    anchor terms   L_c = sum_{p : g_p = c, c has negatives} softplus(NL_c - s_{c,p})
                   NL_c = log sum_{q negative of c} exp(s_{c,q})                 (C,)

Backward of the anchor terms with sigma_p = sigmoid(NL_{g_p} - s_{p, g_p}), Sig_c = sum over
c's pixels of sigma_p (kept from forward) and G the incoming (C,) gradient:

    dL/ds_{p, g_p} = -G_{g_p} sigma_p,   dL/ds_{q, c} += G_c Sig_c exp(s_{q, c} - NL_c)  (q neg of c)
    dz = a^T ds / t,   da = ds z^T / t

and through the normalisation dx = inv (dz - z (z . dz)) above eps, inv dz below (the clamp is
constant there). With W = ds inv / t (C, n) and z . dz = sum_c s_{c,p} ds_{c,p}:

    dx = a^T W - x inv^2 (z . dz),   da = W x^T

one GEMM writing the tile's gradient and one fused update, never an embedding-sized temporary
but the GEMM's output. The class sums' backward is the same with dz_p = dS_{g_p}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import common as cm
from . import _library

TILE = 32768          # pixels per tile: 32 MiB of fp32 columns at D = 256


def _tiles(shape):
    B, _, h, w = shape
    for b in range(B):
        for lo in range(0, h * w, TILE):
            yield b, lo, min(lo + TILE, h * w), b * h * w


def _cols(emb, b, lo, hi, dt):
    """Raw columns (D, n) of pixels lo..hi of image b: the NCHW layout kept (a view when emb
    is already in dt)."""
    return emb[b].reshape(emb.shape[1], -1)[:, lo:hi].to(dt)


def column_norms(emb, dt=None):
    """(P,) L2 norms of the pixel columns of emb (B, D, h, w), pixel order (b, y, x), in dt
    (float32 or wider by default); no graph. Sum of squares over the rows, not x.norm(dim=0):
    torch's norm along the strided dim is a scalar loop (2.2 ms vs 0.12 ms for 64 x 8192)."""
    dt = dt or torch.promote_types(emb.dtype, torch.float32)
    B, _, h, w = emb.shape
    out = torch.empty(B * h * w, dtype=dt)
    with torch.no_grad():
        for b, lo, hi, off in _tiles(emb.shape):
            x = _cols(emb, b, lo, hi, dt)
            torch.sqrt(x.square().sum(dim=0), out=out[off + lo:off + hi])
    return out


def _scales(inv, off, lo, hi, normalize, dt):
    """(inv (n,), on (n,)): the normalisation's per-pixel factor 1 / max(||x||, eps) (the op's
    ``inv``) and whether the norm is above eps (inv * eps < 1: where the radial term of its
    gradient exists, the Triton kernels' rule); ones and zeros without normalisation."""
    if not normalize:
        n = hi - lo
        return torch.ones(n, dtype=dt), torch.zeros(n, dtype=dt)
    s = inv[off + lo:off + hi].to(dt)
    return s, (s * cm.EPS < 1.0).to(dt)


def _put(grad, b, lo, hi, lhs, W, x, coef):
    """grad's columns lo..hi of image b = lhs @ W - x * coef: the GEMM writes straight into
    the gradient where it can (same dtype, contiguous tile), the radial term in place."""
    dst = grad[b].view(grad.shape[1], -1)[:, lo:hi]
    if dst.dtype == W.dtype and dst.is_contiguous():
        torch.mm(lhs, W, out=dst)
        dst.addcmul_(x, coef, value=-1.0)
    else:
        dst.copy_(torch.mm(lhs, W).addcmul_(x, coef, value=-1.0))


def _onehot(g, C, dt):
    """(C, n) indicator of each pixel's class; ignored pixels (-1) in no row."""
    return (g[None, :] == torch.arange(C)[:, None]).to(dt)


# --- the CPU kernels of the ops pixcon::inv_norms, unit_class_sums, anchor_contrast and their
# backwards (registered in pixcon.ops._library; their Triton kernels are pixcon_kernels.anchor)
def inv_norms(x):
    """(P,) 1 / max(||x_p||, eps) of the pixel columns of x (B, D, h, w)."""
    return 1.0 / column_norms(x).clamp(min=cm.EPS)


def class_sums_forward(emb, inv, gt, num_classes, normalize):
    """(sums (C, D), counts (C,)) of the rows x_p * inv_p by class gt (-1 ignored)."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    emb = emb.contiguous()
    sums = torch.zeros(num_classes, emb.shape[1], dtype=dt)
    for b, lo, hi, off in _tiles(emb.shape):
        x = _cols(emb, b, lo, hi, dt)
        s, _ = _scales(inv, off, lo, hi, normalize, dt)
        sums.addmm_(_onehot(gt[off + lo:off + hi], num_classes, dt) * s, x.T)
    counts = torch.zeros(num_classes, dtype=torch.int64).index_add_(
        0, gt.clamp(min=0), (gt >= 0).to(torch.int64))
    return sums, counts


def class_sums_backward(gs, emb, inv, gt, normalize):
    """d emb of sum(gs * sums), through the normalisation."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    emb = emb.contiguous()
    gs = gs.to(dt)
    grad = torch.empty_like(emb)
    C = gs.shape[0]
    for b, lo, hi, off in _tiles(emb.shape):
        x = _cols(emb, b, lo, hi, dt)
        s, on = _scales(inv, off, lo, hi, normalize, dt)
        g = gt[off + lo:off + hi]
        W = _onehot(g, C, dt) * s                                       # (C, n)
        # z . dz = inv x . dS_g: the GEMM dS x at each pixel's own class (0 if ignored)
        zdz = (gs @ x).gather(0, g.clamp(min=0)[None])[0] * s * (g >= 0)
        _put(grad, b, lo, hi, gs.T, W, x, s * s * on * zdz)
    return grad


def _positive_terms(s, g, nl, has_neg, dt):
    """Per pixel of a tile: its class (clamped), whether its term counts (labelled, its class
    has negatives) and x = NL_g - s_{g, p}, the softplus argument."""
    gc = g.clamp(min=0)
    use = ((g >= 0) & has_neg[gc]).to(dt)
    return gc, use, nl[gc] - s.gather(0, gc[None, :])[0]


def _negatives(negcls, C, only_own):
    """(n, C) bool: pixel q is a negative of anchor c (negcls: the error class of a selected
    pixel, -1 otherwise; R1: any error class but c's own, R2 (only_own): c's own)."""
    c = torch.arange(C)
    if only_own:
        return negcls[:, None] == c[None, :]
    return (negcls[:, None] >= 0) & (negcls[:, None] != c[None, :])


def anchor_forward(emb, inv, a_hat, gt, negcls, temperature, only_own, normalize):
    """(per-class loss sums (C,), NL (C,) (-inf: no negative), sigmoid sums (C,), an empty
    tensor where the Triton kernel keeps its logits: the tiles recompute them in backward)."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    emb = emb.contiguous()
    C, t = a_hat.shape[0], temperature
    a = a_hat.detach().to(dt)
    logits, lse = [], []
    for b, lo, hi, off in _tiles(emb.shape):                 # pass 1: logits, NL
        x = _cols(emb, b, lo, hi, dt)
        s_, _ = _scales(inv, off, lo, hi, normalize, dt)
        s = (a @ x).mul_(s_ / t)                              # (C, n)
        neg = _negatives(negcls[off + lo:off + hi], C, only_own)
        logits.append(s)
        lse.append(torch.logsumexp(s.masked_fill(~neg.T, float("-inf")), dim=1))
    nl = torch.logsumexp(torch.stack(lse), dim=0) if lse else torch.full((C,), float("-inf"),
                                                                          dtype=dt)
    has_neg = torch.isfinite(nl)
    nl0 = torch.where(has_neg, nl, 0.0)
    loss = torch.zeros(C, dtype=dt)
    sig = torch.zeros(C, dtype=dt)
    for (b, lo, hi, off), s in zip(_tiles(emb.shape), logits):   # pass 2: the terms
        gc, use, x = _positive_terms(s, gt[off + lo:off + hi], nl0, has_neg, dt)
        loss.index_add_(0, gc, F.softplus(x) * use)
        sig.index_add_(0, gc, torch.sigmoid(x) * use)
    return loss, nl, sig, loss.new_empty(0)


def anchor_backward(G, emb, inv, a_hat, gt, negcls, nl, sig, temperature, only_own,
                    normalize):
    """(d emb, d anchors) of sum(G * loss sums), every tile's logits recomputed."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    emb = emb.contiguous()
    C, t = a_hat.shape[0], temperature
    a = a_hat.detach().to(dt)
    aT = a.T.contiguous()
    G = G.to(dt)
    has_neg = torch.isfinite(nl)
    nl = torch.where(has_neg, nl, 0.0).to(dt)
    grad = torch.empty_like(emb)
    da = torch.zeros_like(a)
    weight = (G * sig.to(dt))[:, None]                        # (C, 1): on each negative
    for b, lo, hi, off in _tiles(emb.shape):
        x = _cols(emb, b, lo, hi, dt)
        s_, on = _scales(inv, off, lo, hi, normalize, dt)
        s = (a @ x).mul_(s_ / t)
        gc, use, y = _positive_terms(s, gt[off + lo:off + hi], nl, has_neg, dt)
        neg = _negatives(negcls[off + lo:off + hi], C, only_own)
        ds = torch.where(neg.T, weight * torch.exp(s - nl[:, None]), 0.0)      # (C, n)
        ds.scatter_add_(0, gc[None, :], (-G[gc] * torch.sigmoid(y) * use)[None, :])
        zdz = (s * ds).sum(dim=0)                             # z . dz, in (C, n)
        W = ds.mul_(s_ / t)
        da.addmm_(W, x.T)
        _put(grad, b, lo, hi, aT, W, x, s_ * s_ * on * zdz)
    return grad, da


# --- the functions of the tile path, as the ops' callers see them -------------------------
def _inv(emb, norms, normalize, dt):
    if not normalize:
        return torch.ones(emb.shape[0] * emb.shape[2] * emb.shape[3], dtype=dt)
    return _library.inv_norms(emb.detach()) if norms is None else \
        1.0 / norms.to(dt).clamp(min=cm.EPS)


def unit_class_sums(emb, gt, num_classes: int, *, normalize: bool = True, norms=None):
    """(C, D) sums of the unit rows of emb (B, D, h, w) by class gt (flat (P,), -1 ignored),
    differentiable w.r.t. emb (the op pixcon::unit_class_sums on CPU tensors); computes in
    float32 or wider. norms: the (P,) :func:`column_norms` of emb when the caller has them."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    return _library.unit_class_sums(emb, _inv(emb, norms, normalize, dt), gt, num_classes,
                                    normalize)[0]


def anchor_terms(emb, a_hat, gt, sel, err, num_classes: int, temperature: float,
                 reading: str = "R1", *, normalize: bool = True, norms=None):
    """(C,) per-class sums of softplus(NL_c - z_p . a_c / t) over c's pixels (0 for a class
    without negatives), differentiable w.r.t. emb and the anchors a_hat (C, D) (the op
    pixcon::anchor_contrast on CPU tensors). norms as for :func:`unit_class_sums`."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    negcls = torch.where(sel, err, -1)
    return _library.anchor_contrast(emb, _inv(emb, norms, normalize, dt), a_hat, gt, negcls,
                                    float(temperature), reading == "R2", normalize, False)[0]
