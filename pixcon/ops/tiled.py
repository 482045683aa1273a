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

One op, pixcon::tiled_contrast (pixcon.ops._library), with a kernel per device:
CPU ("native"): csrc/cpu/tiled.cpp. Rows sorted by label, so each anchor's positives are one
    range of the sorted keys (offsets, no masks); one parallel region per pass whose threads claim
    (anchor tile x key chunk) items, partial results merged in a fixed order (the same bits on
    any thread count). The one rule by which it chooses between its own paths: a pass of fewer
    than 2^27 multiply-adds (:data:`PARALLEL_WORK`) runs on one thread, a larger one on
    min(threads, items) threads (``torch.ops.pixcon.tiled_threads``).
GPU ("triton"): pixcon_kernels.tiled, the same passes on tensor cores.
"""
from __future__ import annotations

import torch

from ..reference import common as ref_common
from ..reference import contrastiveseg as ref
from . import _library
from ._common import FLOAT_DTYPES, INT_DTYPES, check_index_space, check_precision, \
    check_temperature, check_tensor, resolve_backend

PARALLEL_WORK = 2**27     # multiply-adds below which a CPU pass runs on one thread (tiled.cpp)


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
    check_temperature(op, "temperature", temperature)
    check_index_space(op, "anchors", anchors.shape[0])        # int32 key ranges and counts
    if keys is not None:
        check_index_space(op, "keys", keys.shape[0])


def _run(anchors, anchor_labels, keys, key_labels, temperature, backend, block, positives, op,
         precision):
    """(terms, npos, nl) on the chosen backend; nl differentiable."""
    _check(anchors, anchor_labels, keys, key_labels, temperature, op)
    check_precision(op, precision)
    be = resolve_backend(backend, anchors.device, op, ("reference", "native", "triton"))
    ya = anchor_labels.to(torch.int64)
    yk = None if key_labels is None else key_labels.to(torch.int64)
    if be == "reference":
        acc = torch.promote_types(anchors.dtype, torch.float32)
        k = None if keys is None else keys.to(acc)
        nl = ref_common.negative_lse(anchors.to(acc), ya, k, yk, temperature=temperature)
        if not positives:
            return None, None, nl
        return (*ref.contrast_terms(anchors.to(acc), ya, k, yk, temperature=temperature), nl)
    with _library.kernels(be, anchors.device):
        return contrast(anchors, ya, keys, yk, temperature, positives=positives, block=block,
                        precision=precision)


def contrast(anchors, anchor_labels, keys, key_labels, temperature, *, positives=True,
             block=None, precision="fp32"):
    """(terms, npos, nl) of the op pixcon::tiled_contrast on the device's kernels: the fused
    form a loss calls inside its kernels() scope (checked arguments, int64 labels)."""
    block = [] if block is None else [int(b) for b in block]
    terms, npos, nl, _ = _library.tiled_contrast_op(anchors, anchor_labels, keys, key_labels,
                                                    float(temperature), positives, block,
                                                    precision)
    return terms, npos, nl


def supervised_contrast(anchors, anchor_labels, keys=None, key_labels=None, *, temperature,
                        backend="auto", block=None, with_lse=False, precision="fp32"):
    """Per-anchor terms (M,) and positive counts (M,) int64 of the per-positive contrast above.

    anchors (M, D) float, anchor_labels (M,) int (-1 = absent); keys (K, D) and key_labels (K,),
    or None for the in-batch form (keys = anchors, gradient through both sides). Terms are 0 for
    anchors without a label or a positive. Float32 (float64 for float64 anchors).
    with_lse: also return NL (M,), differentiable (see :func:`negative_logsumexp`).
    block: (BLOCK_M, BLOCK_N) tile sizes of the CPU kernel, None for its own choice (tests use
    small ones to cross tile boundaries).
    precision: the products of fp32 rows on a GPU's tensor cores: "fp32" (the default: three
    TF32 products, fp32-level accuracy), "tf32" (one) or "bf16" (rows rounded to bf16), fp32
    accumulation, for the logits and the gradients alike. With unit rows the logits move by at
    most 2^-9 / t (tf32) or 2^-7 / t (bf16), each term by twice that. The CPU kernel and the
    reference multiply in fp32 whatever it says; half and fp64 rows in their own dtype."""
    terms, npos, nl = _run(anchors, anchor_labels, keys, key_labels, temperature, backend, block,
                           True, "supervised_contrast", precision)
    return (terms, npos, nl) if with_lse else (terms, npos)


def negative_logsumexp(anchors, anchor_labels, keys, key_labels, *, temperature, backend="auto",
                       block=None, precision="fp32"):
    """NL_r = log sum over keys whose label differs from anchor r's of exp(a_r . k / t): (M,),
    -inf where there is no such key or the anchor's label is -1; differentiable w.r.t. anchors
    (and keys when they require grad). Pass 1 of the tiled contrast alone, in O((M + K) D)
    memory: the denominator of CAC's loss. precision: as :func:`supervised_contrast`."""
    if keys is None:
        raise ValueError("negative_logsumexp: keys are required")
    return _run(anchors, anchor_labels, keys, key_labels, temperature, backend, block, False,
                "negative_logsumexp", precision)[2]
