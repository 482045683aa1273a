"""Contextrast (CVPR 2024): multi-level class anchors with boundary-aware negatives (BANE),
specs/contextrast.md. The fused path: Triton multi-label EDT, sort-based percentile selection,
anchors from the class-sums primitive, pixel x anchor logits with a segmented log-sum-exp."""
from __future__ import annotations

import functools
import math

import torch

from .. import distributed as dist
from .. import reference
from ..core import contextrast as steps
from . import _common as chk
from . import _library as lib
from .edt import edt, edt_pyramid

READINGS = ("R1", "R2")


def _pred_labels(pred, num_classes, op, check_values=None, argmax=True):
    """(B, C, H, W) scores -> argmax labels (argmax False: the checked scores, for a caller that
    takes the argmax at each layer's resolution); (B, H, W) integer labels pass through."""
    if pred.dim() == 4:
        if pred.shape[1] != num_classes:
            raise ValueError(f"{op}: pred has {pred.shape[1]} classes, expected {num_classes}")
        chk.check_finite_scores(op, "pred", pred, check_values)
        return pred.argmax(dim=1) if argmax else pred
    return pred.to(torch.int64)


def select_lowest(err: torch.Tensor, d2: torch.Tensor, num_classes: int, ks: float,
                  dmax: int):
    """Sort-based, no host sync: per error class the ceil(ks * count) pixels of smallest d2,
    ties by flat index; d2 = inf never kept. Same result as the reference's per-class loop.
    dmax: a bound above every finite d2 (h^2 + w^2). One int64 key (class, d2, index)."""
    P = err.numel()
    if (num_classes + 1) * dmax * P >= 2**63:
        raise ValueError("bane_negatives: classes x (h^2 + w^2) x pixels exceeds the int64 key")
    cand = (err >= 0) & torch.isfinite(d2)
    d = torch.where(cand, d2, 0).to(torch.int64)
    cls = torch.where(cand, err, num_classes).to(torch.int64)
    key = (cls * dmax + d) * P + torch.arange(P, device=err.device)
    skey, order = torch.sort(key)
    scls = skey // (dmax * P)
    bounds = torch.searchsorted(scls, torch.arange(num_classes + 1, device=err.device))
    count = bounds[1:] - bounds[:-1]
    take = torch.ceil(ks * count.to(torch.float64)).to(torch.int64)
    rank = torch.arange(P, device=err.device) - bounds[scls.clamp(max=num_classes - 1)]
    keep_sorted = (scls < num_classes) & (rank < take[scls.clamp(max=num_classes - 1)])
    return torch.zeros(P, dtype=torch.bool, device=err.device).scatter(0, order, keep_sorted)


def bane_negatives(labels, pred, num_classes: int, *, ks: float = 0.5, reading: str = "R1",
                   ignore_index: int = 255, backend: str = "auto"):
    """BANE (boundary-aware negatives) for one layer.

    Args:
        labels: (B, h, w) ground truth at the layer's resolution (``ignore_index`` ignored).
        pred: (B, h, w) predicted labels or (B, C, h, w) scores (argmax taken).
        ks: fraction kept per error class (0.5 in the paper).
        reading: "R1" (default; eq. 13 literal: error maps are false negatives, a kept pixel of
            class m's map is a negative of every other anchor) or "R2" (false-positive maps: a
            kept pixel predicted n with GT != n is a negative of anchor n). The pixel sets are the
            same; which anchor sees a pixel and which region its distance is measured in differ.

    Returns (selected (B, h, w) bool, err (B, h, w) int64: the error class of each pixel, -1
    where it is no error). One multi-label EDT per image replaces C binary ones; the distance is
    to the nearest pixel outside the pixel's error region (SciPy convention, border is not a
    boundary); a region without outside pixel is never selected. Within a class the ceil(ks *
    count) smallest distances are kept, ties broken by flat index (b, y, x), pooled over the
    batch.

    backend: "auto" (Triton for CUDA tensors, the compiled C++ EDT -- "native" -- for CPU
    tensors where pixcon._C is built, else the reference), "reference", "triton", "native"."""
    op = "bane_negatives"
    chk.check_tensor(op, "labels", labels, ndim=3, dtypes=chk.INT_DTYPES, kind="(B, h, w)")
    chk.check_tensor(op, "pred", pred, ndim=(3, 4), device=labels.device,
                     kind="(B, h, w) or (B, C, h, w)", like="labels")
    if pred.shape[0] != labels.shape[0] or pred.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"{op}: pred {tuple(pred.shape)} does not match labels "
                         f"{tuple(labels.shape)} in batch or spatial size")
    chk.check_positive_int(op, "num_classes", num_classes)
    if not 0 < ks <= 1:
        raise ValueError(f"{op}: ks must be in (0, 1], got {ks!r}")
    if reading not in READINGS:
        raise ValueError(f"{op}: reading must be 'R1' or 'R2', got {reading!r}")
    be = chk.resolve_backend(backend, labels.device, op, ("reference", "triton", "native"))
    C = num_classes
    gt = labels.to(torch.int64)
    gt = torch.where((gt >= 0) & (gt < C) & (gt != ignore_index), gt, -1)
    pr = _pred_labels(pred, C, op)
    if be == "reference":
        sel, err = reference.contextrast.bane_negatives(gt, pr, C, ks=ks, reading=reading)
        return sel.view(gt.shape), err.view(gt.shape)
    err = steps.error_map(gt, pr, reading)          # one multi-label EDT: Triton or compiled C++
    with lib.kernels(be, labels.device):
        d2 = edt(err, -1, True)
    h, w = gt.shape[-2:]
    sel = select_lowest(err.reshape(-1), d2.reshape(-1), C, ks, h * h + w * w + 1)
    return sel.view(gt.shape), err


def pixel_anchor_loss(embs, labels, pred, *, num_classes: int | None = None,
                      w_low: float = 0.5, w_high: float = 0.5,
                      layer_weights=(0.1, 0.3, 0.7, 1.0), temperature: float = 0.1,
                      ks: float = 0.5, ignore_index: int = 255, normalize: bool = True,
                      detach_anchors: bool = False, reading: str = "R1",
                      cross_rank: bool = False, backend: str = "auto",
                      check_values: bool | None = None):
    """Contextrast's pixel-anchor loss L_PA with BANE negatives (specs/contextrast.md §2-5).

    Args:
        embs: sequence of I (B, D, h_i, w_i) embeddings, shallow to deep (the last is the
            deepest layer I, whose anchors are fused into every other layer's).
        labels: (B, H, W) ground truth (nearest-downsampled to each layer; ``ignore_index``).
        pred: (B, C, H', W') final prediction scores (argmax, then nearest-downsampled to each
            layer for the error maps) or (B, H', W') predicted labels (then give num_classes).
        w_low, w_high: static fusion â_i = w_low a_i + w_high a_I for classes present at layer
            I (must sum to 1; the paper's values were not recovered: 0.5/0.5 is our choice).
        layer_weights: lambda_i, one per layer (Contextrast++: 0.1, 0.3, 0.7, 1.0).
        temperature: tau (not recovered; 0.1 as ContrastiveSeg).
        ks: fraction of each class's error pixels kept as negatives, nearest the boundary (0.5).
        normalize: L2-normalise pixel embeddings first (ContrastiveSeg-style head; default).
        detach_anchors: stop gradients through the anchors (default False: they couple layers).
        reading: BANE reading "R1" (default) or "R2", see :func:`bane_negatives`.
        backend: "auto" (Triton on CUDA tensors, "native" on CPU tensors where pixcon._C is
            built: the compiled EDT and gathers over pixels x classes, never pixels x pixels),
            "reference", "triton" or "native".
        cross_rank: under torch.distributed, each layer's anchors are the class means of the
            concatenated batch of all ranks (sums and counts all-reduced; the gradient reaches
            every rank's pixels), so a class seen on any rank has an anchor everywhere. The
            negatives, the per-class means and the divisor stay this rank's. Off by default
            (per-GPU anchors, as the official code); every rank must call the loss when on.

    Returns the scalar L_PA (weight it with alpha = 0.1 in the total loss). Classes without
    negatives contribute 0; a layer without valid pixels contributes 0; the result is always
    connected to every embedding's graph.
    """
    op = "pixel_anchor_loss"
    checks = (isinstance(embs, (list, tuple)) and len(embs) > 0
              and chk.want_value_checks(check_values, embs[0].device))

    def check():               # every rank together when cross_rank (distributed.validated)
        if not isinstance(embs, (list, tuple)) or len(embs) == 0:
            raise TypeError(f"{op}: embs must be a non-empty list of (B, D, h, w) tensors")
        for i, e in enumerate(embs):
            chk.check_tensor(op, f"embs[{i}]", e, ndim=4, dtypes=chk.FLOAT_DTYPES,
                             device=embs[0].device, kind="(B, D, h, w)", like="embs[0]")
            if e.shape[:2] != embs[0].shape[:2]:
                raise ValueError(f"{op}: embs[{i}] has (B, D) = {tuple(e.shape[:2])}, embs[0] "
                                 f"has {tuple(embs[0].shape[:2])}")
        chk.check_pixel_inputs(op, embs[0], labels)
        chk.check_tensor(op, "pred", pred, ndim=(3, 4), device=embs[0].device,
                         kind="(B, C, H, W) scores or (B, H, W) labels", like="embs[0]")
        if pred.shape[0] != embs[0].shape[0]:
            raise ValueError(f"{op}: pred has batch size {pred.shape[0]}, embs "
                             f"{embs[0].shape[0]}")
        if pred.dim() == 4:
            C = pred.shape[1]
            if num_classes is not None and num_classes != C:
                raise ValueError(f"{op}: num_classes={num_classes} but pred has {C} classes")
        elif num_classes is None:
            raise ValueError(f"{op}: give num_classes when pred holds labels")
        else:
            C = num_classes
        chk.check_positive_int(op, "num_classes", C)
        if len(layer_weights) != len(embs):
            raise ValueError(f"{op}: layer_weights has {len(layer_weights)} entries for "
                             f"{len(embs)} layers")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                   for v in layer_weights):
            raise ValueError(f"{op}: layer_weights must be finite and non-negative (a "
                             f"negative weight turns a layer's loss into a reward), got "
                             f"{tuple(layer_weights)}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (w_low, w_high)) or \
                abs(w_low + w_high - 1.0) > 1e-6:
            raise ValueError(f"{op}: w_low + w_high must be 1, got {w_low} + {w_high}")
        chk.check_temperature(op, "temperature", temperature)
        if not 0 < ks <= 1:
            raise ValueError(f"{op}: ks must be in (0, 1], got {ks!r}")
        if reading not in READINGS:
            raise ValueError(f"{op}: reading must be 'R1' or 'R2', got {reading!r}")
        if checks:
            for i, e in enumerate(embs):
                chk.check_pixel_values(op, e, labels, C, ignore_index, name=f"embs[{i}]")
        return (C, _pred_labels(pred, C, op, check_values, argmax=False)), \
            (C, embs[0].shape[1], len(embs))

    C, pred_in = dist.validated(op, check, agree_now=cross_rank and checks)
    be = chk.resolve_backend(backend, embs[0].device, op, ("reference", "triton", "native"))
    kw = dict(w_low=w_low, w_high=w_high, layer_weights=layer_weights, temperature=temperature,
              ks=ks, ignore_index=ignore_index, normalize=normalize,
              detach_anchors=detach_anchors, reading=reading)
    if be == "reference":
        pred_labels = pred_in.argmax(dim=1) if pred_in.dim() == 4 else pred_in
        return reference.contextrast.pixel_anchor_loss(
            list(embs), labels, pred_labels, C, stats=dist.stats_for(op) if cross_rank else None,
            **kw)
    rank_sum = functools.partial(dist.all_reduce_sum, op=op) if cross_rank else None
    with lib.kernels(be, embs[0].device):           # scores: each layer takes its own argmax
        return _pa_fused(list(embs), labels, pred_in, C, rank_sum=rank_sum, **kw)


def _pa_fused(embs, labels, pred_labels, C, *, w_low, w_high, layer_weights, temperature, ks,
              ignore_index, normalize, detach_anchors, reading, rank_sum=None):
    """The fused path, straight from each layer's NCHW embedding: no per-layer copy of it is
    made or kept. The labels and BANE negatives first (the EDT of every layer at once), then
    :class:`_Layers`: per layer the ops pixcon::unit_class_sums (with the inverse norms) and
    anchor_contrast forward, and a backward that writes each embedding's gradient once. ``pred_labels``: labels
    or scores, whose argmax each layer takes at its own resolution. ``rank_sum``: the sum over
    ranks of a tensor (cross_rank), None on one process."""
    gts, negs = [], []
    layer_labels = steps.pyramid_labels([e.shape for e in embs], labels, pred_labels, C,
                                        ignore_index)
    for emb, (gt, pr) in zip(embs, layer_labels):
        gts.append(gt)
        negs.append(steps.error_map(gt.view(emb.shape[0], *emb.shape[2:]),
                                    pr.view(emb.shape[0], *emb.shape[2:]), reading))
    # BANE: every layer's error map, and their distance transforms in one call (Triton: one
    # launch per pass for the whole pyramid)
    d2s = edt_pyramid(negs, -1, True)
    for i, (emb, err, d2) in enumerate(zip(embs, negs, d2s)):
        h, w = emb.shape[2:]
        sel = select_lowest(err.reshape(-1), d2.reshape(-1), C, ks, h * h + w * w + 1)
        negs[i] = torch.where(sel, err.reshape(-1), -1)
    cfg = (C, float(temperature), reading == "R2", normalize, w_low, w_high, detach_anchors,
           rank_sum, lib.triton_here(embs[0].device))
    I = len(embs)
    out = _Layers.apply(cfg, *embs, *gts, *negs)
    total = None                         # every term hangs off each layer's ops: connected
    for loss_sum, counts, lam in zip(out[:I], out[I:], layer_weights):
        per_class = loss_sum / counts.clamp(min=1).to(loss_sum.dtype)
        term = lam * per_class.sum() / (counts > 0).sum().clamp(min=1)
        total = term if total is None else total + term
    return total


class _Layers(torch.autograd.Function):
    """All layers' anchor terms, from the embeddings: forward (per layer) the inverse pixel
    norms, the class sums of the unit rows, the anchors a = S / n fused across layers, the
    anchor contrast's per-class loss sums; returns (loss sums..., this rank's counts...).

    Backward in two passes per layer, so that each embedding's gradient is written once: pass A
    (pixcon::anchor_contrast_da) gives every layer's dâ; their fusion's backward gives each
    layer's class-sums gradient dS = da / n (summed over ranks when the anchors are); pass B
    (pixcon::anchor_contrast_dx) writes the embedding's gradient with both terms. (As separate
    ops with their own autograd, the class sums' gradient would be a second embedding-sized
    tensor that autograd adds to the first.)"""

    @staticmethod
    def forward(ctx, cfg, *tensors):
        C, t, only_own, normalize, w_low, w_high, detach, rank_sum, keep = cfg
        I = len(tensors) // 3
        embs, gts, negs = tensors[:I], tensors[I:2 * I], tensors[2 * I:]
        invs, sums, counts = [], [], []
        for emb, gt in zip(embs, gts):
            s, n, inv = lib.unit_class_sums(emb, gt, C, normalize)
            invs.append(inv)
            sums.append(s)
            counts.append(n)
        if rank_sum is not None:        # the anchors of the concatenated batch of all ranks
            sums = [rank_sum(s) for s in sums]
            n_all = [rank_sum(n) for n in counts]
        else:
            n_all = counts
        anchors = [s / n.clamp(min=1).to(s.dtype)[:, None] for s, n in zip(sums, n_all)]
        present = [n > 0 for n in n_all]
        fused = steps.fuse_anchors(anchors, present, w_low, w_high)
        outs = [lib.anchor_contrast(emb, inv, a, gt, neg, t, only_own, normalize, keep)
                for emb, inv, a, gt, neg in zip(embs, invs, fused, gts, negs)]
        ctx.save_for_backward(*embs, *gts, *negs, *invs, *fused, *present[-1:], *n_all,
                              *[o[k] for o in outs for k in (1, 2, 3)])
        ctx.cfg, ctx.layers = cfg, I
        lib._remember_scope(ctx)
        ctx.mark_non_differentiable(*counts)
        return (*[o[0] for o in outs], *counts)

    @staticmethod
    def backward(ctx, *grads):
        C, t, only_own, normalize, w_low, w_high, detach, rank_sum, _ = ctx.cfg
        I = ctx.layers
        saved = ctx.saved_tensors
        embs, gts, negs = saved[:I], saved[I:2 * I], saved[2 * I:3 * I]
        invs, fused = saved[3 * I:4 * I], saved[4 * I:5 * I]
        deep_present, n_all = saved[5 * I], saved[5 * I + 1:6 * I + 1]
        stats = saved[6 * I + 1:]
        args = (t, only_own, normalize)
        with lib._scope(ctx):
            inputs = []
            for i in range(I):
                G = grads[i] if grads[i] is not None else torch.zeros_like(stats[3 * i])
                inputs.append((G, embs[i], invs[i], fused[i], gts[i], negs[i],
                               *stats[3 * i:3 * i + 3]))
            passes = [lib.anchor_contrast_da(*x, *args) for x in inputs]          # pass A
            if detach:
                dsums = [None] * I
            else:
                da = steps.fuse_anchors_backward([d for d, _ in passes], deep_present, w_low,
                                                 w_high)
                dsums = [d / n.clamp(min=1).to(d.dtype)[:, None] for d, n in zip(da, n_all)]
                if rank_sum is not None:
                    dsums = [rank_sum(d) for d in dsums]
            dx = []
            for i in range(I):                                                    # pass B
                if not ctx.needs_input_grad[1 + i]:
                    dx.append(None)
                    continue
                ds = dsums[i] if dsums[i] is not None else \
                    embs[i].new_empty(0, dtype=passes[i][1].dtype)
                dx.append(lib.anchor_contrast_dx(*inputs[i], passes[i][1], ds, *args))
        return (None, *dx, *[None] * (2 * I))
