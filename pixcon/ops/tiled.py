"""The tiled supervised contrast shared by ContrastiveSeg, the dense mode and CAC: anchors x keys
in tiles with an online log-sum-exp (specs/fused_infonce.md §1, §6), never an anchors x keys
matrix in forward or backward.

For anchor r (label y_r) and keys k (labels), s_rk = a_r . k_k / t:

    NL_r    = LSE_{k : label_k != y_r} s_rk                      (pass 1: negative mass, online)
    term_r  = 1/|P(r)| sum_{p in P(r)} softplus(NL_r - s_rp)      (pass 2: per-positive terms)
    W_r     = sum_{p in P(r)} sigmoid(NL_r - s_rp)                (saved for backward)

P(r) = keys with label y_r (in-batch, keys = anchors: except r). Labels -1 mark absent rows. Saved
for backward: the inputs (no copies) and three numbers per anchor (NL, W, |P|). Backward
recomputes each tile:

    dterm_r / ds_rn = W_r e^{s_rn - NL_r} / |P(r)|        (negatives)
    dterm_r / ds_rp = -sigmoid(NL_r - s_rp) / |P(r)|      (positives)

CPU ("native"): anchors and keys sorted by label, tiles of BLAS matmuls driven from Python, tile
pairs without a negative or a positive skipped, each positive tile's logits computed once.
GPU ("triton"): pixcon_kernels.tiled, the same passes on tensor cores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import contrastiveseg as ref
from ._common import FLOAT_DTYPES, INT_DTYPES, check_positive_float, check_tensor, resolve_backend

BLOCK_M, BLOCK_N = 512, 2048     # CPU tiles: 4 MiB of fp32 logits, a few BLAS calls per tile


def _check(anchors, anchor_labels, keys, key_labels, temperature, op):
    check_tensor(op, "anchors", anchors, ndim=2, dtypes=FLOAT_DTYPES, kind="(M, D)")
    dev = anchors.device
    check_tensor(op, "anchor_labels", anchor_labels, ndim=1, dtypes=INT_DTYPES, device=dev,
                 kind="(M,)", like="anchors")
    if anchor_labels.shape[0] != anchors.shape[0]:
        raise ValueError(f"{op}: anchor_labels must have one entry per anchor "
                         f"({anchors.shape[0]}), got {anchor_labels.shape[0]}")
    if (keys is None) != (key_labels is None):
        raise ValueError(f"{op}: keys and key_labels go together: give both or neither")
    if keys is not None:
        check_tensor(op, "keys", keys, ndim=2, dtypes=FLOAT_DTYPES, device=dev, kind="(K, D)",
                     like="anchors")
        check_tensor(op, "key_labels", key_labels, ndim=1, dtypes=INT_DTYPES, device=dev,
                     kind="(K,)", like="anchors")
        if keys.shape[1] != anchors.shape[1]:
            raise ValueError(f"{op}: keys must have D = {anchors.shape[1]} like anchors, got "
                             f"{keys.shape[1]}")
        if key_labels.shape[0] != keys.shape[0]:
            raise ValueError(f"{op}: key_labels must have one entry per key ({keys.shape[0]}), "
                             f"got {key_labels.shape[0]}")
    check_positive_float(op, "temperature", temperature)


def _run(anchors, anchor_labels, keys, key_labels, temperature, backend, block, positives, op):
    """(terms, npos, nl) on the chosen backend; nl differentiable."""
    _check(anchors, anchor_labels, keys, key_labels, temperature, op)
    be = resolve_backend(backend, anchors.device, op, ("reference", "native", "triton"),
                         needs_extension=False)
    acc = torch.promote_types(anchors.dtype, torch.float32)
    ya = anchor_labels.to(torch.int64)
    yk = None if key_labels is None else key_labels.to(torch.int64)
    if be == "reference":
        k = None if keys is None else keys.to(acc)
        nl = ref.negative_lse(anchors.to(acc), ya, k, yk, temperature=temperature)
        if not positives:
            return None, None, nl
        return (*ref.contrast_terms(anchors.to(acc), ya, k, yk, temperature=temperature), nl)
    if be == "triton":
        from . import _library
        return _library.tiled_contrast(anchors, ya, keys, yk, float(temperature), positives)
    return _TiledCPU.apply(anchors, ya, keys, yk, float(temperature), tuple(block), positives)


def supervised_contrast(anchors, anchor_labels, keys=None, key_labels=None, *, temperature,
                        backend="auto", block=(BLOCK_M, BLOCK_N), with_lse=False):
    """Per-anchor terms (M,) and positive counts (M,) int64 of the per-positive contrast above.

    anchors (M, D) float, anchor_labels (M,) int (-1 = absent); keys (K, D) and key_labels (K,),
    or None for the in-batch form (keys = anchors, gradient through both sides). Terms are 0 for
    anchors without a label or a positive. Float32 (float64 for float64 anchors).
    with_lse: also return NL (M,), differentiable (see :func:`negative_logsumexp`)."""
    terms, npos, nl = _run(anchors, anchor_labels, keys, key_labels, temperature, backend, block,
                           True, "supervised_contrast")
    return (terms, npos, nl) if with_lse else (terms, npos)


def negative_logsumexp(anchors, anchor_labels, keys, key_labels, *, temperature, backend="auto",
                       block=(BLOCK_M, BLOCK_N)):
    """NL_r = log sum over keys whose label differs from anchor r's of exp(a_r . k / t): (M,),
    -inf where there is no such key or the anchor's label is -1; differentiable w.r.t. anchors
    (and keys when they require grad). Pass 1 of the tiled contrast alone, in O((M + K) D)
    memory: the denominator of CAC's loss."""
    if keys is None:
        raise ValueError("negative_logsumexp: keys are required")
    return _run(anchors, anchor_labels, keys, key_labels, temperature, backend, block, False,
                "negative_logsumexp")[2]


# --- CPU tiles --------------------------------------------------------------------------------
def _spans(n, b):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def _label_ranges(y_sorted, spans):
    """(min, max) label of each tile of a sorted label vector (host ints: CPU tensors)."""
    return [(int(y_sorted[i0]), int(y_sorted[i1 - 1])) for i0, i1 in spans]


class _Plan:
    """Anchors and keys sorted by label, their tiles and which tile pairs hold a negative or a
    positive (labels sorted: a tile pair whose label ranges miss each other has no positive, one
    with a single shared label has no negative)."""

    def __init__(self, ya, yk, in_batch, block):
        self.pa = _order(ya)
        self.pk = self.pa if in_batch else _order(yk)
        self.ya = _take(ya, self.pa)
        self.yk = self.ya if in_batch else _take(yk, self.pk)
        self.ta, self.tk = _spans(len(self.ya), block[0]), _spans(len(self.yk), block[1])
        ra, rk = _label_ranges(self.ya, self.ta), _label_ranges(self.yk, self.tk)
        self.pairs = []
        for i, (alo, ahi) in enumerate(ra):
            row = []
            for j, (klo, khi) in enumerate(rk):
                if ahi < 0 or khi < 0:
                    continue                                   # only absent rows on one side
                has_pos = max(alo, klo, 0) <= min(ahi, khi)
                has_neg = not (alo == ahi == klo == khi)
                row.append((j, has_neg, has_pos))
            self.pairs.append(row)
        self.in_batch = in_batch

    def masks(self, i, j, has_neg, has_pos):
        (i0, i1), (j0, j1) = self.ta[i], self.tk[j]
        ya, yk = self.ya[i0:i1, None], self.yk[None, j0:j1]
        valid = (ya >= 0) & (yk >= 0)
        same = (ya == yk) & valid
        neg = valid & ~same if has_neg else None
        pos = same if has_pos else None
        if has_pos and self.in_batch and i0 < j1 and j0 < i1:     # r is not its own positive
            r = torch.arange(i0, i1)[:, None]
            pos = pos & (r != torch.arange(j0, j1)[None, :])
        return neg, pos


def _order(y):
    """The stable sort of labels y, or None when y is sorted already (a bank, or a caller that
    sorted its rows): no permuted copy of the rows is made then."""
    if len(y) < 2 or bool((y[1:] >= y[:-1]).all()):
        return None
    return torch.sort(y, stable=True).indices


def _take(x, perm):
    return x if perm is None else x[perm]


def _put(x, perm):
    """x in sorted order back to the callers' order."""
    if perm is None:
        return x
    out = torch.empty_like(x)
    out[perm] = x
    return out


def _pure(mask):
    """None when the mask is all true (no masking needed), else the mask."""
    return None if bool(mask.all()) else mask


CACHE_BYTES = 8 << 20    # positive tiles' logits kept from pass 1 for pass 2 (beyond: recompute)


def _masked_sum(x, mask):
    """Row sums of x where mask (x is consumed)."""
    return (x if mask is None else x.masked_fill_(~mask, 0.0)).sum(dim=1)


class _TiledCPU(torch.autograd.Function):
    """Outputs (terms, npos, NL), NL differentiable too. Tiles of at most BLOCK_M x BLOCK_N logits; each tile's temporaries are made in place, so a
    tile costs two or three BLOCK_M x BLOCK_N buffers at a time."""

    @staticmethod
    def forward(ctx, a, ya, k, yk, t, block, positives):
        in_batch = k is None
        acc = torch.promote_types(a.dtype, torch.float32)
        plan = _Plan(ya, yk, in_batch, block)
        A = _take(a.detach().to(acc), plan.pa)
        K = A if in_batch else _take(k.detach().to(acc), plan.pk)
        M = A.shape[0]
        NL = torch.full((M,), float("-inf"), dtype=acc)
        S_pos = torch.zeros(M, dtype=acc)
        W = torch.zeros(M, dtype=acc)
        npos = torch.zeros(M, dtype=torch.int64)
        for i, (i0, i1) in enumerate(plan.ta):
            a_i, later, budget = A[i0:i1], [], CACHE_BYTES
            lse = NL[i0:i1]
            for j, has_neg, has_pos in plan.pairs[i]:                # pass 1: negatives
                if not (has_neg or (has_pos and positives)):
                    continue
                j0, j1 = plan.tk[j]
                s = torch.mm(a_i, K[j0:j1].T).div_(t)
                neg, pos = plan.masks(i, j, has_neg, has_pos and positives)
                if pos is not None:
                    keep = s.nbytes <= budget
                    budget -= s.nbytes if keep else 0
                    later.append((j, s.clone() if keep and neg is not None else
                                  (s if keep else None), pos))
                if neg is not None and bool(neg.any()):
                    m = _pure(neg)
                    lse = torch.logaddexp(lse, torch.logsumexp(
                        s if m is None else s.masked_fill_(~m, float("-inf")), dim=1))
            NL[i0:i1] = lse
            for j, s, pos in later:                                   # pass 2: positives
                if s is None:
                    j0, j1 = plan.tk[j]
                    s = torch.mm(a_i, K[j0:j1].T).div_(t)
                x = s.neg_().add_(lse[:, None])                         # NL - s
                S_pos[i0:i1] += _masked_sum(F.softplus(x), pos)
                W[i0:i1] += _masked_sum(x.sigmoid_(), pos)
                npos[i0:i1] += pos.sum(dim=1)
        out_t, out_n = _put(S_pos / npos.clamp(min=1), plan.pa), _put(npos, plan.pa)
        ctx.save_for_backward(a, k, NL, W, npos)
        ctx.plan, ctx.t = plan, t
        ctx.mark_non_differentiable(out_n)
        return out_t, out_n, _put(NL, plan.pa)

    @staticmethod
    def backward(ctx, g, _gn, g_nl):
        a, k, NL, W, npos = ctx.saved_tensors
        plan, t = ctx.plan, ctx.t
        in_batch = k is None
        acc = NL.dtype
        A = _take(a.detach().to(acc), plan.pa)
        K = A if in_batch else _take(k.detach().to(acc), plan.pk)
        g = torch.zeros_like(NL) if g is None else _take(g.to(acc), plan.pa)
        coef = torch.where(npos > 0, g / npos.clamp(min=1), 0.0)
        g_nl = torch.zeros_like(NL) if g_nl is None else _take(g_nl.to(acc), plan.pa)
        dA = torch.zeros_like(A)
        need_k = in_batch or ctx.needs_input_grad[2]
        dK = torch.zeros_like(K) if need_k else None
        for i, (i0, i1) in enumerate(plan.ta):
            c = coef[i0:i1]
            cw = (c * W[i0:i1] + g_nl[i0:i1])[:, None]            # weight of e^{s - NL}
            has_c = bool((c != 0).any())
            if not (has_c or bool((cw != 0).any())):
                continue
            a_i, nl = A[i0:i1], NL[i0:i1, None]
            for j, has_neg, has_pos in plan.pairs[i]:
                has_pos = has_pos and has_c
                if not (has_neg or has_pos):
                    continue
                j0, j1 = plan.tk[j]
                k_j = K[j0:j1]
                s = torch.mm(a_i, k_j.T).div_(t)
                neg, pos = plan.masks(i, j, has_neg, has_pos)
                if neg is not None:                      # c W e^{s - NL} on the negatives
                    dS = torch.sub(s, nl).exp_().mul_(cw)
                    m = _pure(neg)
                    if m is not None:
                        dS.masked_fill_(~m, 0.0)
                else:
                    dS = torch.zeros_like(s)
                if pos is not None:                      # - c sigmoid(NL - s) on the positives
                    p = s.neg_().add_(nl).sigmoid_().mul_(c[:, None]).masked_fill_(~pos, 0.0)
                    dS.sub_(p)
                dA[i0:i1].addmm_(dS, k_j)
                if dK is not None:
                    dK[j0:j1].addmm_(dS.T, a_i)
        if in_batch:
            dA += dK
            dK = None
        ga = _put(dA.div_(t), plan.pa).to(a.dtype)
        gk = None if dK is None else _put(dK.div_(t), plan.pk).to(k.dtype)
        return ga, None, gk, None, None, None, None
