"""ContrastiveSeg: spec fidelity (hand-computed cases, sampler rules), the vectorised sampler
against the reference's per-class loop, fused (CPU tiles, Triton) vs reference as whole losses
and gradients with and without a bank, the dense mode, the memory bank, degenerate and bad
input.

Tolerances: float64 paths agree to 1e-10 (same formula, other summation order); float32 CPU
tiles vs the float32 reference 1e-5 relative (one LSE merge per 2048-key tile); the Triton
kernels under the interpreter compute fp32 dots exactly (numpy), so 1e-5 too. Half precision:
the fused loss vs the float64 reference within 2x the reference's own half-precision error plus
1e-3 (inputs rounded once to fp16; every backend accumulates in fp32).
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import pixcon
from pixcon.nn import PixelMemoryBank
from pixcon.ops import dense_contrast_loss, pixel_contrast_loss, supervised_contrast
from pixcon.ops import _library as lib
from pixcon.ops.contrastiveseg import sample_anchors
from pixcon.reference import contrastiveseg as ref

from .conftest import assert_close, forbid_host_syncs, triton_device

DEV = triton_device()
TRITON = pytest.param("triton", marks=pytest.mark.interpret)
FUSED = ["native", TRITON]


def batch(B=2, D=16, h=9, w=11, C=4, seed=0, dtype=torch.float32, stride=1, ignore=255,
          correct=0.6):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(B, D, h, w, generator=g, dtype=torch.float64), dim=1).to(dtype)
    labels = torch.randint(0, C, (B, h * stride, w * stride), generator=g)
    labels[0, : stride * 2] = ignore
    gt = labels[:, ::stride, ::stride]
    pred = torch.where(torch.rand(B, h, w, generator=g) < correct, gt,
                       torch.randint(0, C, (B, h, w), generator=g))
    pred = torch.where(gt == ignore, 0, pred)
    return emb, labels, pred


def run(loss_fn, emb, *args, backend, **kw):
    dev = DEV if backend == "triton" else torch.device("cpu")
    e = emb.to(dev).requires_grad_()
    loss = loss_fn(e, *[a.to(dev) for a in args], backend=backend, **kw)
    grad, = torch.autograd.grad(loss, e)
    return loss.detach().cpu(), grad.cpu()


# --- fidelity: the spec's hand-computed fixture and the formula's properties -----------------
FIXTURE_A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.6, 0.8]], dtype=torch.float64)
FIXTURE_Y = torch.tensor([0, 1, 0, 1])          # view-major: (c0 v0, c1 v0, c0 v1, c1 v1)


@pytest.mark.parametrize("backend", ["reference", "native", TRITON])
@pytest.mark.parametrize("t,tb,expected,terms", [
    (1.0, 1.0, 0.6735768, (0.5282, 0.8189, 0.8189, 0.5282)),
    (0.1, 0.07, 0.0911140, None)])
def test_spec_fixture_a(backend, t, tb, expected, terms):
    """specs/contrastiveseg.md §10 fixture A: the official loss value, and by hand the
    per-anchor terms -1/|P| sum log(e^{s_p} / (e^{s_p} + sum_n e^{s_n}))."""
    z = FIXTURE_A.to(DEV if backend == "triton" else "cpu")
    got, npos = supervised_contrast(z, FIXTURE_Y.to(z.device), temperature=t, backend=backend)
    loss = ref.mean_over_anchors(got, npos, FIXTURE_Y.to(z.device), t / tb)
    assert abs(loss.item() - expected) < 1e-6
    assert npos.tolist() == [1, 1, 1, 1]
    if terms is not None:
        assert_close(got, torch.tensor(terms), rtol=0, atol=1e-4, what="per-anchor terms")


def test_per_positive_denominator_is_not_supcon():
    """Three anchors of one class and one negative: each positive is normalised against itself
    plus the negatives only (SupCon would also put the other positive in the denominator)."""
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    terms, _ = ref.contrast_terms(z, y, temperature=1.0)
    s = z @ z.T
    r, pos, neg = 0, [1, 2], [3]
    want = sum(-(s[r, p] - torch.log(torch.exp(s[r, p]) + torch.exp(s[r, neg]).sum()))
               for p in pos) / 2
    assert abs(terms[0].item() - want.item()) < 1e-12
    supcon = -sum(s[r, p] - torch.logsumexp(s[r, [1, 2, 3]], 0) for p in pos) / 2
    assert abs(terms[0].item() - supcon.item()) > 1e-3


def test_temperature_factor_and_shift_invariance():
    """Loss = (t / t_b) x mean: doubling t_b halves it; the row-max stabiliser cancels (scaling
    the embeddings' norm changes the loss, the stabiliser does not)."""
    emb, labels, pred = batch(seed=3)
    kw = dict(max_samples=60, max_views=5, seed=1, backend="reference")
    a = pixel_contrast_loss(emb, labels, pred, base_temperature=0.07, **kw)
    b = pixel_contrast_loss(emb, labels, pred, base_temperature=0.14, **kw)
    assert abs(a.item() - 2 * b.item()) < 1e-6 * a.item()
    z = F.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1)
    y = torch.arange(12) % 3
    t1, _ = ref.contrast_terms(z, y, temperature=0.5)
    s = z @ z.T / 0.5                                   # the formula with no stabiliser at all
    same = (y[:, None] == y[None]) & ~torch.eye(12, dtype=torch.bool)
    negm = (torch.exp(s) * (y[:, None] != y[None])).sum(1, keepdim=True)
    want = -(torch.where(same, s - torch.log(torch.exp(s) + negm), 0.0).sum(1) / same.sum(1))
    assert_close(t1, want, rtol=1e-12, atol=1e-12, what="unstabilised")


# --- the sampler's rules ---------------------------------------------------------------------
def anchors_of(gt, pred, **kw):
    idx, lab, T, nv = ref.sample_anchors(gt, pred, **kw)
    return idx, lab, T, nv


def test_sampler_class_filter_is_strict_and_skips_ignore():
    """A class is kept when its count exceeds max_views (strictly); ignored pixels never."""
    gt = torch.full((1, 4, 5), -1)
    gt[0, 0, :5] = 1          # 5 pixels: kept only if max_views < 5
    gt[0, 1, :4] = 2          # 4 pixels
    pred = gt.clamp(min=0)
    _, lab, T, _ = anchors_of(gt, pred, max_samples=100, max_views=4, seed=0)
    assert T == 1 and set(lab.tolist()) == {1}
    _, lab, T, _ = anchors_of(gt, pred, max_samples=100, max_views=3, seed=0)
    assert T == 2 and set(lab.tolist()) == {1, 2}
    _, _, T, _ = anchors_of(gt, pred, max_samples=100, max_views=5, seed=0)
    assert T == 0


@pytest.mark.parametrize("n_hard,n_easy,n_view,want_h", [
    (0, 12, 6, 0),       # no hard pixel: all easy
    (12, 0, 6, 6),       # no easy pixel: all hard
    (5, 7, 6, 3),        # both >= n_view / 2: floor(n_view / 2) hard
    (5, 7, 7, 3),        # odd n_view: 3 hard, 4 easy
    (2, 10, 6, 2),       # few hard: all of them, rest easy
    (10, 2, 6, 4),       # few easy: all of them, rest hard
    (4, 4, 1, 0),        # n_view = 1: the easy pixel (official max_views=1)
])
def test_sampler_split_rule(n_hard, n_easy, n_view, want_h):
    n = n_hard + n_easy
    gt = torch.full((1, 1, n), 3)
    pred = torch.full((1, 1, n), 3)
    pred[0, 0, :n_hard] = 0                               # mis-predicted: hard
    idx, lab, T, nv = anchors_of(gt, pred, max_samples=n_view, max_views=n_view, seed=5)
    assert (T, nv) == (1, n_view)
    hard = (idx < n_hard).sum().item()
    assert hard == want_h
    assert len(set(idx.tolist())) == n_view                # without replacement
    assert idx[:want_h].lt(n_hard).all() and idx[want_h:].ge(n_hard).all()   # hard first


def test_sampler_n_view_and_view_major_order():
    """n_view = min(max_samples // T, max_views); row v*T + t is view v of pair t, pairs in
    image-major, class-ascending order."""
    gt = torch.zeros(2, 6, 6, dtype=torch.int64)
    gt[0, 3:] = 4
    gt[1] = 2
    pred = gt.clone()
    idx, lab, T, nv = anchors_of(gt, pred, max_samples=10, max_views=17, seed=0)
    assert (T, nv) == (3, 3)                               # 10 // 3 = 3 < 17
    assert lab.tolist() == [0, 4, 2] * 3
    pix_img = idx // 36
    assert pix_img.tolist() == [0, 0, 1] * 3


def _sampler_kernels():
    """The op's kernels on CPU tensors: the compiled one (where built) and the torch form (the
    CUDA kernel, run on CPU tensors inside the Triton scope)."""
    out = [("torch", lambda *a, **k: lib.kernels("triton", torch.device("cpu")))]
    if pixcon.HAS_C:
        out.append(("compiled", lambda *a, **k: contextlib.nullcontext()))
    return out


@pytest.mark.parametrize("kernel", _sampler_kernels(), ids=lambda k: k[0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 6, 7])
def test_vectorised_sampler_equals_reference(seed, kernel):
    """Both kernels of the fused path's sampler draw exactly the reference's anchors (fresh
    seeds, odd shapes, ignore labels, several images; seed 6: labels past 2^16 and 2^31 (not
    classes); seed 7: more kept pairs than max_samples, so n_view = 0 and no anchor, where the
    reference raises and the op leaves the check to the loss)."""
    g = torch.Generator().manual_seed(100 + seed)
    B, h, w, C = 1 + seed % 3, 7 + seed, 5 + 2 * seed, 2 + seed
    gt = torch.randint(-1, C, (B, h, w), generator=g)
    if seed == 6:
        gt = torch.where(gt > 2, gt * 40000 + 3, gt)                     # sparse large labels
        gt[0, 0, :3] = 2 ** 31 + 5
    pred = torch.where(torch.rand(B, h, w, generator=g) < 0.5, gt,
                       torch.randint(0, C, (B, h, w), generator=g))
    kw = dict(max_samples=20 + 3 * seed, max_views=2 + seed % 4, seed=seed)
    if seed == 7:
        kw.update(max_samples=3, max_views=1)
        with kernel[1]():
            idx, lab, T, nv = sample_anchors(gt, pred, **kw)
        assert int(T) > 3 and int(nv) == 0
        assert bool((idx == -1).all()) and bool((lab == -1).all())
        return
    i1, l1, T1, n1 = ref.sample_anchors(gt, pred, **kw)
    with kernel[1]():
        i2, l2, T2, n2 = sample_anchors(gt, pred, **kw)
    n = len(i1)
    assert (T1, n1) == (int(T2), int(n2)) and n > 0
    assert torch.equal(i1, i2[:n]) and torch.equal(l1, l2[:n])
    assert bool((i2[n:] == -1).all()) and bool((l2[n:] == -1).all())


def test_sampler_is_uniform_without_replacement():
    """Over 400 seeds, each of a class's 12 hard pixels is chosen equally often (chi-square,
    11 dof, p > 0.001 both sides: not too uneven and not too even) and never twice in a draw."""
    gt = torch.full((1, 3, 8), 1)
    pred = gt.clone()
    pred[0, 0, :12 % 8] = 0
    pred[0, 1, :4] = 0                                      # 8 + 4 = 12 hard pixels
    hard = torch.nonzero((pred.reshape(-1) != 1))[:, 0]
    counts = torch.zeros(24)
    for s in range(400):
        idx, _, _, _ = anchors_of(gt, pred, max_samples=6, max_views=6, seed=s)
        assert len(set(idx.tolist())) == 6
        counts += torch.bincount(idx, minlength=24)
    c = counts[hard]
    assert c.sum() == 400 * 3                               # 3 hard + 3 easy per draw
    expected = c.sum() / len(c)
    chi2 = float(((c - expected) ** 2 / expected).sum())
    assert 1.83 < chi2 < 31.3, chi2                         # chi2(11) 0.001 / 0.999 quantiles


def test_sampler_makes_no_host_sync(monkeypatch):
    emb, labels, pred = batch(seed=2)
    gt = torch.where(labels == 255, -1, labels)
    forbid_host_syncs(monkeypatch)
    idx, lab, T, nv = sample_anchors(gt, pred, max_samples=50, max_views=4, seed=3)
    monkeypatch.undo()
    assert int(T) > 0 and int((idx >= 0).sum()) == int(T) * int(nv)


# --- fused vs reference ----------------------------------------------------------------------
CASES = [  # B, D, h, w, C, max_samples, max_views, stride
    (2, 16, 9, 11, 4, 60, 5, 1),
    (3, 24, 7, 13, 6, 101, 3, 2),
    (1, 40, 12, 10, 3, 30, 30, 1),       # n_view from max_samples: 30 // 3 = 10 < 30
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_matches_reference(backend, case, dtype):
    B, D, h, w, C, M, V, s = case
    emb, labels, pred = batch(B, D, h, w, C, seed=sum(case), dtype=dtype, stride=s)
    kw = dict(max_samples=M, max_views=V, seed=7)
    want, gwant = run(pixel_contrast_loss, emb, labels, pred, backend="reference", **kw)
    got, ggot = run(pixel_contrast_loss, emb, labels, pred, backend=backend, **kw)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(got, want, rtol=tol, atol=tol, what="loss")
    assert_close(ggot, gwant, rtol=tol, atol=tol * 10, what="grad")


@pytest.mark.parametrize("backend", FUSED)
def test_fused_matches_reference_with_bank(backend):
    emb, labels, pred = batch(2, 16, 8, 10, 5, seed=11)
    bank = PixelMemoryBank(5, dim=16, memory_size=30, pixel_update_freq=4)
    bank.update(emb, labels, seed=1)
    kw = dict(max_samples=40, max_views=1, seed=3, memory=bank)
    want, gwant = run(pixel_contrast_loss, emb, labels, pred, backend="reference", **kw)
    got, ggot = run(pixel_contrast_loss, emb, labels, pred, backend=backend, **kw)
    assert_close(got, want, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(ggot, gwant, rtol=1e-5, atol=1e-6, what="grad")
    keys, _ = bank.keys()
    assert not keys.requires_grad


@pytest.mark.parametrize("backend", ["native", TRITON])
def test_half_precision_close_to_float64(backend):
    emb, labels, pred = batch(2, 16, 9, 11, 4, seed=5)
    kw = dict(max_samples=60, max_views=5, seed=2)
    exact, _ = run(pixel_contrast_loss, emb.double(), labels, pred, backend="reference", **kw)
    ref16, _ = run(pixel_contrast_loss, emb.half(), labels, pred, backend="reference", **kw)
    got, grad = run(pixel_contrast_loss, emb.half(), labels, pred, backend=backend, **kw)
    assert grad.dtype == torch.float16 and bool(torch.isfinite(grad).all())
    assert abs(got.item() - exact.item()) <= 2 * abs(ref16.item() - exact.item()) + 1e-3


@pytest.mark.parametrize("backend", ["reference", "native", TRITON])
def test_dense_matches_reference_and_tiles(backend):
    """Every valid pixel an anchor; CPU tiles small enough that tile pairs are skipped and merged."""
    emb, labels, _ = batch(2, 8, 10, 9, 5, seed=4, dtype=torch.float64)
    want = ref.dense_contrast_loss(emb, labels)
    got, grad = run(dense_contrast_loss, emb, labels, backend=backend)
    assert_close(got, want, rtol=1e-10, atol=1e-12, what="dense loss")
    e = emb.clone().requires_grad_()
    gwant, = torch.autograd.grad(ref.dense_contrast_loss(e, labels), e)
    assert_close(grad, gwant, rtol=1e-9, atol=1e-12, what="dense grad")


def test_cpu_tiles_any_block_size():
    z = F.normalize(torch.randn(70, 8, dtype=torch.float64), dim=1).requires_grad_()
    y = torch.randint(-1, 4, (70,))
    k = F.normalize(torch.randn(90, 8, dtype=torch.float64), dim=1).requires_grad_()
    yk = torch.randint(-1, 6, (90,))
    for keys, key_labels in ((None, None), (k, yk)):
        args = [z] if keys is None else [z, keys]
        t0, n0 = supervised_contrast(z, y, keys, key_labels, temperature=0.2, backend="reference")
        g0 = torch.autograd.grad(t0.sum(), args)
        for block in ((7, 5), (16, 64), (512, 2048)):
            t1, n1 = supervised_contrast(z, y, keys, key_labels, temperature=0.2,
                                         backend="native", block=block)
            g1 = torch.autograd.grad(t1.sum(), args)
            assert torch.equal(n0, n1)
            assert_close(t1, t0, rtol=1e-12, atol=1e-12, what=f"terms {block}")
            for a, b in zip(g1, g0):
                assert_close(a, b, rtol=1e-10, atol=1e-12, what=f"grad {block}")


def test_reference_gradcheck_float64():
    z = F.normalize(torch.randn(9, 3, dtype=torch.float64), dim=1).requires_grad_()
    k = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y, yk = torch.tensor([0, 1, 2, 0, 1, 2, 0, -1, 1]), torch.tensor([0, 1, 1, 2, 0, -1, 2])
    assert torch.autograd.gradcheck(
        lambda a: ref.contrast_terms(a, y, temperature=0.3)[0], (z,))
    assert torch.autograd.gradcheck(
        lambda a, b: ref.contrast_terms(a, y, b, yk, temperature=0.3)[0], (z, k))
    assert torch.autograd.gradcheck(
        lambda a, b: supervised_contrast(a, y, b, yk, temperature=0.3, backend="native",
                                         block=(4, 3))[0], (z, k))


@pytest.mark.interpret
def test_triton_op_opcheck():
    from pixcon.ops import _library
    a = F.normalize(torch.randn(20, 8), dim=1).to(DEV)
    y = torch.randint(-1, 3, (20,), device=DEV)
    k = F.normalize(torch.randn(30, 8), dim=1).to(DEV)
    yk = torch.randint(0, 3, (30,), device=DEV)
    with _library.triton_on_cpu() if DEV.type == "cpu" else contextlib.nullcontext():
        torch.library.opcheck(_library.tiled_contrast_op,
                              (a.requires_grad_(), y, k, yk, 0.1, True, []))
        torch.library.opcheck(_library.tiled_contrast_op, (a, y, None, None, 0.1, True, []))
        torch.library.opcheck(_library.tiled_contrast_op, (a, y, k, yk, 0.1, False, []))


@pytest.mark.interpret
def test_fused_path_makes_no_host_sync(monkeypatch):
    emb, labels, pred = batch(seed=6)
    e = emb.to(DEV).requires_grad_()
    args = labels.to(DEV), pred.to(DEV)
    forbid_host_syncs(monkeypatch)
    loss = pixel_contrast_loss(e, *args, max_samples=40, max_views=4, seed=1, backend="triton",
                               check_values=False)
    loss.backward()
    monkeypatch.undo()
    ref = pixel_contrast_loss(emb, labels, pred, max_samples=40, max_views=4, seed=1,
                              backend="reference")
    assert_close(loss, ref, rtol=1e-5, atol=1e-6, what="loss without host syncs")
    assert e.grad.abs().sum().item() > 0


def test_cpu_saves_no_anchor_by_key_matrix():
    """Dense mode on CPU tiles: what autograd keeps is O(N D + N), not N x N."""
    emb, labels, _ = batch(2, 8, 24, 24, 5, seed=1)
    e = emb.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dense_contrast_loss(e, labels, backend="native")
    N, D = 2 * 24 * 24, 8
    total = sum(t.numel() * t.element_size() for t in saved)
    # rows (N D floats, a few times) and per anchor: label, |P|, NL, W (int64, int64, 2 floats)
    assert total <= 4 * (3 * N * D + 10 * N), total         # N^2 floats would be 4.2 MB


# --- degenerate batches and errors -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "native", TRITON])
@pytest.mark.parametrize("kind", ["all_ignored", "no_kept_class", "one_class"])
def test_degenerate_batch_is_connected_zero(backend, kind):
    emb, labels, pred = batch(2, 8, 6, 7, 3, seed=1)
    if kind == "all_ignored":
        labels = torch.full_like(labels, 255)
    elif kind == "one_class":
        labels = torch.full_like(labels, 2)
    kw = dict(max_samples=20, max_views=200 if kind == "no_kept_class" else 3, seed=0)
    dev = DEV if backend == "triton" else torch.device("cpu")
    e = emb.to(dev).requires_grad_()
    for fn, extra in ((pixel_contrast_loss, (pred.to(dev),)), (dense_contrast_loss, ())):
        if fn is dense_contrast_loss and kind == "no_kept_class":
            continue
        loss = fn(e, labels.to(dev), *extra, backend=backend,
                  **(kw if fn is pixel_contrast_loss else {}))
        assert loss.item() == 0.0 and loss.requires_grad
        g, = torch.autograd.grad(loss, e)
        assert g.abs().max().item() < 1e-6      # reference, one class: 1 - e/e in fp32


def test_no_positive_anchor_left_out_not_nan():
    """n_view = 1 and a class in one image only: that anchor has no positive (official NaN);
    it is left out of the mean, so the loss is finite."""
    gt = torch.zeros(2, 4, 4, dtype=torch.int64)
    gt[0, :2] = 1
    emb = F.normalize(torch.randn(2, 4, 4, 4), dim=1)
    for be in ("reference", "native"):
        loss = pixel_contrast_loss(emb, gt, gt, max_samples=3, max_views=1, seed=0, backend=be)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["reference", "native", TRITON])
def test_no_positive_anchor_left_out_by_hand(backend):
    """Dense mode, pixels z = (1,0), (1,0) of class 0 and (0,1) of class 1, t = t_b = 0.5.
    Anchors 0 and 1: one positive (s = 2), one negative (s = 0): softplus(0 - 2) each. Anchor 2
    has no positive: left out of the mean, not counted as a zero (which would give 2/3 of it)."""
    emb = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, 1]]])
    loss, _ = run(dense_contrast_loss, emb, labels, backend=backend, temperature=0.5,
                  base_temperature=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_n_view_zero_raises(backend):
    gt = torch.arange(4).repeat_interleave(4).view(1, 4, 4).repeat(3, 1, 1)
    emb = torch.randn(3, 4, 4, 4)
    with pytest.raises(ValueError, match="raise max_samples to at least 12"):
        pixel_contrast_loss(emb, gt, gt, max_samples=10, max_views=2, backend=backend)


def test_dense_reference_refuses_large_n(monkeypatch):
    monkeypatch.setattr(ref, "DENSE_LIMIT", 100)
    emb, labels, _ = batch(1, 4, 5, 5, 3)
    with pytest.raises(ValueError, match="backend='native'"):
        dense_contrast_loss(emb, labels, backend="reference")
    dense_contrast_loss(emb, labels, backend="native")


BAD = [
    ("predict float 3-D", lambda e, l, p: dict(predict=p.float()), TypeError, "integer class map"),
    ("predict small", lambda e, l, p: dict(predict=p[:, :3]), ValueError, "predict must be"),
    ("logits wrong size", lambda e, l, p: dict(predict=torch.randn(2, 4, 3, 3)), ValueError,
     "4-D predict"),
    ("max_samples", lambda e, l, p: dict(max_samples=0), ValueError, "max_samples"),
    ("max_views", lambda e, l, p: dict(max_views=-1), ValueError, "max_views"),
    ("base_temperature", lambda e, l, p: dict(base_temperature=0), ValueError, "base_temperature"),
    ("memory type", lambda e, l, p: dict(memory=torch.zeros(3, 8)), TypeError, "PixelMemoryBank"),
    ("memory D", lambda e, l, p: dict(memory=(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))),
     ValueError, r"\(K, 8\)"),
    ("label range", lambda e, l, p: dict(labels=l.masked_fill(l == 1, -3)), ValueError,
     "labels must be class indices"),
    ("nan", lambda e, l, p: dict(emb=e.masked_fill(e > 1.5, float("nan"))), ValueError, "NaN"),
    ("backend", lambda e, l, p: dict(backend="cuda-fast"), ValueError, "backend must be"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_messages(name, make, exc, msg):
    emb, labels, pred = batch(2, 8, 6, 7, 4, seed=0)
    emb = emb * 2
    kw = dict(emb=emb, labels=labels, predict=pred)
    kw.update(make(emb, labels, pred))
    with pytest.raises(exc, match=msg):
        pixel_contrast_loss(kw.pop("emb"), kw.pop("labels"), kw.pop("predict"), **kw)


def test_logits_as_predict_equal_argmax():
    emb, labels, _ = batch(2, 8, 6, 7, 4, seed=9)
    logits = torch.randn(2, 4, 6, 7)
    a = pixel_contrast_loss(emb, labels, logits, max_samples=30, max_views=3, seed=1)
    b = pixel_contrast_loss(emb, labels, logits.argmax(1), max_samples=30, max_views=3, seed=1)
    assert a.item() == b.item()


# --- memory bank -----------------------------------------------------------------------------
def small_bank(**kw):
    torch.manual_seed(0)
    return PixelMemoryBank(4, dim=8, memory_size=12, pixel_update_freq=3, **kw)


def test_bank_update_as_intended():
    """Segment queue: each image's normalised class mean at the class pointer; pixel queue:
    min(count, freq) of the class's own pixels, pointer advanced by the number written; class 0
    enqueued; labels nearest-resized to the keys' resolution."""
    emb, labels, _ = batch(2, 8, 5, 6, 4, seed=3, stride=2)
    bank = small_bank()
    bank.update(emb, labels, seed=1)
    gt = labels[:, ::2, ::2]
    rows = emb.permute(0, 2, 3, 1).reshape(-1, 8)
    flat = gt.reshape(-1)
    for c in range(4):
        imgs = [b for b in range(2) if bool((gt[b] == c).any())]
        assert bank.segment_ptr[c].item() == len(imgs)
        for slot, b in enumerate(imgs):
            mean = F.normalize(emb[b][:, gt[b] == c].mean(1), dim=0)
            assert_close(bank.segment_queue[c, slot], mean, rtol=0, atol=1e-6, what="mean")
        n = sum(min(int((gt[b] == c).sum()), 3) for b in imgs)
        assert bank.pixel_ptr[c].item() == n
        for e in bank.pixel_queue[c, :n]:
            d = (rows - e).abs().sum(1)
            i = int(d.argmin())
            assert d[i] < 1e-5 and flat[i] == c                    # the class's own pixel
        assert len({tuple(e.tolist()) for e in bank.pixel_queue[c, :n]}) == n


def test_bank_fifo_wraps():
    emb, labels, _ = batch(2, 8, 5, 6, 4, seed=3)
    bank = small_bank()
    for s in range(5):
        bank.update(emb, labels, seed=s)
    assert bank.pixel_ptr.tolist() == [(5 * 2 * 3) % 12] * 4        # every class >= 3 pixels


@pytest.mark.parametrize("quirks,want", [
    (("pointer",), [0, 0, 0, 0]),                   # 0..9 by ones, then 9 + 3 >= 12: to 0
    (("overflow",), [6, 6, 6, 6]),                  # by K; 9 + 3 >= 12: last slots, to 0
    (("class0", "overflow"), [0, 6, 6, 6]),         # class 0 never enqueued
])
def test_bank_official_pointer_quirks(quirks, want):
    emb, labels, _ = batch(2, 8, 5, 6, 4, seed=3)
    bank = small_bank(official=quirks)
    for s in range(5):
        bank.update(emb, labels, seed=s)
    assert bank.pixel_ptr.tolist() == want


def test_bank_official_positions_and_class0_layout():
    emb, labels, _ = batch(1, 8, 4, 4, 4, seed=5, ignore=-7)
    labels = labels.clamp(min=0)
    bank = small_bank(official=("positions", "class0"))
    bank.update(emb, labels, seed=0)
    keys, lab = bank.keys()
    assert keys.shape == (4 * 24, 8) and lab[-24:].eq(0).all() and keys[-24:].eq(0).all()
    assert lab[:24].eq(1).all()
    rows = emb.permute(0, 2, 3, 1).reshape(-1, 8)
    n1 = int((labels == 1).sum())
    k = min(n1, 3)
    for e in bank.pixel_queue[1, :k]:                # official M2: positions < n1 of the map
        i = int((rows - e).abs().sum(1).argmin())
        assert i < n1


def test_bank_label_stride_quirk_misaligns():
    """label_stride = s reads labels[::s, ::s] against the flat key map by position (official
    M3 when s differs from the keys' stride)."""
    emb, labels, _ = batch(1, 8, 4, 4, 3, seed=2, stride=2, ignore=-5)
    labels = labels.clamp(min=0)
    bank = small_bank(label_stride=4)
    bank.update(emb, labels, seed=0)
    lab = labels[:, ::4, ::4].reshape(-1)            # 4 labels for 16 key positions
    c = int(lab[0])
    support = (lab == c).nonzero()[:, 0]
    rows = emb[0].permute(1, 2, 0).reshape(-1, 8)
    want = F.normalize(rows[support].mean(0), dim=0)
    assert_close(bank.segment_queue[c, 0], want, rtol=0, atol=1e-6, what="misaligned mean")


def test_bank_failed_update_changes_nothing_and_state_dict_roundtrip():
    emb, labels, _ = batch(2, 8, 5, 6, 4, seed=3)
    bank = small_bank()
    bank.update(emb, labels, seed=0)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bad = [(emb[:, :5], labels), (emb, labels[:1]), (emb.masked_fill(emb > 0.5, float("nan")),
                                                     labels), (emb, labels.float())]
    for e, l in bad:
        with pytest.raises((ValueError, TypeError)):
            bank.update(e, l, seed=1)
        for k, v in bank.state_dict().items():
            assert torch.equal(v, before[k]), k
    other = PixelMemoryBank(4, dim=8, memory_size=12, pixel_update_freq=3)
    other.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.keys(), bank.keys()))
    with pytest.raises(ValueError, match="memory_size"):
        PixelMemoryBank(4, dim=8, memory_size=4, pixel_update_freq=3).update(
            emb, labels)                              # 2 x 3 pixels per class > 4 slots
    with pytest.raises(ValueError, match="unknown official"):
        PixelMemoryBank(4, official=("pointr",))


@pytest.mark.interpret
def test_torch_compile_matches_eager():
    """The Triton path traces without graph breaks (custom ops with fake kernels; on CPU the
    interpreter cannot be code-generated, so aot_eager)."""
    emb, labels, pred = batch(seed=8)
    emb, labels, pred = emb.to(DEV), labels.to(DEV), pred.to(DEV)

    def step(e):
        return pixel_contrast_loss(e, labels, pred, max_samples=40, max_views=4, seed=3,
                                   backend="triton", check_values=False)

    backend = "inductor" if DEV.type == "cuda" else "aot_eager"
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    # a compiled graph calls the op by device: on CPU tensors the Triton kernels need the switch
    from pixcon.ops import _library
    with _library.triton_on_cpu() if DEV.type == "cpu" else contextlib.nullcontext():
        l1, l2 = step(e1), compiled(e2)
        g1, = torch.autograd.grad(l1, e1)
        g2, = torch.autograd.grad(l2, e2)
    assert_close(l2, l1, rtol=1e-6, atol=1e-6, what="compiled loss")
    assert_close(g2, g1, rtol=1e-6, atol=1e-8, what="compiled grad")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_every_integer_label_dtype_gives_the_int64_result(dtype):
    """PNG masks load as uint8: the label check compares in int64 (2^31 in a narrow dtype
    wrapped and rejected every label)."""
    emb, labels, pred = batch(seed=12)
    labels = labels.clamp(max=3)                               # 255 would not fit int8 ranges
    want = pixel_contrast_loss(emb, labels, pred, max_samples=40, max_views=4, seed=2,
                               backend="native")
    got = pixel_contrast_loss(emb, labels.to(dtype), pred, max_samples=40, max_views=4, seed=2,
                              backend="native")
    assert torch.equal(got, want)
    assert torch.equal(dense_contrast_loss(emb, labels.to(dtype), backend="native"),
                       dense_contrast_loss(emb, labels, backend="native"))


@pytest.mark.parametrize("bad", [4, -3])
def test_bank_rejects_a_label_outside_its_classes_before_writing(bad):
    """A label that is neither a class of the bank nor ignore_index raises (it was dropped
    silently) and leaves the bank as it was; uint8 labels work like int64 ones."""
    emb, labels, _ = batch(2, 8, 5, 6, 4, seed=3)
    bank = small_bank()
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    wrong = labels.clone()
    wrong[1, 2, 3] = bad
    with pytest.raises(ValueError, match=rf"labels must be classes in \[0, 4\).*found {bad}"):
        bank.update(emb, wrong, seed=1)
    assert all(torch.equal(v, bank.state_dict()[k]) for k, v in before.items())
    a, b = small_bank(), small_bank()
    a.update(emb, labels, seed=1)
    b.update(emb, labels.to(torch.uint8), seed=1)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_bank_queues_step_by_step_with_absent_classes_and_wraparound():
    """Four updates of a bank with R = 7 slots and freq 3, written out by hand: per image in
    order and per present class, K = min(count, 3) pixel slots from the class pointer (mod R),
    the pointer advanced by K; one segment slot, the pointer by 1; an absent class (or one
    ignored everywhere) keeps its pointers and every slot. Each written slot holds a unit row of
    one of that image's pixels of that class, K distinct ones; every other slot is unchanged."""
    C, R, freq, D, h, w = 4, 7, 3, 6, 3, 4
    torch.manual_seed(0)
    bank = PixelMemoryBank(C, dim=D, memory_size=R, pixel_update_freq=freq)
    layouts = [   # per update, per image: the 3 x 4 label map (9 = ignored)
        [[[0, 0, 0, 0], [0, 0, 1, 1], [9, 9, 9, 9]], [[2, 2, 2, 2], [2, 9, 9, 9], [0, 9, 9, 9]]],
        [[[1, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]], [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]],
        [[[0, 0, 2, 2], [0, 0, 2, 2], [9, 9, 9, 9]], [[1, 1, 1, 1], [9, 9, 9, 9], [9, 9, 9, 9]]],
        [[[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], [[0, 1, 0, 1], [9, 9, 9, 9], [9, 9, 9, 9]]],
    ]
    pix_ptr, seg_ptr = [0] * C, [0] * C
    g = torch.Generator().manual_seed(7)
    for step, layout in enumerate(layouts):
        labels = torch.tensor(layout)
        labels[labels == 9] = 255
        emb = torch.randn(2, D, h, w, generator=g)
        before_pix, before_seg = bank.pixel_queue.clone(), bank.segment_queue.clone()
        bank.update(emb, labels, seed=step)
        written = {c: {} for c in range(C)}          # slot -> the image that wrote it
        seg_written = {c: {} for c in range(C)}
        for b in range(2):
            for c in range(C):
                n = int((labels[b] == c).sum())
                if n == 0:
                    continue
                for j in range(min(n, freq)):
                    written[c][(pix_ptr[c] + j) % R] = b
                pix_ptr[c] = (pix_ptr[c] + min(n, freq)) % R
                seg_written[c][seg_ptr[c]] = b
                seg_ptr[c] = (seg_ptr[c] + 1) % R
        assert bank.pixel_ptr.tolist() == pix_ptr, step
        assert bank.segment_ptr.tolist() == seg_ptr, step
        def check(queue, before, slots_of, c, written_ok):
            """Each slot: unchanged unless written, else written_ok(value, image)."""
            for slot in range(R):
                got = queue[c, slot]
                if slot not in slots_of[c]:
                    assert torch.equal(got, before[c, slot]), (step, c, slot)
                else:
                    written_ok(got, slots_of[c][slot], slot)

        for c in range(C):
            def own_pixel(got, b, slot, c=c):
                rows = F.normalize(emb[b].permute(1, 2, 0)[labels[b] == c], dim=1)
                assert (rows - got).abs().sum(1).min() < 1e-6, (step, c, slot)

            def image_mean(got, b, slot, c=c):
                mean = F.normalize(emb[b][:, labels[b] == c].mean(1), dim=0)
                assert_close(got, mean, rtol=0, atol=1e-6, what="segment mean")

            check(bank.pixel_queue, before_pix, written, c, own_pixel)
            check(bank.segment_queue, before_seg, seg_written, c, image_mean)
            for b in (0, 1):
                slots = [s for s, bb in written[c].items() if bb == b]
                vals = {tuple(bank.pixel_queue[c, s].tolist()) for s in slots}
                assert len(vals) == len(slots), (step, c, b)


@pytest.mark.parametrize("official", [(), ("positions",)])
def test_bank_enqueues_exactly_the_documented_pixels(official):
    """Which pixels the pixel queue takes, recomputed from the rule the docstring states: in
    image b, class c's pixels p ordered by the Philox word 0 of counter b*hw + p under the seed
    (stream 4), ties by pixel index; the first min(count, freq) of them, in that order, at the
    class pointer. "positions" (the official perm values): each chosen pixel's rank among its
    class's pixels in pixel order, read as a flat position. Maps of 192 pixels, classes of
    dozens: an unstable sort, another counter, word or stream each pick other pixels."""
    from pixcon.ops import philox
    C, D, h, w, freq, R, seed = 3, 4, 12, 16, 5, 40, 11
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(2, D, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (2, h, w), generator=g)
    labels[1, :6] = 255                              # image 1: fewer pixels of each class
    labels[1][labels[1] == 2] = 255                  # class 2 absent from image 1
    bank = PixelMemoryBank(C, dim=D, memory_size=R, pixel_update_freq=freq, official=official,
                           cross_rank=False).double()
    bank.update(emb, labels, seed=seed)
    hw = h * w
    ptr = [0] * C
    for b in range(2):
        word = philox(torch.arange(hw) + b * hw, seed, 4, backend="reference")[:, 0].tolist()
        lab = labels[b].reshape(-1).tolist()
        rows = F.normalize(emb[b].reshape(D, hw).T, dim=1)
        for c in range(C):
            mine = [p for p in range(hw) if lab[p] == c]
            chosen = sorted(mine, key=lambda p: (word[p], p))[:freq]
            if "positions" in official:
                chosen = [mine.index(p) for p in chosen]
            for j, p in enumerate(chosen):
                assert torch.equal(bank.pixel_queue[c, (ptr[c] + j) % R], rows[p]), (b, c, j)
            ptr[c] = (ptr[c] + len(chosen)) % R
    assert bank.pixel_ptr.tolist() == ptr == [10, 10, 5]
    full = torch.tensor([[[0, 0, 1], [1, 2, 2]]])          # every pixel labelled; class 2's
    small = PixelMemoryBank(C, dim=D, memory_size=R, pixel_update_freq=freq, official=official,
                            cross_rank=False).double()      # two pixels end the sorted order
    e = torch.randn(1, D, 2, 3, generator=g, dtype=torch.float64)
    small.update(e, full, seed=seed)
    rows = F.normalize(e[0].reshape(D, 6).T, dim=1)
    word = philox(torch.arange(6), seed, 4, backend="reference")[:, 0].tolist()
    mine = sorted([4, 5], key=lambda p: (word[p], p))
    want = [[4, 5].index(p) if "positions" in official else p for p in mine]
    for j, p in enumerate(want):
        assert torch.equal(small.pixel_queue[2, j], rows[p])


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not pixcon.HAS_C, reason="pixcon._C not built"))])
def test_any_label_values_name_the_classes(backend):
    """ContrastiveSeg has no class count: labels are any integers, only their equality counts.
    Classes 0..4 renamed (in the same order) to 0, 130, 4000, 70,000 and 2^31 - 1 give the same
    losses, in-batch, with a bank and dense (ignore_index 255 stays ignored)."""
    g = torch.Generator().manual_seed(2)
    emb = F.normalize(torch.randn(2, 8, 9, 10, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 5, (2, 9, 10), generator=g)
    labels[0, :2] = 255
    pred = torch.where((torch.rand(2, 9, 10, generator=g) < 0.6) & (labels < 5), labels, 0)
    names = torch.tensor([0, 130, 4000, 70000, 2**31 - 1])
    big = torch.where(labels == 255, 255, names[labels.clamp(max=4)])
    bank = F.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=1)
    yb = torch.randint(0, 5, (30,), generator=g)
    kw = dict(max_samples=40, max_views=6, seed=4, backend=backend)
    for lab, p, mem in ((labels, pred, (bank, yb)), (big, names[pred], (bank, names[yb]))):
        got = [pixel_contrast_loss(emb, lab, p, **kw), dense_contrast_loss(emb, lab,
                                                                          backend=backend)]
        if backend == "reference":
            got.append(pixel_contrast_loss(emb, lab, p, memory=mem, **kw))
        if lab is labels:
            want = got
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-12, atol=1e-12, what="renamed classes")


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not pixcon.HAS_C, reason="pixcon._C not built"))])
def test_contrast_at_the_smallest_key_sets(backend):
    """supervised_contrast where the sizes are smallest: anchors and no key (terms 0, no
    positive); one anchor against a bank (its own terms); one key, a positive (|P| = 1, no
    negative: the term is softplus(-inf) = 0); one key, a negative (no positive: 0)."""
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64),
                    dim=1)
    y = torch.tensor([0, 1, 0])
    kw = dict(temperature=0.5, backend=backend)
    terms, npos = supervised_contrast(z, y, z[:0], y[:0], **kw)
    assert terms.tolist() == [0.0] * 3 and npos.tolist() == [0] * 3
    assert npos.dtype == torch.int64
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    yk = torch.tensor([0, 1, 0])
    terms, npos = supervised_contrast(z[1:2], y[1:2], keys, yk, **kw)   # anchor of class 1
    s = z[1] @ keys.T / 0.5
    nl = torch.logsumexp(s[[0, 2]], 0)
    assert npos.tolist() == [1]
    assert_close(terms, F.softplus(nl - s[1])[None], rtol=1e-12, atol=0, what="one anchor")
    terms, npos = supervised_contrast(z, y, keys[:1], yk[:1], **kw)       # one key, class 0
    assert npos.tolist() == [1, 0, 1] and terms.tolist() == [0.0] * 3


def test_no_kept_class_gives_zero_even_against_a_bank():
    """No (image, class) pair over max_views: no anchor, so a zero (connected to emb), also with
    a bank whose keys would give any anchor a loss; the reference sampler returns nothing."""
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(2, 4, 3, 3, generator=g), dim=1).requires_grad_()
    labels = torch.randint(0, 3, (2, 3, 3), generator=g)
    bank = (F.normalize(torch.randn(8, 4, generator=g), dim=1), torch.arange(8) % 3)
    for memory in (None, bank):
        loss = pixel_contrast_loss(emb, labels, labels, max_views=20, memory=memory,
                                   backend="reference")
        assert loss.item() == 0.0 and loss.requires_grad
    assert ref.sample_anchors(labels, labels, max_samples=10, max_views=20, seed=0)[2:] == (0, 0)
    idx, lab, _, _ = ref.sample_anchors(labels, labels, max_samples=10, max_views=20, seed=0)
    assert idx.shape == lab.shape == (0,)


def test_mean_over_anchors_counts_the_anchors_it_uses():
    """The reduction (t / t_b) * mean over anchors with a label and a positive, by hand: one
    used anchor is its own mean; an anchor without a label or without a positive is left out."""
    from pixcon.core.contrastiveseg import mean_over_anchors
    terms = torch.tensor([2.0, 5.0, 7.0, 11.0])
    one = mean_over_anchors(terms, torch.tensor([0, 3, 0, 2]), torch.tensor([1, 1, 2, -1]), 0.5)
    assert one.item() == 0.5 * 5.0
    two = mean_over_anchors(terms, torch.tensor([1, 3, 0, 2]), torch.tensor([1, 1, 2, 0]), 2.0)
    assert two.item() == 2.0 * (2.0 + 5.0 + 11.0) / 3
    assert mean_over_anchors(terms, torch.zeros(4, dtype=torch.long), torch.zeros(4), 1.0) == 0


def test_bank_checks_and_its_initial_queues():
    """A fresh bank's queues hold random unit rows (the official init: normalised randn along
    D); labels smaller than the keys in either dimension are refused, equal is fine; a batch of
    exactly memory_size / freq images fits; with check_values=False out-of-range labels are not
    checked and their pixels are skipped, as ignored ones."""
    bank = PixelMemoryBank(3, dim=4, memory_size=6, pixel_update_freq=2, cross_rank=False)
    for q in (bank.segment_queue, bank.pixel_queue):
        assert_close(q.norm(dim=2), torch.ones(3, 6), rtol=0, atol=1e-6, what="unit rows")
        assert q.std() > 0.1
    keys = torch.randn(3, 4, 5, 7)
    labels = torch.randint(0, 3, (3, 5, 7))
    for small in (labels[:, :4], labels[:, :, :6], labels[:, :4, :6]):
        with pytest.raises(ValueError, match="at least"):
            bank.update(keys, small, seed=0)
    bank.update(keys, labels, seed=0)                 # 3 images x 2 = 6 slots = memory_size
    with pytest.raises(ValueError, match="more than memory_size"):
        bank.update(torch.randn(4, 4, 5, 7), torch.zeros(4, 5, 7, dtype=torch.long), seed=0)
    clean = PixelMemoryBank(3, dim=4, memory_size=6, pixel_update_freq=2, cross_rank=False)
    dirty = PixelMemoryBank(3, dim=4, memory_size=6, pixel_update_freq=2, cross_rank=False)
    dirty.load_state_dict(clean.state_dict())
    bad = labels.clone()
    bad[0, 0, :3] = torch.tensor([3, -4, 7])          # out of range: skipped like 255
    ign = labels.clone()
    ign[0, 0, :3] = 255
    with pytest.raises(ValueError, match="labels must be classes"):
        dirty.update(keys, bad, seed=1)
    official = PixelMemoryBank(3, dim=4, memory_size=6, pixel_update_freq=2, cross_rank=False,
                               official=("class0",))
    k, lab = official.keys()                          # classes 1, 2, then 2R zero rows of 0
    assert k.shape == (36, 4) and lab.tolist() == [1] * 12 + [2] * 12 + [0] * 12
    assert k[24:].abs().sum() == 0
    dirty.update(keys, bad, seed=1, check_values=False)
    clean.update(keys, ign, seed=1)
    for k, v in clean.state_dict().items():
        assert torch.equal(v, dirty.state_dict()[k]), k


def test_a_bank_of_another_dtype_and_strided_uint8_labels():
    """Keys of another dtype than the embeddings are read in the embeddings' compute dtype (a
    float64 bank with float32 anchors gives the float32 bank's loss, as float32); the official
    strided labels work in any integer dtype (uint8 equals int64)."""
    g = torch.Generator().manual_seed(4)
    emb = F.normalize(torch.randn(2, 4, 6, 6, generator=g), dim=1)
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    keys = F.normalize(torch.randn(12, 4, generator=g), dim=1)
    yk = torch.arange(12) % 3
    kw = dict(max_views=2, seed=1, backend="reference")
    a = pixel_contrast_loss(emb, labels, labels, memory=(keys, yk), **kw)
    b = pixel_contrast_loss(emb, labels, labels, memory=(keys.double(), yk), **kw)
    assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    banks = []
    for dt in (torch.int64, torch.uint8):
        torch.manual_seed(0)
        bank = PixelMemoryBank(3, dim=4, memory_size=8, pixel_update_freq=2, label_stride=2,
                               cross_rank=False)
        bank.update(emb[:, :, :3, :3], labels.to(dt), seed=2)
        banks.append(bank.state_dict())
    for k in banks[0]:
        assert torch.equal(banks[0][k], banks[1][k]), k
