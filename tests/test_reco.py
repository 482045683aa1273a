"""ReCo: the reference against hand-computed cases and the official-style baseline, the fused path against
the reference (whole loss and gradients, same seed), degenerate batches, compile, bad input."""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixcon.nn import ReCoLoss
from pixcon.ops import reco_inputs_from_official, reco_loss
from pixcon.reference import common as cm
from pixcon.synthetic import reco_batch

from .conftest import assert_close, bench_module, forbid_host_syncs, triton_device

DEV = triton_device()
SMALL = dict(num_queries=8, num_negatives=24)


def _orthogonal_batch(num_classes, easy_class=None):
    """Every pixel of class c has embedding e_c (one-hot): all cosines across classes are 0."""
    B, h, w = 2, 4, 6
    labels = (torch.arange(h * w).reshape(h, w) % num_classes).expand(B, h, w).clone()
    emb = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * 3.0
    probs = torch.full((B, num_classes, h, w), 0.5)
    if easy_class is not None:
        probs[:, easy_class] = torch.where(labels == easy_class, 1.0, 0.0)
    return emb, labels, probs


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_hand_computed_orthogonal_classes(backend):
    # each query: positive cos 1, N negatives cos 0, t = 0.5 -> log(1 + N e^-2) whatever is drawn
    emb, labels, probs = _orthogonal_batch(3)
    N = 4
    loss = reco_loss(emb.to(DEV), labels.to(DEV), probs.to(DEV), num_queries=5, num_negatives=N,
                     seed=1, backend=backend)
    assert abs(loss.item() - math.log(1 + N * math.exp(-2))) < 1e-5


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
def test_class_without_hard_pixels_counts_in_divisor(backend):
    # class 2 is present but all its pixels are easy (prob 1): it adds 0 and still counts in K=3
    emb, labels, probs = _orthogonal_batch(3, easy_class=2)
    N = 4
    loss = reco_loss(emb.to(DEV), labels.to(DEV), probs.to(DEV), num_queries=5, num_negatives=N,
                     seed=1, backend=backend)
    assert abs(loss.item() - 2 / 3 * math.log(1 + N * math.exp(-2))) < 1e-5


def test_reference_agrees_with_official_style_baseline():
    """Same inputs, benchmarks/baselines.py's official-style ReCo (written from specs/reco.md
    §1.2 with the official RNG calls: torch.randint, torch.multinomial, numpy per (query, class))
    and the reference (pixcon's counter-based sampler): Monte Carlo estimates of the same
    expectation. With Q = 256, N = 512 the spread over seeds on this batch is ~3e-3 (measured:
    5.189-5.193 vs 5.177-5.199 over three seeds); the tolerance is 0.02."""
    base = bench_module("baselines")
    emb, labels, probs = reco_batch(2, 32, 17, 17, num_classes=6, present=5, seed=3)
    official = []
    for s in range(3):
        torch.manual_seed(s)
        np.random.seed(s)
        official.append(base.reco_official_style(emb, labels, probs).item())
    ours = [reco_loss(emb, labels, probs, seed=s, backend="reference").item() for s in range(3)]
    assert abs(np.mean(official) - np.mean(ours)) < 0.02, (official, ours)


def test_official_style_baseline_hand_computed():
    """The orthogonal batch of the hand-computed tests: every negative has cosine 0 and the
    positive cosine 1, so each query's loss is log(1 + N e^{-2}) whatever the sampler drew."""
    base = bench_module("baselines")
    emb, labels, probs = _orthogonal_batch(3)
    N = 4
    loss = base.reco_official_style(emb, labels, probs, num_queries=5, num_negatives=N)
    assert abs(loss.item() - math.log(1 + N * math.exp(-2))) < 1e-5
    one = base.reco_official_style(emb, torch.zeros_like(labels), probs)
    assert one.item() == 0.0 and not one.requires_grad            # the official graph-less zero


def test_reference_gradient_only_at_queries():
    emb, labels, probs = reco_batch(2, 16, 9, 9, num_classes=5, present=4, seed=1)
    emb.requires_grad_()
    loss = reco_loss(emb, labels, probs, seed=4, backend="reference", **SMALL)
    g, = torch.autograd.grad(loss, emb)
    touched = (g.abs().sum(1) > 0).sum().item()
    assert 0 < touched <= 4 * SMALL["num_queries"]


# --- fused vs reference ----------------------------------------------------------------------
CASES = [  # B, D, h, w, C, present, label_scale, dtype, seed
    (2, 19, 9, 11, 5, 5, 1, torch.float32, 3),
    (1, 8, 7, 5, 21, 21, 2, torch.float32, 17),
    (3, 33, 6, 10, 12, 4, 3, torch.float64, 5),
    (2, 16, 8, 8, 6, 2, 1, torch.float16, 8),
    (2, 24, 5, 9, 7, 6, 2, torch.bfloat16, 2**40 + 1),
    (1, 12, 9, 9, 4, 3, 1, torch.float32, 0),
]


def _parity(B, D, h, w, C, present, scale, dtype, seed, Q=8, N=24, mask=None, gscale=2.5,
            contiguous=True):
    emb, labels, probs = reco_batch(B, D, h, w, num_classes=C, present=present,
                                    label_scale=scale, dtype=dtype, seed=seed % 1000)
    out = {}
    for be, dev in (("reference", "cpu"), ("triton", DEV)):
        e = emb.to(dev)
        if not contiguous:
            e = e.to(memory_format=torch.channels_last)
        e.requires_grad_()
        m = None if mask is None else mask.to(dev)
        loss = reco_loss(e, labels.to(dev), probs.to(dev), mask=m, num_queries=Q,
                         num_negatives=N, seed=seed, backend=be)
        g, = torch.autograd.grad(loss * gscale, e)
        out[be] = loss.detach().cpu(), g.cpu()
    return out


@pytest.mark.interpret
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[7]}-C{c[4]}-K{c[5]}".replace("torch.", ""))
def test_fused_matches_reference(case):
    out = _parity(*case)
    (l_ref, g_ref), (l, g) = out["reference"], out["triton"]
    dtype = case[7]
    # both paths compute in float32 (float64) from the same inputs and draw the same samples;
    # what differs is summation order: fp32 ~1e-6 relative on the loss
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(l, l_ref, rtol=tol, atol=tol, what="loss")
    # gradients are rounded once to emb's dtype at the end
    gtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, tol)
    assert_close(g, g_ref, rtol=gtol, atol=gtol * 1e-2, what="d emb")
    assert g.dtype == dtype and g_ref.dtype == dtype
    assert l_ref.item() > 0.5         # the case is not degenerate (a zero would pass vacuously)


@pytest.mark.interpret
def test_fused_matches_reference_fresh_seed_mask_channels_last():
    seed = int(time.time_ns() % (2**62))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 14, 18, generator=g) > 0.3
    out = _parity(2, 20, 7, 9, 6, 5, 2, torch.float32, seed, Q=6, N=10, mask=mask,
                  contiguous=False)
    (l_ref, g_ref), (l, gr) = out["reference"], out["triton"]
    assert_close(l, l_ref, rtol=1e-5, atol=1e-5, what=f"loss (seed {seed})")
    assert_close(gr, g_ref, rtol=1e-5, atol=1e-7, what=f"d emb (seed {seed})")


@pytest.mark.interpret
def test_fused_reduction_none_matches_reference():
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=4, present=4, seed=9)
    ref = reco_loss(emb, labels, probs, seed=2, backend="reference", reduction="none", **SMALL)
    got = reco_loss(emb.to(DEV), labels.to(DEV), probs.to(DEV), seed=2, backend="triton",
                    reduction="none", **SMALL)
    assert ref.shape == got.shape == (4, SMALL["num_queries"])
    assert_close(got, ref, rtol=1e-5, atol=1e-5, what="per-query")


# --- degenerate batches ------------------------------------------------------------------------
def _degenerate(kind):
    emb, labels, probs = reco_batch(2, 8, 5, 5, num_classes=4, present=3, seed=1)
    if kind == "all_ignored":
        labels[:] = 255
    elif kind == "one_class":
        labels[:] = 2
    elif kind == "no_hard":
        probs = torch.nn.functional.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    elif kind == "all_masked":
        return emb, labels, probs, torch.zeros(2, 5, 5, dtype=torch.bool)
    return emb, labels, probs, None


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("kind", ["all_ignored", "one_class", "no_hard", "all_masked"])
def test_degenerate_batch_is_connected_zero(backend, kind):
    emb, labels, probs, mask = _degenerate(kind)
    emb = emb.to(DEV).requires_grad_()
    loss = reco_loss(emb, labels.to(DEV), probs.to(DEV), mask=None if mask is None else
                     mask.to(DEV), seed=0, backend=backend, **SMALL)
    assert loss.item() == 0.0
    assert loss.requires_grad and loss.grad_fn is not None   # DDP sees emb used
    g, = torch.autograd.grad(loss, emb)
    assert g.abs().sum() == 0


# --- calling forms ---------------------------------------------------------------------------
def test_mask_equals_ignoring_pixels():
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=5, present=4, label_scale=2, seed=4)
    mask = torch.rand(2, 12, 12) > 0.4
    a = reco_loss(emb, labels, probs, mask=mask, seed=3, backend="reference", **SMALL)
    b = reco_loss(emb, torch.where(mask, labels, 255), probs, seed=3, backend="reference", **SMALL)
    assert a.item() == b.item()


def test_official_calling_form_adapter():
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=5, present=4, seed=4)
    onehot, mask = bench_module("baselines").reco_official_inputs(labels, probs)
    lab2, mask2 = reco_inputs_from_official(onehot, mask)
    a = reco_loss(emb, labels, probs, seed=3, backend="reference", **SMALL)
    b = reco_loss(emb, lab2, probs, mask=mask2, seed=3, backend="reference", **SMALL)
    assert a.item() == b.item()


def test_official_adapter_edge_cases_by_hand():
    """The adapter pixel by pixel: an all-zero one-hot pixel is ignored (ignore_index, whatever
    it is), a one-hot at class 0 is class 0 (not "no label"), the last class is kept; a mask
    (B, 1, h, w) or (B, h, w), float or bool, is True wherever it is not 0. A loss through the
    adapter equals the loss with those pixels ignored by hand."""
    label = torch.zeros(2, 3, 2, 2)
    label[0, 0, 0, 0] = 1                    # class 0
    label[0, 2, 1, 0] = 1                    # the last class
    label[0, 1, 1, 1] = 1
    label[1, 1, 0, 1] = 1                    # image 1: one labelled pixel, three all-zero
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 1.0]]], [[[0.0, 1.0], [1.0, 2.0]]]])
    for ignore, m in ((255, mask), (-1, mask[:, 0]), (7, mask != 0)):
        lab, got = reco_inputs_from_official(label, m, ignore_index=ignore)
        assert lab.dtype == torch.int64
        assert lab.tolist() == [[[0, ignore], [2, 1]], [[ignore, 1], [ignore, ignore]]]
        assert got.dtype == torch.bool
        assert got.tolist() == [[[True, False], [True, True]], [[False, True], [True, True]]]
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=5, present=4, seed=6)
    onehot = (F.one_hot(labels.clamp(max=4), 5) * (labels < 5)[..., None]).permute(0, 3, 1, 2)
    onehot = onehot.float()                  # the ignored pixels (255): all-zero already
    onehot[:, :, :2] = 0                     # the top rows of both images: no label at all
    lab, m = reco_inputs_from_official(onehot, torch.ones(2, 1, 6, 6))
    by_hand = labels.clone()
    by_hand[:, :2] = 255
    a = reco_loss(emb, lab, probs, mask=m, seed=3, backend="reference", **SMALL)
    b = reco_loss(emb, by_hand, probs, seed=3, backend="reference", **SMALL)
    assert a.item() == b.item()


def test_module_and_seed_contract():
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=5, present=4, seed=4)
    crit = ReCoLoss(backend="reference", **SMALL)
    assert "num_queries=8" in repr(crit)
    torch.manual_seed(123)
    a = crit(emb, labels, probs)
    torch.manual_seed(123)
    b = crit(emb, labels, probs)
    c = crit(emb, labels, probs)
    assert a.item() == b.item() and a.item() != c.item()
    assert crit(emb, labels, probs, seed=5).item() == reco_loss(
        emb, labels, probs, seed=5, backend="reference", **SMALL).item()


def test_reference_float64_gradcheck():
    """The loss given its samples (the statistics and keys are stop-gradient by definition, so
    finite differences of the whole loss would also move them): float64 gradcheck."""
    from pixcon.reference.reco import reco_loss_from_samples, reco_samples
    emb, labels, probs = reco_batch(1, 3, 3, 4, num_classes=3, present=3, ignore_fraction=0.0,
                                    dtype=torch.float64, seed=6)
    lab = cm.pixel_labels(labels, (3, 4), 3, 255)
    x = cm.pixel_rows(emb)
    q, n, means, K = reco_samples(x, lab, lab >= 0, 3, num_queries=3, num_negatives=4, seed=1,
                                  relation_temperature=0.5)
    assert K == 3 and (q >= 0).all()
    keys = x.clone()
    x = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: reco_loss_from_samples(x, keys, q, n, means, 0.5).sum() / (3 * K), (x,))


@pytest.mark.interpret
def test_fused_float64_backward_matches_reference():
    """The fused backward against the reference's autograd, float64 (same samples)."""
    emb, labels, probs = reco_batch(1, 5, 3, 4, num_classes=3, present=3, ignore_fraction=0.0,
                                    dtype=torch.float64, seed=6)
    grads = []
    for be, dev in (("reference", "cpu"), ("triton", DEV)):
        e = emb.to(dev).requires_grad_()
        loss = reco_loss(e, labels.to(dev), probs.to(dev), num_queries=3, num_negatives=4, seed=1,
                         strong_threshold=1.0, backend=be)
        grads.append(torch.autograd.grad(loss, e)[0].cpu())
    assert grads[0].abs().sum() > 0
    assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12, what="float64 grad")


@pytest.mark.interpret
def test_fused_saves_only_indices_and_statistics():
    """What autograd keeps for the fused loss: emb itself (the input, no copy), the query
    indices and one D-vector and one scale per query (the gradient direction the forward
    accumulated); no queries x negatives tensor (the negatives are regenerated in-kernel). The
    official code keeps a Q x (1+N) x D tensor per class."""
    B, D, h, w, C, Q, N = 2, 16, 8, 8, 5, 8, 24
    emb, labels, probs = reco_batch(B, D, h, w, num_classes=C, present=5, seed=2)
    emb = emb.to(DEV).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reco_loss(emb, labels.to(DEV), probs.to(DEV), num_queries=Q, num_negatives=N, seed=0,
                  backend="triton")
    extra = sum(t.numel() * t.element_size() for t in saved
                if t.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr())
    bound = C * Q * (D + 2) * 4 + 64          # u (M, D), scale (M,), queries (M,) int32
    assert bound < C * Q * N * 4               # an M x N index tensor alone would not fit
    assert 0 < extra <= bound, (extra, bound)
    assert not any(N in t.shape for t in saved), [tuple(t.shape) for t in saved]
    assert all(t.dtype in (torch.int32, torch.float32) for t in saved if t is not emb)


@pytest.mark.interpret
def test_one_pass_ops_opcheck_and_sampler_parity(triton_kernels):
    """The one-pass ops (pixcon::rows_and_class_sums, pixcon::reco_infonce): schemas, fake
    kernels and autograd (opcheck), the rows equal emb's pixels, and the per-query losses equal
    the general sparse InfoNCE on the sampler's explicit (M, N) negatives: the negatives
    regenerated in-kernel are the sampler's, index for index."""
    from pixcon.ops import _library as lib
    from pixcon.ops import primitives as prim
    from pixcon.reference.rng import STREAM_NEGATIVE
    emb, labels, probs = reco_batch(2, 12, 5, 7, num_classes=5, present=4, dtype=torch.float64,
                                    seed=11)
    emb = emb.to(DEV)
    C, Q, N, seed = 5, 4, 9, 2**40 + 3
    lab = cm.pixel_labels(labels.to(DEV), (5, 7), C, 255, None)
    rows, sums, counts = lib.rows_and_class_sums(emb, lab, C)
    assert torch.equal(rows, cm.pixel_rows(emb))
    means = cm.class_means_from_sums(sums, counts)
    cdf = cm.relation_cdf(means, counts > 0, 0.5)
    queries = prim.sample_hard_queries(lab, lab >= 0, C, Q, seed, backend="reference").reshape(-1)
    order, offsets, cnt = cm.group_by_class(lab, C)
    args = (emb.requires_grad_(), rows, means, queries, Q, cdf, order, offsets, cnt, N, seed,
            STREAM_NEGATIVE, 0.5)
    torch.library.opcheck(lib.reco_infonce, args)
    torch.library.opcheck(lib.rows_and_class_sums, (emb.detach(), lab, C))
    loss = lib.reco_infonce(*args)[0]
    row_class = torch.where(queries >= 0, torch.arange(C * Q, device=DEV) // Q, -1)
    neg = prim.sample_negatives(row_class, cdf, lab, N, seed, backend="reference")
    assert (neg >= 0).sum() > 2 * N                 # real negatives to regenerate
    ref = prim.sparse_infonce(emb, queries, row_class.clamp(min=0), neg, temperature=0.5,
                              pos_pool=means, backend="reference")
    assert_close(loss, ref, rtol=1e-12, atol=1e-12, what="per-query loss")
    assert (loss > 0).sum() >= 2
    g_ref, = torch.autograd.grad((ref * torch.arange(C * Q, device=DEV)).sum(), emb)
    g, = torch.autograd.grad((loss * torch.arange(C * Q, device=DEV)).sum(), emb)
    assert_close(g, g_ref, rtol=1e-10, atol=1e-12, what="d emb")


@pytest.mark.interpret
@pytest.mark.parametrize("resolution", ["feature", "image"])
def test_fused_path_makes_no_host_sync(monkeypatch, resolution):
    """No value read back and no tensor built from host data inside the fused path, forward and
    backward; labels at feature resolution, and at an image resolution that is not a multiple
    of it (the nearest-index mapping) with a mask."""
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=4, present=4, seed=1)
    mask = None
    if resolution == "image":
        labels = torch.nn.functional.interpolate(labels[:, None].float(), size=(13, 15),
                                                 mode="nearest")[:, 0].long()
        mask = torch.rand(2, 13, 15, generator=torch.Generator().manual_seed(0)) > 0.2
        mask = mask.to(DEV)
    emb = emb.to(DEV).requires_grad_()
    args = (emb, labels.to(DEV), probs.to(DEV))

    from pixcon.ops import reco as reco_mod
    real = reco_mod._reco_fused
    forbid_host_syncs(monkeypatch)
    loss = real(*args, mask, ignore_index=255, strong_threshold=0.97, temperature=0.5,
                num_queries=4, num_negatives=8, seed=1, relation_temperature=None,
                reduction="mean")
    loss.backward()
    monkeypatch.undo()
    ref = reco_loss(emb.detach(), labels.to(DEV), probs.to(DEV), mask=mask, num_queries=4,
                    num_negatives=8, seed=1, backend="reference")
    assert_close(loss, ref, rtol=1e-5, atol=1e-6, what="loss without host syncs")
    assert emb.grad.abs().sum().item() > 0


@pytest.mark.interpret
def test_torch_compile_matches_eager():
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=4, present=4, seed=1)
    emb, labels, probs = emb.to(DEV), labels.to(DEV), probs.to(DEV)

    def step(e):
        return reco_loss(e, labels, probs, seed=7, backend="triton", check_values=False, **SMALL)

    # on CPU the Triton kernels run in the interpreter, which Inductor cannot codegen: trace with
    # aot_eager (same graph capture, fake tensors, no graph break allowed); inductor on GPU
    backend = "inductor" if DEV.type == "cuda" else "aot_eager"
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    l1, l2 = step(e1), compiled(e2)
    g1, = torch.autograd.grad(l1, e1)
    g2, = torch.autograd.grad(l2, e2)
    assert_close(l2, l1, rtol=1e-6, atol=1e-6, what="compiled loss")
    assert_close(g2, g1, rtol=1e-6, atol=1e-8, what="compiled grad")


# --- backends and bad input ------------------------------------------------------------------
def test_backend_selection_errors(monkeypatch):
    emb, labels, probs = reco_batch(1, 4, 4, 4, num_classes=3, present=3, seed=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        reco_loss(emb, labels, probs, backend="fast")
    from pixcon.ops import _common
    with pytest.raises(NotImplementedError, match="backend 'native' is not implemented"):
        _common.resolve_backend("native", emb.device, "pixel_anchor_loss")  # no compiled kernels
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors"):
        reco_loss(emb, labels, probs, backend="triton")
    monkeypatch.setenv("PIXCON_BACKEND", "nope")
    with pytest.raises(ValueError, match="PIXCON_BACKEND"):
        reco_loss(emb, labels, probs)
    monkeypatch.setenv("PIXCON_BACKEND", "reference")
    assert reco_loss(emb, labels, probs, seed=1).item() == reco_loss(
        emb, labels, probs, seed=1, backend="reference").item()


def _good():
    return reco_batch(2, 4, 5, 5, num_classes=3, present=3, seed=1)


BAD = [
    ("emb rank", lambda e, l, p: (e[0], l, p, {}), ValueError, "emb must have 4 dimensions"),
    ("emb dtype", lambda e, l, p: (e.long(), l, p, {}), TypeError, "emb must have dtype"),
    ("labels rank", lambda e, l, p: (e, l[:, None], p, {}), ValueError, "labels must have 3"),
    ("labels dtype", lambda e, l, p: (e, l.float(), p, {}), TypeError, "labels must have dtype"),
    ("batch", lambda e, l, p: (e, l[:1], p, {}), ValueError, "labels has batch size 1"),
    ("labels small", lambda e, l, p: (e, l[:, :3], p, {}), ValueError, "smaller than emb"),
    ("probs spatial", lambda e, l, p: (e, l, p[..., :4], {}), ValueError, "probs must have shape"),
    ("probs batch", lambda e, l, p: (e, l, p[:1], {}), ValueError, "probs must have shape"),
    ("label range", lambda e, l, p: (e, torch.where(torch.arange(l.numel()).view_as(l) == 3, 7, l),
                                     p, {}),
     ValueError, r"labels must be in \[0, 3\) or ignore_index=255; found 7"),
    ("probs range", lambda e, l, p: (e, l, p * 2, {}), ValueError, "probs must be probabilities"),
    ("nan emb", lambda e, l, p: (e.index_fill(0, torch.tensor([1]), float("nan")), l, p, {}),
     ValueError, "emb contains NaN"),
    ("dtype probs", lambda e, l, p: (e, l, p.long(), {}), TypeError, "probs must have dtype"),
    ("mask shape", lambda e, l, p: (e, l, p, {"mask": torch.ones(2, 2, 5, 5)}), ValueError,
     "mask must have shape"),
    ("queries", lambda e, l, p: (e, l, p, {"num_queries": 0}), ValueError,
     "num_queries must be a positive int"),
    ("negatives", lambda e, l, p: (e, l, p, {"num_negatives": 2.5}), ValueError,
     "num_negatives must be a positive int"),
    ("temperature", lambda e, l, p: (e, l, p, {"temperature": 0}), ValueError,
     "temperature must be a positive number"),
    ("threshold", lambda e, l, p: (e, l, p, {"strong_threshold": -1}), ValueError,
     "strong_threshold must be a positive number"),
    ("threshold > 1", lambda e, l, p: (e, l, p, {"strong_threshold": 1.5}), ValueError,
     r"strong_threshold must be in \(0, 1\]"),
    ("seed range", lambda e, l, p: (e, l, p, {"seed": -3}), ValueError,
     r"seed must be in \[0, 2\^63\)"),
    ("reduction", lambda e, l, p: (e, l, p, {"reduction": "sum"}), ValueError,
     "reduction must be 'mean' or 'none'"),
    ("ignore_index", lambda e, l, p: (e, l, p, {"ignore_index": 2.0}), TypeError,
     "ignore_index must be an int"),
    ("seed", lambda e, l, p: (e, l, p, {"seed": "x"}), TypeError, "seed must be an int"),
    ("counter space", lambda e, l, p: (e, l, p, {"num_queries": 2**16, "num_negatives": 2**14}),
     ValueError, "below 2\\^31"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_messages(name, make, exc, msg):
    e, l, p, kw = make(*_good())
    with pytest.raises(exc, match=msg):
        reco_loss(e, l, p, backend="reference", **kw)


def test_device_mismatch_message():
    e, l, p = _good()
    meta = torch.empty(2, 3, 5, 5, device="meta")
    with pytest.raises(ValueError, match="probs is on meta but emb is on cpu"):
        reco_loss(e, l, meta)


def test_mask_must_be_binary():
    """A confidence map passed as the mask would count every non-zero pixel as valid: it
    raises, naming the threshold idiom; 0/1 numbers and bool are the same mask."""
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=5, present=4, seed=4)
    conf = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"reco_loss: mask must be bool .*conf >= 0.7"):
        reco_loss(emb, labels, probs, mask=conf, seed=3, **SMALL)
    m = conf >= 0.5
    a = reco_loss(emb, labels, probs, mask=m, seed=3, backend="reference", **SMALL)
    b = reco_loss(emb, labels, probs, mask=m.float(), seed=3, backend="reference", **SMALL)
    assert a.item() == b.item()


NATIVE_OR_REF = ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not __import__("pixcon").HAS_C, reason="pixcon._C not built"))]


@pytest.mark.parametrize("backend", NATIVE_OR_REF)
def test_class_counts_at_their_edges(backend):
    """ReCo's class rules where a count is at its edge, by hand on one 2 x 3 image (D = 2):
    - exactly two present classes give a loss (K >= 2 is the rule; one class gives 0);
    - a class without hard pixels (class 0 here, all confident) is skipped, and the classes
      after it still draw queries (it is not the last one);
    - a class whose only hard pixel is pixel 0 draws pixel 0 for every query;
    - num_queries = 1 works.
    The per-query losses are checked against the formula with its negatives all of the other
    class (two classes: the relation softmax has one choice)."""
    emb = torch.tensor([[[[1.0, 0.6, 0.0], [0.8, 0.0, 0.3]],
                         [[0.0, 0.8, 1.0], [0.6, 1.0, 0.9]]]], dtype=torch.float64)
    labels = torch.tensor([[[1, 0, 0], [0, 1, 1]]])
    probs = torch.zeros(1, 2, 2, 3, dtype=torch.float64)
    probs[0, 0] = torch.tensor([[0.5, 0.99, 0.99], [0.99, 0.5, 0.5]])   # class 0: confident
    probs[0, 1] = 1 - probs[0, 0]
    probs[0, 1, 0, 0] = 0.2                  # class 1's hard pixels: 0 only (4, 5 confident)
    probs[0, 0, 0, 0] = 0.8
    probs[0, 1, 1, 1:] = 0.99
    probs[0, 0, 1, 1:] = 0.01
    for Q in (1, 3):
        per = reco_loss(emb, labels, probs, num_queries=Q, num_negatives=4, seed=2,
                        temperature=0.5, reduction="none", backend=backend)
        assert per.shape == (2, Q) and per[0].tolist() == [0.0] * Q      # class 0: no query
        x = F.normalize(emb[0].reshape(2, -1).T, dim=1)
        m1 = F.normalize(emb[0].reshape(2, -1).T[[0, 4, 5]].mean(0), dim=0)
        q = x[0]                                                        # pixel 0, every query
        neg = (x[[1, 2, 3]] @ q) / 0.5
        assert per[1].tolist() != [0.0] * Q
        for k in range(Q):                  # 4 negatives among pixels 1, 2, 3 (class 0)
            assert per[1, k] > 0
        mean = reco_loss(emb, labels, probs, num_queries=Q, num_negatives=4, seed=2,
                         temperature=0.5, backend=backend)
        assert_close(mean, per.sum() / (Q * 2), rtol=1e-12, atol=0, what="1 / (Q |K|)")
        lo = torch.logsumexp(torch.cat([(q @ m1)[None] / 0.5, neg.min().repeat(4)]), 0) \
            - (q @ m1) / 0.5
        hi = torch.logsumexp(torch.cat([(q @ m1)[None] / 0.5, neg.max().repeat(4)]), 0) \
            - (q @ m1) / 0.5
        assert ((per[1] >= lo - 1e-12) & (per[1] <= hi + 1e-12)).all()
    one = torch.zeros_like(labels)                                      # one class: 0
    assert reco_loss(emb, one, probs, backend=backend, **SMALL).item() == 0.0


def test_reco_samples_without_two_classes_draw_nothing():
    """reco_samples with fewer than two present classes: every query and negative is -1."""
    from pixcon.reference.reco import reco_samples
    x = torch.randn(6, 3)
    lab = torch.tensor([2, 2, -1, 2, 2, 2])
    q, n, means, K = reco_samples(x, lab, lab >= 0, 4, num_queries=3, num_negatives=5, seed=0,
                                  relation_temperature=0.5)
    assert K == 1 and q.tolist() == [[-1] * 3] * 4 and n.shape == (4, 3, 5)
    assert (n == -1).all()


def test_relation_table_is_computed_in_float64_by_hand():
    """relation_cdf's thresholds are floor(cumsum(p) 2^32) of the float64 softmax over the other
    present classes (float32 means included), the last allowed class's at 2^32, a row without
    any other present class all zero. Three classes of 2-D means at temperature 0.5, class 3
    absent, by hand with Python floats."""
    means = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.28, 0.96], [0.0, 1.0]])
    present = torch.tensor([True, True, True, False])
    got = cm.relation_cdf(means, present, 0.5)
    m = [[a / math.hypot(a, b), b / math.hypot(a, b)] for a, b in means.double().tolist()]
    want = []
    for c in range(4):
        others = [j for j in range(3) if j != c] if c < 3 else []
        e = {j: math.exp((m[c][0] * m[j][0] + m[c][1] * m[j][1]) / 0.5) for j in others}
        z = sum(e.values())
        row, acc = [], 0.0
        for j in range(4):
            acc += e.get(j, 0.0) / z if others else 0.0
            row.append(math.floor(acc * 2**32))
        if others:
            last = max(others)
            row = [2**32 if j >= last else min(v, 2**32 - 1) for j, v in enumerate(row)]
        want.append(row)
    assert got.tolist() == want
