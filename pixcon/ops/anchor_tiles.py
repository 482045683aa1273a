"""Contextrast's per-layer statistics on CPU tensors, as functions: the class sums of the unit
pixel rows and the pixel x anchor terms of one (B, D, h, w) embedding, each one op of
pixcon.ops._library whose CPU kernel is compiled (csrc/cpu/anchor.cpp: tiles of one image's
pixels, recomputed in backward, in parallel over chunks of tiles merged in a fixed order).

The "native" L_PA needs, per layer, the unit pixel rows z = x / max(||x||, eps) of the NCHW
embedding twice: summed per class (the anchors) and against the fused anchors (the P x C
logits). Made once as a (P, D) tensor, autograd keeps them (and their permuted copy) for
backward: two embedding-sized copies per layer. The kernels never make z: every product with z
is a product with the raw columns x of a tile scaled per pixel by inv = 1 / max(||x||, eps).
What is saved is the embedding itself (an input), the norms (P,), the anchors (C, D), the labels
and (C,) statistics. Tiles keep the NCHW layout: columns (D, n) of one image, logits (C, n).

    class sums     S_c = sum_{p : g_p = c} inv_p x_p                             (C, D)
    logits         s_{c,p} = inv_p (a_c . x_p) / t                               (C, n)
    anchor terms   L_c = sum_{p : g_p = c, c has negatives} softplus(NL_c - s_{c,p})
                   NL_c = log sum_{q negative of c} exp(s_{c,q})                 (C,)

The backward formulas are in the kernel file's header. ``torch.ops.pixcon.set_anchor_tile(n)``
sets the pixels per tile (0: the kernels' own choice, about 768 KiB of a tile's columns and
logits); the tests split images into tiles of 3.
"""
from __future__ import annotations

import torch

from ..core import common as cm
from . import _library


def _inv(emb, norms, normalize, dt):
    if not normalize:
        return torch.ones(emb.shape[0] * emb.shape[2] * emb.shape[3], dtype=dt)
    return _library.inv_norms(emb.detach()) if norms is None else \
        1.0 / norms.to(dt).clamp(min=cm.EPS)


def unit_class_sums(emb, gt, num_classes: int, *, normalize: bool = True):
    """(C, D) sums of the unit rows of emb (B, D, h, w) by class gt (flat (P,), -1 ignored),
    differentiable w.r.t. emb (the op pixcon::unit_class_sums on CPU tensors: the sums and the
    pixels' inverse norms in one read); computes in float32 or wider."""
    return _library.unit_class_sums(emb, gt, num_classes, normalize)[0]


def anchor_terms(emb, a_hat, gt, sel, err, num_classes: int, temperature: float,
                 reading: str = "R1", *, normalize: bool = True, norms=None):
    """(C,) per-class sums of softplus(NL_c - z_p . a_c / t) over c's pixels (0 for a class
    without negatives), differentiable w.r.t. emb and the anchors a_hat (C, D) (the op
    pixcon::anchor_contrast on CPU tensors). norms: the (P,) pixel norms of emb when the caller
    has them (else one read of emb makes them)."""
    dt = torch.promote_types(emb.dtype, torch.float32)
    negcls = torch.where(sel, err, -1)
    return _library.anchor_contrast(emb, _inv(emb, norms, normalize, dt), a_hat, gt, negcls,
                                    float(temperature), reading == "R2", normalize, False)[0]
