"""Contextrast's per-layer statistics on CPU in tiles of pixels, recomputed in backward.

The "native" L_PA needs, per layer, the unit pixel rows z = x / max(||x||, eps) of the NCHW
embedding twice: summed per class (the anchors) and against the fused anchors (the P x C
logits). Made once as a (P, D) tensor, autograd keeps them (and their permuted copy) for
backward: two embedding-sized copies per layer. Here z is made one tile of at most ``TILE``
pixels of one image at a time, straight from the NCHW embedding, and remade in backward; what
is saved is the embedding itself (an input), the anchors (C, D), the labels and (C,) statistics.
Tiles keep the NCHW layout: columns (D, n) of one image, logits (C, n).

    class sums     S_c = sum_{p : g_p = c} z_p                                   (C, D)
    anchor terms   L_c = sum_{p : g_p = c, c has negatives} softplus(NL_c - z_p . a_c / t)
                   NL_c = log sum_{q negative of c} exp(z_q . a_c / t)           (C,)

Backward of the anchor terms with sigma_p = sigmoid(NL_{g_p} - s_{p, g_p}), Sig_c = sum over
c's pixels of sigma_p (kept from forward) and G the incoming (C,) gradient:

    dL/ds_{p, g_p} = -G_{g_p} sigma_p,   dL/ds_{q, c} += G_c Sig_c exp(s_{q, c} - NL_c)  (q neg of c)
    dz = ds a / t,   da = ds^T z / t,   dx = (dz - z (z . dz)) / ||x||  (dz / eps below eps)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import common as cm
from ..reference import contextrast as ref

TILE = 32768          # pixels per tile: 32 MiB of fp32 rows at D = 256


def _tiles(shape):
    B, _, h, w = shape
    for b in range(B):
        for lo in range(0, h * w, TILE):
            yield b, lo, min(lo + TILE, h * w), b * h * w


def _cols(emb, b, lo, hi, normalize, dt):
    """(unit columns (D, n), their norms (1, n) or None) of pixels lo..hi of image b: the
    NCHW layout kept, so every elementwise step runs over contiguous pixel runs."""
    x = emb[b].reshape(emb.shape[1], -1)[:, lo:hi].to(dt)
    if not normalize:
        return x, None
    n = x.norm(dim=0, keepdim=True)
    return x * (1.0 / n.clamp(min=cm.EPS)), n


def _cols_backward(z, n, dz):
    """Gradient w.r.t. the raw columns of z = x / max(||x||, eps): (dz - z (z . dz)) / ||x||
    above eps, dz / eps below (the clamp is constant there)."""
    if n is None:
        return dz
    radial = (z * dz).sum(dim=0, keepdim=True) * (n > cm.EPS).to(dz.dtype)
    return (dz - z * radial) * (1.0 / n.clamp(min=cm.EPS))


def _put(grad, b, lo, hi, dx):
    grad[b].view(grad.shape[1], -1)[:, lo:hi] = dx.to(grad.dtype)


def _onehot(g, C, dt):
    """(C, n) indicator of each pixel's class; ignored pixels (-1) in no row."""
    return (g[None, :] == torch.arange(C)[:, None]).to(dt)


class _UnitClassSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, gt, num_classes, normalize, dt):
        ctx.save_for_backward(emb, gt)
        ctx.normalize, ctx.dt = normalize, dt
        sums = torch.zeros(num_classes, emb.shape[1], dtype=dt)
        for b, lo, hi, off in _tiles(emb.shape):
            z, _ = _cols(emb, b, lo, hi, normalize, dt)
            sums += _onehot(gt[off + lo:off + hi], num_classes, dt) @ z.T
        return sums

    @staticmethod
    def backward(ctx, gs):
        emb, gt = ctx.saved_tensors
        grad = torch.zeros_like(emb)
        C = gs.shape[0]
        for b, lo, hi, off in _tiles(emb.shape):
            z, n = _cols(emb, b, lo, hi, ctx.normalize, ctx.dt)
            dz = gs.T @ _onehot(gt[off + lo:off + hi], C, gs.dtype)          # (D, n)
            _put(grad, b, lo, hi, _cols_backward(z, n, dz))
        return grad, None, None, None, None


def _positive_terms(s, g, nl, has_neg, dt):
    """Per pixel of a tile: its class (clamped), whether its term counts (labelled, its class
    has negatives) and x = NL_g - s_{g, p}, the softplus argument."""
    gc = g.clamp(min=0)
    use = ((g >= 0) & has_neg[gc]).to(dt)
    return gc, use, nl[gc] - s.gather(0, gc[None, :])[0]


class _AnchorTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, a_hat, gt, sel, err, num_classes, temperature, reading, normalize, dt):
        C, t = num_classes, temperature
        a = a_hat.detach().to(dt)
        logits, lse = [], []
        for b, lo, hi, off in _tiles(emb.shape):                 # pass 1: logits, NL
            z, _ = _cols(emb, b, lo, hi, normalize, dt)
            s = a @ z / t                                         # (C, n)
            neg = ref.negative_mask(sel[off + lo:off + hi], err[off + lo:off + hi], C, reading)
            logits.append(s)
            lse.append(torch.logsumexp(s.masked_fill(~neg.T, float("-inf")), dim=1))
        nl = torch.logsumexp(torch.stack(lse), dim=0)
        has_neg = torch.isfinite(nl)
        nl = torch.where(has_neg, nl, 0.0)
        loss = torch.zeros(C, dtype=dt)
        sig = torch.zeros(C, dtype=dt)
        for (b, lo, hi, off), s in zip(_tiles(emb.shape), logits):   # pass 2: the terms
            gc, use, x = _positive_terms(s, gt[off + lo:off + hi], nl, has_neg, dt)
            loss.index_add_(0, gc, F.softplus(x) * use)
            sig.index_add_(0, gc, torch.sigmoid(x) * use)
        ctx.save_for_backward(emb, a_hat, gt, sel, err, nl, has_neg, sig)
        ctx.args = (C, t, reading, normalize, dt)
        return loss

    @staticmethod
    def backward(ctx, G):
        emb, a_hat, gt, sel, err, nl, has_neg, sig = ctx.saved_tensors
        C, t, reading, normalize, dt = ctx.args
        a = a_hat.detach().to(dt)
        G = G.to(dt)
        grad = torch.zeros_like(emb)
        da = torch.zeros_like(a)
        weight = (G * sig)[:, None]                               # (C, 1): on each negative
        for b, lo, hi, off in _tiles(emb.shape):
            z, n = _cols(emb, b, lo, hi, normalize, dt)
            s = a @ z / t
            gc, use, x = _positive_terms(s, gt[off + lo:off + hi], nl, has_neg, dt)
            neg = ref.negative_mask(sel[off + lo:off + hi], err[off + lo:off + hi], C, reading)
            ds = torch.where(neg.T, weight * torch.exp(s - nl[:, None]), 0.0)      # (C, n)
            ds.scatter_add_(0, gc[None, :], (-G[gc] * torch.sigmoid(x) * use)[None, :])
            da += ds @ z.T / t
            _put(grad, b, lo, hi, _cols_backward(z, n, a.T @ ds / t))
        return (grad, da.to(a_hat.dtype), None, None, None, None, None, None, None, None)


def unit_class_sums(emb, gt, num_classes: int, *, normalize: bool = True):
    """(C, D) sums of the unit rows of emb (B, D, h, w) by class gt (flat (P,), -1 ignored),
    differentiable w.r.t. emb; computes in float32 or wider."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    return _UnitClassSums.apply(emb.contiguous(), gt, num_classes, normalize, dt)


def anchor_terms(emb, a_hat, gt, sel, err, num_classes: int, temperature: float,
                 reading: str = "R1", *, normalize: bool = True):
    """(C,) per-class sums of softplus(NL_c - z_p . a_c / t) over c's pixels (0 for a class
    without negatives), differentiable w.r.t. emb and the anchors a_hat (C, D)."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    return _AnchorTerms.apply(emb.contiguous(), a_hat, gt, sel, err, num_classes,
                              float(temperature), reading, normalize, dt)
