"""ContrastiveSeg (Wang et al., ICCV 2021): cross-image pixel contrast, specs/contrastiveseg.md,
and its dense mode (every valid pixel an anchor, no sampling).

    anchors = sample_anchors(labels, predict)        segmentation-aware hard anchors (sort, no sync)
    terms   = supervised_contrast(z, y, keys)        tiled: NL_r, then softplus(NL_r - s_rp) per positive
    loss    = (t / t_b) * mean over anchors with a positive

The fused path has no host sync and no Python loop over classes or anchors; it saves the inputs
and three numbers per anchor, never an anchors x keys matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as dist
from .. import reference
from ..core import common as cm
from ..core import contrastiveseg as steps
from ..core.rng import STREAM_ANCHOR, draw_seed
from . import _common as chk
from . import _library as lib
from . import primitives as prim
from .tiled import contrast, supervised_contrast

BACKENDS = ("reference", "native", "triton")
LABEL_LIMIT = 2**31        # class values above this are not classes (they would overflow the sort keys)


def _backend(backend, device, op):
    return chk.resolve_backend(backend, device, op, BACKENDS)


def _predictions(op, predict, B, h, w, check_values=None):
    """(B, h, w) integer predictions: predict as given (integer map at feature or image
    resolution) or the argmax over classes of (B, C, h, w) logits/probabilities."""
    chk.check_tensor(op, "predict", predict, ndim=(3, 4), dtypes=chk.INT_DTYPES + chk.FLOAT_DTYPES)
    if predict.dim() == 4:
        if predict.dtype not in chk.FLOAT_DTYPES or predict.shape[2:] != (h, w):
            raise ValueError(f"{op}: a 4-D predict must be (B, C, h, w) = ({B}, C, {h}, {w}) "
                             f"float logits or probabilities, got {tuple(predict.shape)} "
                             f"{predict.dtype}")
        chk.check_finite_scores(op, "predict", predict, check_values)
        predict = predict.detach().argmax(dim=1)
    elif predict.dtype not in chk.INT_DTYPES:
        raise TypeError(f"{op}: a 3-D predict must be an integer class map (the argmax of the "
                        f"segmentation logits), got {predict.dtype}")
    if predict.shape[0] != B or predict.shape[1] < h or predict.shape[2] < w:
        raise ValueError(f"{op}: predict must be (B, h, w) = ({B}, {h}, {w}) or larger, got "
                         f"{tuple(predict.shape)}")
    return cm.resize_nearest(predict, (h, w))


def sample_anchors(gt, pred, *, max_samples: int, max_views: int, seed: int):
    """Segmentation-aware hard anchors, no host sync: op ``pixcon::sample_anchors``, whose CUDA
    kernel is :func:`sample_anchors_torch` and whose CPU kernel is compiled
    (csrc/cpu/hard_anchors.cpp: per (image, class) pair a bounded heap of the smallest keys, no
    sort of every pixel). gt, pred: (B, h, w) at feature resolution, gt -1 = ignored. Returns
    (index (max_samples,) flat pixel indices, -1 in unused slots; labels (max_samples,), -1
    unused; T; n_view) with T and n_view 0-d tensors, rows in the official view-major order
    (slot v*T + t): the same samples as pixcon.reference.contrastiveseg.sample_anchors."""
    return lib.sample_anchors(gt, pred, int(max_samples), int(max_views), int(seed))


def sample_anchors_torch(gt, pred, *, max_samples: int, max_views: int, seed: int):
    """:func:`sample_anchors` vectorised in torch (one sort by key, one by group): the op's
    CUDA kernel, and its kernel on CPU tensors inside triton_on_cpu."""
    B = gt.shape[0]
    g, p = gt.reshape(-1).to(torch.int64), pred.reshape(-1).to(torch.int64)
    P, dev = g.numel(), g.device
    pix = torch.arange(P, device=dev)
    key = lib.philox(pix, seed, STREAM_ANCHOR)[:, 0]
    valid = (g >= 0) & (g < LABEL_LIMIT)
    easy = (p == g).to(torch.int64)
    # sort by (image, class, hard before easy, key): stable sorts by key, then by group
    group = torch.where(valid, ((pix // (P // B)) << 33) | (g << 1) | easy, torch.iinfo(torch.int64).max)
    by_key = torch.sort(key, stable=True).indices
    order = by_key[torch.sort(group[by_key], stable=True).indices]
    gs = group[order]
    first = torch.ones(P, dtype=torch.bool, device=dev)
    first[1:] = (gs[1:] >> 1) != (gs[:-1] >> 1)
    gid = torch.cumsum(first, 0) - 1                                   # dense (image, class) id
    vs = valid[order].to(torch.int64)
    n_tot = torch.zeros(P, dtype=torch.int64, device=dev).index_add_(0, gid, vs)
    n_easy = torch.zeros_like(n_tot).index_add_(0, gid, vs * (gs & 1))
    n_hard = n_tot - n_easy
    start = torch.zeros_like(n_tot).index_add_(0, gid, torch.where(first, pix, 0))
    kept = n_tot > max_views
    T = kept.sum()
    n_view = torch.clamp(max_samples // T.clamp(min=1), max=max_views)
    hard_ok, easy_ok = 2 * n_hard >= n_view, 2 * n_easy >= n_view      # >= n_view / 2
    keep_h = torch.where(hard_ok & easy_ok, n_view // 2,
                         torch.where(hard_ok, n_view - n_easy, n_hard))
    rank = torch.cumsum(kept, 0) - 1
    M = max_samples
    pairs = torch.zeros(M + 1, dtype=torch.int64, device=dev).scatter_(
        0, torch.where(kept & (rank < M), rank, M), pix)               # kept group of pair t
    slot = torch.arange(M, device=dev)
    t, v = slot % T.clamp(min=1), slot // T.clamp(min=1)
    used = slot < T * n_view
    grp = pairs[t]
    kh = keep_h[grp]
    pos = start[grp] + torch.where(v < kh, v, n_hard[grp] + v - kh)
    index = torch.where(used, order[pos.clamp(0, P - 1)], -1)
    labels = torch.where(used, g[index.clamp(min=0)], -1)
    return index, labels, T, n_view


def _any_class_over(gt, max_views):
    """0-d bool: some (image, class) of gt (B, h, w), -1 ignored, has more than max_views
    pixels (the official rule for keeping a class of an image). Any class below 2^31: runs of a
    sort, no table as large as the largest class (a bincount of 2^31 classes would be 16 GB)."""
    B = gt.shape[0]
    lab = gt.reshape(B, -1).to(torch.int64)        # classes below 2^31: (image, class) < 2^63
    key = torch.where(lab >= 0, (torch.arange(B, device=lab.device)[:, None] << 31) | lab, -1)
    key = torch.sort(key.reshape(-1)).values        # a run of equal keys per pair (-1: ignored)
    size = torch.searchsorted(key, key, right=True) - torch.searchsorted(key, key)
    return ((size > max_views) & (key >= 0)).any()


def _check_views(op, T, max_samples, max_views, device, check_values):
    """n_view = 0 (more kept pairs than max_samples) is an error, as a clear message where the
    count can be read (CPU, or value checks on) and a device assertion otherwise."""
    msg = (f"{op}: more (image, class) pairs with over max_views={max_views} pixels than "
           f"max_samples={max_samples} anchors allow (n_view = max_samples // T = 0); raise "
           "max_samples")
    if chk.want_value_checks(check_values, device):
        if int(T) > max_samples:
            raise ValueError(msg + f" to at least {int(T)}")
    else:
        torch._assert_async(T <= max_samples, msg)


def _memory_keys(op, memory, D, device):
    """(keys (K, D), key_labels (K,)) from a PixelMemoryBank (anything with .keys()) or a pair."""
    if hasattr(memory, "keys") and callable(memory.keys):
        memory = memory.keys()
    if not (isinstance(memory, (tuple, list)) and len(memory) == 2):
        raise TypeError(f"{op}: memory must be a pixcon.nn.PixelMemoryBank or a (keys (K, D), "
                        f"key_labels (K,)) pair, got {type(memory).__name__}")
    keys, key_labels = memory
    chk.check_tensor(op, "memory keys", keys, ndim=2, dtypes=chk.FLOAT_DTYPES, device=device,
                     kind="(K, D)")
    chk.check_tensor(op, "memory key_labels", key_labels, ndim=1, dtypes=chk.INT_DTYPES,
                     device=device, kind="(K,)")
    if keys.shape[1] != D or key_labels.shape[0] != keys.shape[0]:
        raise ValueError(f"{op}: memory keys must be (K, {D}) with K key labels, got keys "
                         f"{tuple(keys.shape)} and labels {tuple(key_labels.shape)}")
    return keys.detach(), key_labels.to(torch.int64)


def _check_common(op, emb, labels, ignore_index, temperature, base_temperature):
    chk.check_pixel_inputs(op, emb, labels)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    chk.check_temperature(op, "temperature", temperature)
    chk.check_temperature(op, "base_temperature", base_temperature)


def _check_values(op, emb, labels, ignore_index):
    """Data checks (host sync): finite embeddings, labels in [0, 2^31) or ignore_index."""
    if not bool(torch.isfinite(emb).all()):
        raise ValueError(f"{op}: emb contains NaN or Inf")
    lab = labels.to(torch.int64)        # compared in their own dtype, 2^31 would wrap
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= LABEL_LIMIT))
    if bool(bad.any()):
        raise ValueError(f"{op}: labels must be class indices in [0, 2^31) or ignore_index="
                         f"{ignore_index}; found {int(lab[bad][0])}")


def pixel_contrast_loss(emb, labels, predict, *, ignore_index: int = 255, max_samples: int = 1024,
                        max_views: int = 100, temperature: float = 0.1,
                        base_temperature: float = 0.07, memory=None, seed: int | None = None,
                        backend: str = "auto", check_values: bool | None = None,
                        precision: str = "fp32"):
    """ContrastiveSeg's pixel contrast loss (the official in-batch ``PixelContrastLoss``, and its
    memory-bank form), with the official sampler and per-positive denominator.

    Args:
        emb: (B, D, h, w) float embeddings, used as given (the official projection head
            L2-normalises them; pixcon.nn.PixelContrastLoss holds that head).
        labels: (B, H, W) integer ground truth at image or feature resolution, nearest-
            downsampled to (h, w); ``ignore_index`` (default 255, e.g. -1 for openseg) ignored.
        predict: (B, h, w) integer predictions at feature resolution (the argmax of the
            segmentation logits before upsampling), or the (B, C, h, w) logits themselves.
        max_samples: anchors in total (M); max_views: per class and image (V). A class of an
            image is kept when it has more than V pixels; n_view = min(M // T, V) for T kept
            pairs; hard anchors (ground truth c, predicted not c) and easy ones split by the
            official rule, chosen uniformly without replacement.
        temperature, base_temperature: t and t_b; the loss carries the factor t / t_b.
        memory: None (anchors contrasted with each other, the default and the README's runs),
            a pixcon.nn.PixelMemoryBank, or a (keys (K, D), key_labels (K,)) pair: anchors are
            then contrasted with the bank only (official memory variant); keys get no gradient.
        seed: int or None (drawn from torch's generator); the same seed gives the same anchors
            on every backend.
        backend: "auto" (Triton on CUDA tensors, the compiled CPU kernel on CPU tensors),
            "reference", "native" (pixcon::tiled_contrast's C++ kernel: tiles, recompute in
            backward) or "triton".
        check_values: NaN and label checks and the n_view = 0 check as a clear error (a host
            sync; default on for CPU tensors, off for CUDA, where n_view = 0 is a device assert).
        precision: the products of fp32 embeddings on a GPU's tensor cores: "fp32" (the
            default: fp32-level accuracy), "tf32" or "bf16" (faster; see
            :func:`pixcon.ops.supervised_contrast` for the error). CPU kernels and the reference
            multiply in fp32 whatever it says.

    Returns the scalar loss (float32; float64 for float64 emb). Defined where the official code
    fails: no kept class gives a zero connected to emb's graph (official: crash on None);
    anchors without a positive (n_view = 1 and a class in one image) are left out of the mean
    (official: NaN); n_view = 0 (T > max_samples) raises, suggesting a larger max_samples.
    """
    op = "pixel_contrast_loss"
    _check_common(op, emb, labels, ignore_index, temperature, base_temperature)
    chk.check_positive_int(op, "max_samples", max_samples, upper=2**24)
    chk.check_positive_int(op, "max_views", max_views)
    chk.check_precision(op, precision)
    B, D, h, w = emb.shape
    pred = _predictions(op, predict, B, h, w, check_values)
    if pred.device != emb.device:
        raise ValueError(f"{op}: predict is on {pred.device} but emb is on {emb.device}")
    seed = draw_seed(seed, op)
    be = _backend(backend, emb.device, op)
    mem = None if memory is None else _memory_keys(op, memory, D, emb.device)
    gt = cm.pixel_labels(labels, (h, w), LABEL_LIMIT, ignore_index).view(B, h, w)
    if chk.want_value_checks(check_values, emb.device):
        _check_values(op, emb, labels, ignore_index)

    def warn(nothing, stacklevel):
        chk.warn_selected_nothing(
            op, f"max_views={max_views}", nothing, emb.device, check_values,
            f"no (image, class) pair has more than max_views labelled pixels at the feature "
            f"resolution {h}x{w}; lower max_views for small maps (a class should cover more "
            f"than max_views of its image's h*w = {h * w} pixels)", stacklevel)

    if be == "reference":
        warn(lambda: ~_any_class_over(gt, max_views), 4)
        return reference.contrastiveseg.pixel_contrast_loss(
            emb, labels, pred, ignore_index=ignore_index, max_samples=max_samples,
            max_views=max_views, temperature=temperature, base_temperature=base_temperature,
            memory=mem, seed=seed)
    with lib.kernels(be, emb.device):
        return _pixel_contrast_fused(emb, gt, pred, mem, max_samples, max_views, temperature,
                                     base_temperature, seed, check_values, warn, precision)


def _pixel_contrast_fused(emb, gt, pred, mem, max_samples, max_views, temperature,
                          base_temperature, seed, check_values, warn, precision):
    op = "pixel_contrast_loss"
    index, y, T, n_view = sample_anchors(gt, pred, max_samples=max_samples,
                                         max_views=max_views, seed=seed)
    warn(lambda: T == 0, 5)          # T: the kept (image, class) pairs, from the sampler's counts
    _check_views(op, T, max_samples, max_views, emb.device, check_values)
    cpu = lib.compiled_cpu(emb.device)
    if cpu and not torch.compiler.is_compiling():
        # CPU tensors: the filled slots are the prefix [0, T n_view); the empty ones (label -1,
        # never counted) only cost full-size buffers (8192 slots with 1024 filled: the step was
        # their allocation and zeroing). Reading the count is no device sync on the CPU.
        used = int(T * n_view)
        index, y = index[:used], y[:used]
    z = prim.pixel_rows_at(emb, index)                              # (M, D), with grad
    if cpu:
        z = z.to(torch.promote_types(emb.dtype, torch.float32))
    keys, key_labels = (None, None) if mem is None else (mem[0].to(z.dtype), mem[1])
    terms, npos, _ = contrast(z, y, keys, key_labels, temperature, precision=precision)
    return steps.mean_over_anchors(terms, npos, y, temperature / base_temperature)


def dense_contrast_loss(emb, labels, *, ignore_index: int = 255, temperature: float = 0.1,
                        base_temperature: float = 0.07, cross_rank: bool = False,
                        backend: str = "auto", check_values: bool | None = None,
                        precision: str = "fp32"):
    """ContrastiveSeg's per-positive supervised contrast over every valid pixel of the batch: no
    sampling, anchors = keys = all pixels, O(N D) memory in forward and backward (tiles,
    recompute; never N x N).

    Arguments as :func:`pixel_contrast_loss`. The "reference" backend builds N x N matrices and
    refuses above pixcon.reference.contrastiveseg.DENSE_LIMIT pixel pairs (8192^2); "native"
    (CPU) and "triton" (GPU) run any N whose N x D fits in memory: 131,072 pixels at D = 256
    (8 x 128 x 128) take minutes on 2 CPU cores. Returns the scalar loss (zero, connected to
    emb's graph, when no pixel has a positive).

    cross_rank: under torch.distributed, the keys are every rank's pixels (all-gathered, with
    gradient), and the value, the same on every rank, is the loss over the concatenated batch:
    under DDP the averaged gradient is exactly that loss's gradient. Every rank must pass the
    same shapes (checked, on every rank together, with the value checks). Off by default (each
    rank's own pixels)."""
    op = "dense_contrast_loss"
    _check_common(op, emb, labels, ignore_index, temperature, base_temperature)
    chk.check_precision(op, precision)
    B, D, h, w = emb.shape
    be = _backend(backend, emb.device, op)
    lab = cm.pixel_labels(labels, (h, w), LABEL_LIMIT, ignore_index)
    checks = chk.want_value_checks(check_values, emb.device)
    if cross_rank and dist.is_distributed():

        def check():                      # on every rank together: a failure raises on all
            _check_values(op, emb, labels, ignore_index)
            return emb.shape

        if checks:                        # a host sync: with the value checks only
            dist.checked(op, check)
        if be == "reference":
            return _dense_cross_rank(emb, lab, temperature, base_temperature, be)
        with lib.kernels(be, emb.device):
            return _dense_cross_rank(emb, lab, temperature, base_temperature, be, precision)
    if checks:
        _check_values(op, emb, labels, ignore_index)
    if be == "reference":
        return reference.contrastiveseg.dense_contrast_loss(
            emb, labels, ignore_index=ignore_index, temperature=temperature,
            base_temperature=base_temperature)
    with lib.kernels(be, emb.device):
        lab, order = torch.sort(lab, stable=True)      # rows by class: the tiles skip without copies
        z = prim.pixel_rows_at(emb, order)
        if lib.compiled_cpu(emb.device):
            z = z.to(torch.promote_types(emb.dtype, torch.float32))
        terms, npos, _ = contrast(z, lab, None, None, temperature, precision=precision)
    return steps.mean_over_anchors(terms, npos, lab, temperature / base_temperature)


def _dense_cross_rank(emb, lab, temperature, base_temperature, be, precision="fp32"):
    """This rank's pixels as anchors against all ranks' pixels as keys. The keys include each
    anchor itself (a positive of its own label, never a negative): its term is taken out of
    the per-positive sum afterwards, exactly, from the differentiable NL the primitive returns.
    The mean's numerator and count are all-reduced, so every rank holds the global loss."""
    acc = torch.promote_types(emb.dtype, torch.float32)
    lab, order = torch.sort(lab, stable=True)
    z = prim.pixel_rows_at(emb, order)
    z = z.to(acc) if be == "reference" or lib.compiled_cpu(z.device) else z
    op = "dense_contrast_loss"
    keys, key_labels = dist.gather_rows(z, op=op), dist.gather_rows(lab, op=op)
    if be == "reference":
        terms, npos, nl = supervised_contrast(z, lab, keys, key_labels, temperature=temperature,
                                              backend=be, with_lse=True)
    else:
        terms, npos, nl = contrast(z, lab, keys, key_labels.to(torch.int64), temperature,
                                   precision=precision)
    self_term = F.softplus(nl - (z.to(acc) * z.to(acc)).sum(dim=1) / temperature)
    npos = npos - (lab >= 0).to(npos.dtype)                      # the anchor's own key
    terms = torch.where(npos > 0, (terms * (npos + 1) - self_term) / npos.clamp(min=1), 0.0)
    used = (lab >= 0) & (npos > 0)
    num = dist.all_reduce_sum(torch.where(used, terms, 0.0).sum(), op=op)
    count = dist.all_reduce_sum(used.sum(), op=op)
    return (temperature / base_temperature) * num / count.clamp(min=1)
