"""CAC (Lai et al., CVPR 2021): directional context-aware consistency, specs/cac.md.

    c, y    = confidence(logits)                       max softmax, argmax (detached)
    D1      = directional_mask(c1, c2)                 view 1 pulled where view 2 is surer
    NL1     = negative_logsumexp(f1, y1 or -1, bank)   tiled: the bank's other pseudo-labels
    L1      = mean over D1 of softplus(NL1 - f1 . sg(f2) / t),   L = L1 + L2

Anchors outside the directional mask get label -1, so the tiles skip them; nothing of size
n x N is ever formed (the official code chunks it by 8000 columns under checkpointing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..core import cac as ref
from . import _common as chk
from . import _library as lib
from .tiled import contrast

BACKENDS = ("reference", "native", "triton")


def directional_contrast_loss(feat1, feat2, logits1, logits2, negatives, negative_labels, *,
                              pos_threshold: float = 0.75, temperature: float = 0.1,
                              reduction: str = "mean", backend: str = "auto",
                              official_numerics: bool = False, directional: bool = True,
                              positive_filtering: bool = True, negative_sampling: bool = True,
                              alignment: str = "contrastive", check_values: bool | None = None,
                              precision: str = "fp32"):
    """CAC's directional contrastive loss L1 + L2 (official ``loss1 + loss2``).

    Args:
        feat1, feat2: (n, D) projected features of the two views at the same image pixels (row
            j of each is the same pixel of the overlap; see :func:`overlap_rows`), used as given
            (the official projector L2-normalises them). Gradients reach each view through its
            own term only: the target of a term is stop-gradient.
        logits1, logits2: (n, C) classifier logits at those pixels; confidence = max softmax,
            pseudo-label = argmax, both detached.
        negatives: (N, D) bank features (detached inside); negative_labels: (N,) their
            pseudo-labels. Term 1 uses the negatives whose label differs from y1 (the anchor's).
        pos_threshold: gamma; term 1 covers pixels with c2 > gamma and c1 < c2 (ties: neither).
        temperature: t of the dot products (0.1).
        reduction: "mean" (the official scalar: each term averaged over its selected pixels) or
            "none" ((2, n) per-pixel terms, zero outside the directional masks).
        backend: "auto" (Triton on CUDA tensors, the compiled tiled contrast on CPU tensors),
            "reference", "native" or "triton".
        official_numerics: the official arithmetic (first-chunk stabiliser, 1e-8 inside and
            outside the log; reference backend only). By default the loss is exact: the
            official value differs by 1e-3 to 3e-2 on random unit features (more as pixel
            losses near 18.4), saturates near 18.4
            per pixel (-log 1e-8) where the exact loss is larger, and overflows to inf in fp32
            when a bank column beyond the first 8000 exceeds their maximum by more than ~88
            (see tests/test_cac.py).
        directional, positive_filtering, negative_sampling, alignment: the paper's ablation
            switches (its Table 3), all on by default (the full method). ``directional=False``
            drops [c1 < c2]; ``positive_filtering=False`` drops [c2 > gamma] (both off: every
            overlap pixel, both terms); ``negative_sampling=False`` counts every bank negative
            whatever its pseudo-label; ``alignment="l2"`` replaces the InfoNCE term by
            ||f1 - sg(f2)||^2 (experiment I; no negatives, so ``negative_sampling`` does not
            apply). The projector and the two-crop context are switches of
            :class:`pixcon.nn.DirectionalContrastLoss` and :func:`pixcon.data.overlapping_crops`.
        check_values: check that the features, the logits and the bank hold no NaN or Inf (a
            host sync; default on for CPU tensors, off for CUDA, env PIXCON_CHECK_VALUES).
        precision: the bank products of fp32 features on a GPU's tensor cores: "fp32" (the
            default: fp32-level accuracy), "tf32" or "bf16" (see
            :func:`pixcon.ops.supervised_contrast` for the error). CPU kernels and the reference
            multiply in fp32 whatever it says.

    Returns the scalar loss (float32; float64 for float64 features); nothing selected gives a
    zero connected to both features' graphs.
    """
    op = "directional_contrast_loss"
    chk.check_tensor(op, "feat1", feat1, ndim=2, dtypes=chk.FLOAT_DTYPES, kind="(n, D)")
    n, D = feat1.shape
    dev = feat1.device
    chk.check_tensor(op, "feat2", feat2, ndim=2, dtypes=chk.FLOAT_DTYPES, device=dev,
                     kind="(n, D)", like="feat1")
    if feat2.shape != feat1.shape:
        raise ValueError(f"{op}: feat2 must have feat1's shape {tuple(feat1.shape)} (the same "
                         f"overlap pixels), got {tuple(feat2.shape)}")
    for name, x in (("logits1", logits1), ("logits2", logits2)):
        chk.check_tensor(op, name, x, ndim=2, dtypes=chk.FLOAT_DTYPES, device=dev, kind="(n, C)",
                         like="feat1")
        if x.shape[0] != n:
            raise ValueError(f"{op}: {name} must have n = {n} rows like feat1, got {x.shape[0]}")
    if logits2.shape[1] != logits1.shape[1]:
        raise ValueError(f"{op}: logits1 and logits2 must have the same number of classes")
    chk.check_finite_scores(op, "logits1", logits1, check_values)
    chk.check_finite_scores(op, "logits2", logits2, check_values)
    chk.check_tensor(op, "negatives", negatives, ndim=2, dtypes=chk.FLOAT_DTYPES, device=dev,
                     kind="(N, D)", like="feat1")
    if negatives.shape[1] != D:
        raise ValueError(f"{op}: negatives must have D = {D} like feat1, got {negatives.shape[1]}")
    chk.check_tensor(op, "negative_labels", negative_labels, ndim=1, dtypes=chk.INT_DTYPES,
                     device=dev, kind="(N,)", like="feat1")
    if negative_labels.shape[0] != negatives.shape[0]:
        raise ValueError(f"{op}: negative_labels must have one entry per negative "
                         f"({negatives.shape[0]}), got {negative_labels.shape[0]}")
    for name, x in (("feat1", feat1), ("feat2", feat2), ("negatives", negatives)):
        chk.check_finite(op, name, x, check_values)
    if isinstance(pos_threshold, bool) or not isinstance(pos_threshold, (int, float)) \
            or not 0 <= pos_threshold < 1:
        raise ValueError(f"{op}: pos_threshold must be in [0, 1), got {pos_threshold!r}")
    chk.check_temperature(op, "temperature", temperature)
    chk.check_precision(op, precision)
    if reduction not in ("mean", "none"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'none', got {reduction!r}")
    for name, v in (("directional", directional), ("positive_filtering", positive_filtering),
                    ("negative_sampling", negative_sampling)):
        if not isinstance(v, bool):
            raise TypeError(f"{op}: {name} must be True or False, got {v!r}")
    if alignment not in ref.ALIGNMENTS:
        raise ValueError(f"{op}: alignment must be one of {ref.ALIGNMENTS}, got {alignment!r}")
    be = chk.resolve_backend(backend, dev, op, BACKENDS)
    switches = dict(directional=directional, positive_filtering=positive_filtering)

    def none_passes():                   # no pixel of either view is a confident target
        c = torch.cat([ref.confidence(logits1)[0], ref.confidence(logits2)[0]])
        return ~(c > pos_threshold).any()

    if positive_filtering:
        chk.warn_selected_nothing(
            op, f"pos_threshold={pos_threshold}", none_passes, dev, None,
            "no pixel's prediction is that confident in either view (an untrained network: "
            "CAC only trains on pixels above the threshold, as the paper; lower it or warm up "
            "with the supervised loss first)")
    kw = dict(pos_threshold=pos_threshold, temperature=temperature, reduction=reduction,
              negative_sampling=negative_sampling, alignment=alignment, **switches)
    if official_numerics or be == "reference":
        if official_numerics and backend not in ("auto", "reference", None):
            raise NotImplementedError(f"{op}: official_numerics runs on the reference backend "
                                      f"only, got backend={backend!r}")
        return reference.cac.directional_contrast_loss(
            feat1, feat2, logits1, logits2, negatives, negative_labels,
            official_numerics=official_numerics, **kw)
    with lib.kernels(be, dev):
        return _cac_fused(feat1, feat2, logits1, logits2, negatives, negative_labels,
                          precision=precision, **kw)


def _cac_fused(feat1, feat2, logits1, logits2, negatives, negative_labels, *, pos_threshold,
               temperature, reduction, negative_sampling, alignment, precision, **switches):
    """Both directions on the device's kernels (pixcon::tiled_contrast's pass 1 for NL)."""
    c1, y1 = ref.confidence(logits1)
    c2, y2 = ref.confidence(logits2)
    bank = negatives.detach()
    dt = torch.promote_types(feat1.dtype, torch.float32)
    out = []
    for fa, ft, ca, ct, ya in ((feat1, feat2, c1, c2, y1), (feat2, feat1, c2, c1, y2)):
        d = ref.directional_mask(ca, ct, pos_threshold, **switches)
        if alignment == "l2":
            ell = torch.where(d, ref.l2_terms(fa.to(dt), ft.to(dt)), 0.0)
        else:
            a = fa.to(dt) if lib.compiled_cpu(fa.device) else fa
            ya, yk = ref.sampling_labels(ya, negative_labels, negative_sampling)
            nl = contrast(a, torch.where(d, ya, -1).to(torch.int64), bank.to(a.dtype),
                          yk.to(torch.int64), temperature, positives=False,
                          precision=precision)[2]
            pos = (fa.to(dt) * ft.detach().to(dt)).sum(dim=1) / temperature
            ell = torch.where(d, F.softplus(nl - pos), 0.0)
        out.append(ell if reduction == "none" else ell.sum() / (d.sum() + 1e-12))
    return torch.stack(out) if reduction == "none" else out[0] + out[1]


def _check_box(name, b, box, hw, stride):
    """An overlap box inside its crop's map: 0 <= top < bottom <= h * stride (the same for
    left/right), every side a multiple of ``stride``. A box outside gave 0 or truncated rows."""
    t, l, btm, r = box
    h, w = hw
    if any(x % stride for x in box) or not (0 <= t < btm <= h * stride and
                                             0 <= l < r <= w * stride):
        raise ValueError(f"overlap_rows: {name}[{b}] = {tuple(box)} must be (top, left, bottom, "
                         f"right) multiples of stride {stride} inside the crop's "
                         f"{h * stride} x {w * stride} pixels, top < bottom and left < right")


def overlap_rows(maps1, maps2, boxes1, boxes2, flips1=None, flips2=None, *, stride: int = 8):
    """Cut the aligned overlap rows out of two views' full maps.

    maps1, maps2: a (B, X, h, w) map or a list of them per view (features, logits, ...) at
        feature stride ``stride``; boxes1, boxes2: (B, 4) integer overlap boxes (top, left,
        bottom, right) in each crop's own pixel coordinates, multiples of ``stride`` (as
        :func:`pixcon.data.overlapping_crops` gives them, computed before flipping); flips1,
        flips2: (B,) bool, True where that crop was flipped horizontally (undone on the maps
        before cutting). Returns, per view, a list of (n, X) rows (one per map), row j of view
        1 and of view 2 being the same image pixel. Boxes are read on the host (they come from
        the data loader)."""
    single = torch.is_tensor(maps1)
    maps1 = [maps1] if single else list(maps1)
    maps2 = [maps2] if single else list(maps2)
    B = maps1[0].shape[0]
    boxes = [torch.as_tensor(b).reshape(B, 4).tolist() for b in (boxes1, boxes2)]
    flips = [[False] * B if f is None else torch.as_tensor(f).reshape(B).tolist()
             for f in (flips1, flips2)]
    rows = ([], [])
    for v, maps in enumerate((maps1, maps2)):
        for m in maps:
            chk.check_tensor("overlap_rows", f"maps{v + 1}", m, ndim=4, kind="(B, X, h, w)")
            parts = []
            for b in range(B):
                _check_box(f"boxes{v + 1}", b, boxes[v][b], m.shape[2:], stride)
                t, l, btm, r = (x // stride for x in boxes[v][b])
                x = m[b].flip(-1) if flips[v][b] else m[b]
                parts.append(x[:, t:btm, l:r].reshape(x.shape[0], -1).T)
            rows[v].append(torch.cat(parts))
    if [r.shape[0] for r in rows[0]] != [r.shape[0] for r in rows[1]]:
        raise ValueError("overlap_rows: the two views' boxes cover different pixel counts")
    return (rows[0][0], rows[1][0]) if single else rows
