"""Contextrast: BANE selection against a brute-force SciPy reference, the fused loss against the
reference (whole loss and gradients through the anchors), hand-computed and degenerate cases,
opcheck, bad input."""
import math
import time

import numpy as np

import pytest
import torch
from scipy import ndimage

import pixcon
from pixcon.nn import ContextrastLoss
from pixcon.ops import _library as lib
from pixcon.ops import bane_negatives, pixel_anchor_loss
from pixcon.reference import contextrast as ref

from .conftest import assert_close, forbid_host_syncs, triton_device

DEV = triton_device()
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpret)]


def _scene(B=2, C=5, H=32, W=48, p_err=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, C, (B, 1, 4, 6), generator=g).float()
    labels = torch.nn.functional.interpolate(coarse, size=(H, W)).long()[:, 0]
    labels[torch.rand(B, H, W, generator=g) < 0.05] = 255
    noise = torch.randint(0, C, (B, H, W), generator=g)
    pred = torch.where(torch.rand(B, H, W, generator=g) < p_err, noise, labels.clamp(max=C - 1))
    return labels, pred


def brute_force_bane(gt, pred, C, ks, reading):
    """Per image and class: SciPy's EDT of that class's own error mask; pooled per class over
    the batch; sorted by (d^2, flat index); first ceil(ks * count) kept."""
    gt, pred = gt.numpy(), pred.numpy()
    err = np.where((gt >= 0) & (pred != gt), gt if reading == "R1" else pred, -1)
    d2 = np.full(err.shape, np.inf)
    for b in range(err.shape[0]):
        for c in range(C):
            m = err[b] == c
            if m.any() and not m.all():
                d2[b][m] = np.rint(ndimage.distance_transform_edt(m) ** 2)[m]
    keep = np.zeros(err.size, bool)
    flat_err, flat_d2 = err.ravel(), d2.ravel()
    for c in range(C):
        idx = [i for i in range(err.size) if flat_err[i] == c and np.isfinite(flat_d2[i])]
        idx.sort(key=lambda i: (flat_d2[i], i))
        keep[idx[:math.ceil(ks * len(idx))]] = True
    return keep.reshape(err.shape), err


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(
    "native", marks=pytest.mark.skipif(not pixcon.HAS_C, reason="pixcon._C not built"))])
@pytest.mark.parametrize("reading", ["R1", "R2"])
@pytest.mark.parametrize("ks", [0.5, 0.2, 1.0])
def test_bane_matches_brute_force(backend, reading, ks):
    labels, pred = _scene(seed=int(ks * 10))
    C = 5
    gt = torch.where(labels == 255, -1, labels)
    want_sel, want_err = brute_force_bane(gt, pred, C, ks, reading)
    sel, err = bane_negatives(labels.to(DEV) if backend == "triton" else labels,
                              pred.to(DEV) if backend == "triton" else pred, C, ks=ks,
                              reading=reading, backend=backend)
    assert np.array_equal(err.cpu().numpy(), want_err)
    assert np.array_equal(sel.cpu().numpy(), want_sel)
    assert sel.sum() > 0


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(
    "native", marks=pytest.mark.skipif(not pixcon.HAS_C, reason="pixcon._C not built"))])
def test_bane_at_distances_near_the_diagonal(backend):
    """One error region covering the whole 40 x 50 map but its corner, so squared distances
    reach 39^2 + 49^2, next to a one-pixel region of another class (issue 33: a bound that only
    matters at the largest values, here the sort key's distance range): equal to brute force."""
    H, W, C = 40, 50, 3
    labels = torch.zeros(1, H, W, dtype=torch.int64)
    labels[0, 0, 1] = 1
    pred = torch.full((1, H, W), 2)
    pred[0, 0, 0] = 0                                      # the one correct pixel: background
    want_sel, want_err = brute_force_bane(labels, pred, C, 0.5, "R1")
    dev = DEV if backend == "triton" else torch.device("cpu")
    sel, err = bane_negatives(labels.to(dev), pred.to(dev), C, ks=0.5, backend=backend)
    assert np.array_equal(err.cpu().numpy(), want_err)
    assert np.array_equal(sel.cpu().numpy(), want_sel)
    assert sel.sum() == math.ceil(0.5 * (H * W - 2)) + 1


def test_bane_scores_input_and_region_covering_image():
    C = 3
    labels = torch.zeros(1, 6, 7, dtype=torch.long)
    scores = torch.zeros(1, C, 6, 7)
    scores[:, 2] = 1.0                         # everything predicted 2: one error region = image
    sel, err = bane_negatives(labels, scores, C)
    assert (err == 0).all() and not sel.any()  # no outside pixel: d = inf, never selected


def _embs(dtype, B=2, D=16, sizes=(16, 8, 4, 2), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, s, 2 * s, generator=g).to(dtype) for s in sizes]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("reading", ["R1", "R2"])
@pytest.mark.parametrize("detach", [False, True])
def test_fused_loss_matches_reference(dtype, reading, detach):
    labels, pred = _scene()
    embs = _embs(dtype)
    out = []
    for be, dev in (("reference", "cpu"), ("triton", DEV)):
        es = [e.to(dev).requires_grad_() for e in embs]
        loss = pixel_anchor_loss(es, labels.to(dev), pred.to(dev), num_classes=5, backend=be,
                                 reading=reading, detach_anchors=detach)
        out.append((loss.detach().cpu(), [g.cpu() for g in torch.autograd.grad(loss * 1.5, es)]))
    # same selection (exact integers), same math in fp32 (fp64): summation order only
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(out[1][0], out[0][0], rtol=tol, atol=tol, what="loss")
    gtol = 2e-3 if dtype == torch.float16 else tol
    for i, (a, b) in enumerate(zip(out[1][1], out[0][1])):
        assert_close(a, b, rtol=gtol, atol=gtol * 1e-2, what=f"d embs[{i}]")
    assert out[0][0].item() > 0


@pytest.mark.interpret
@pytest.mark.skipif(not pixcon.HAS_C, reason="the native backend needs pixcon._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reading", ["R1", "R2"])
@pytest.mark.parametrize("seed", [0, 7])
def test_native_loss_matches_reference(dtype, reading, seed):
    """The CPU default (compiled EDT, gathers) against the reference: same selection, the same
    math summed in another order (fp32 1e-5, fp64 1e-10), loss and gradients; "auto" on CPU is
    this path."""
    labels, pred = _scene(seed=seed, H=24, W=40)
    embs = _embs(dtype, seed=seed, sizes=(12, 6))
    out = []
    for be in ("reference", "native", "auto"):
        es = [e.clone().requires_grad_() for e in embs]
        loss = pixel_anchor_loss(es, labels, pred, num_classes=5, backend=be, reading=reading,
                                 layer_weights=(0.5, 1.0))
        out.append((loss.detach(), torch.autograd.grad(loss, es)))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(out[1][0], out[0][0], rtol=tol, atol=tol, what="loss")
    for i, (a, b) in enumerate(zip(out[1][1], out[0][1])):
        assert_close(a, b, rtol=tol, atol=tol * 1e-2, what=f"d embs[{i}]")
    assert out[0][0].item() > 0
    assert torch.equal(out[2][0], out[1][0])


@pytest.mark.interpret
@pytest.mark.parametrize("variant", ["raw_rows", "channels_last"])
def test_fused_loss_layouts_and_raw_rows(variant):
    """The kernels read each embedding in its own layout (channels-last too) and write the
    gradient in it; normalize=False takes the raw rows (no radial term). Fresh seed."""
    seed = int(time.time_ns() % 10**6)
    labels, pred = _scene(seed=seed)
    embs = _embs(torch.float32, seed=seed)
    out = []
    for be, dev in (("reference", "cpu"), ("triton", DEV)):
        es = [e.to(dev) for e in embs]
        if variant == "channels_last":
            es = [e.to(memory_format=torch.channels_last) for e in es]
        es = [e.requires_grad_() for e in es]
        loss = pixel_anchor_loss(es, labels.to(dev), pred.to(dev), num_classes=5, backend=be,
                                 normalize=variant != "raw_rows", temperature=0.5)
        grads = torch.autograd.grad(loss, es)
        if be == "triton" and variant == "channels_last":
            assert all(g.stride() == e.stride() for g, e in zip(grads, es))
        out.append((loss.detach().cpu(), [g.cpu() for g in grads]))
    assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5, what=f"loss (seed {seed})")
    for i, (a, b) in enumerate(zip(out[1][1], out[0][1])):
        assert_close(a, b, rtol=1e-5, atol=1e-6, what=f"d embs[{i}] (seed {seed})")
    assert out[0][0].item() > 0


@pytest.mark.interpret
def test_fused_saves_no_embedding_copy():
    """What autograd keeps for the fused L_PA: the embeddings themselves (inputs, no copy) and
    per layer O(P) labels and inverse norms, the P x C logits and (C, D) anchors; no per-layer
    P x D copy (unit rows, permuted rows) as the reference keeps."""
    labels, pred = _scene()
    C, D = 5, 64
    embs = [e.to(DEV).requires_grad_() for e in _embs(torch.float32, D=D)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pixel_anchor_loss(embs, labels.to(DEV), pred.to(DEV), num_classes=C, backend="triton")
    inputs = {e.untyped_storage().data_ptr() for e in embs}
    extra = sum(t.numel() * t.element_size() for t in saved
                if t.untyped_storage().data_ptr() not in inputs)
    P = sum(e.shape[0] * e.shape[2] * e.shape[3] for e in embs)
    bound = P * (C + 4) * 8 + len(embs) * 8 * C * D * 8       # P x (C logits + labels, inv)
    assert 0 < extra <= bound < P * D * 4, (extra, bound)
    assert any(t.untyped_storage().data_ptr() in inputs for t in saved)


@pytest.mark.parametrize("config", ["interpreter", "gpu"])
@pytest.mark.parametrize("C", [40, 70])
def test_fused_loss_many_classes_class_blocks(monkeypatch, config, C):
    """More classes than one GPU class block (32): the class-tiled logits, the pixel gradient
    that sums over class blocks and the per-block anchor gradients, in both launch
    configurations (PIXCON_LAUNCH_CONFIG), against the reference."""
    monkeypatch.setenv("PIXCON_LAUNCH_CONFIG", config)
    labels, pred = _scene(B=2, C=C, H=16, W=32, p_err=0.4, seed=C)
    g = torch.Generator().manual_seed(C)
    fine = torch.randint(0, C, (2, 16, 32), generator=g)     # many classes present per layer
    labels = torch.where(labels == 255, 255, fine)
    pred = torch.where(torch.rand(2, 16, 32, generator=g) < 0.4,
                       torch.randint(0, C, (2, 16, 32), generator=g), labels.clamp(max=C - 1))
    embs = _embs(torch.float32, D=24, sizes=(16, 4))
    out = []
    for be, dev in (("reference", "cpu"), ("triton", DEV)):
        es = [e.to(dev).requires_grad_() for e in embs]
        loss = pixel_anchor_loss(es, labels.to(dev), pred.to(dev), num_classes=C, backend=be,
                                 layer_weights=(0.3, 1.0))
        out.append((loss.detach().cpu(), [g.cpu() for g in torch.autograd.grad(loss, es)]))
    assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5, what="loss")
    for i, (a, b) in enumerate(zip(out[1][1], out[0][1])):
        assert_close(a, b, rtol=1e-5, atol=1e-7, what=f"d embs[{i}]")
    assert out[0][0].item() > 0


def test_hand_computed_single_layer():
    # class 0 pixels = (1, 0), class 1 pixels = (0, 1); one class-1 pixel predicted 0 (an error
    # whose distance to its region's edge is 1). R1: it is a negative of anchor 0 only.
    # loss = lambda * (softplus(NL_0 - s+) + 0) / 2 with s+ = 1/t, NL_0 = 0/t = 0.
    labels = torch.tensor([[[0, 0, 0, 1, 1, 1]]])
    emb = torch.tensor([[1.0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]).view(1, 2, 1, 6)
    pred = labels.clone()
    pred[0, 0, 4] = 0
    loss = pixel_anchor_loss([emb], labels, pred, num_classes=2, layer_weights=(1.0,),
                             temperature=0.1, backend="reference")
    assert abs(loss.item() - math.log1p(math.exp(-10)) / 2) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(
    "native", marks=pytest.mark.skipif(not pixcon.HAS_C, reason="pixcon._C not built"))])
def test_hand_computed_two_layers(backend):
    """What differs between layers, by hand (t = 0.5, w_l = 0.3, w_h = 0.7, lambda = (0.25, 1)).

    Labels [0 0 0 1 1 2], prediction [0 0 0 1 0 2]: pixel 4 (class 1, predicted 0) is the only
    error; R1 makes it a negative of anchors 0 and 2. The deep layer (3 pixels) reads pixels
    0, 2, 4 (nearest): class 2 is absent there, pixel 4 is still an error.
    Shallow z: (1,0) x3, (0,1) x2, (0.6,-0.8); anchors a0 = (1,0), a1 = (0,1), a2 = (0.6,-0.8).
    Deep z: (1,0), (0.6,0.8), (0,1); anchors d0 = (0.8,0.4), d1 = (0,1).
    Fused shallow anchors: 0.3 a + 0.7 d where the class is present deep: â0 = (0.86, 0.28);
    â2 = a2 (absent deep). Shallow: class 0: softplus((0.28 - 0.86)/t); class 2:
    softplus((-0.8 - 1)/t); class 1 has no negative (0); divided by the 3 classes present.
    Deep: class 0, both positives at d0.z = 0.8: softplus((0.4 - 0.8)/t); divided by 2."""
    sp = lambda x: math.log1p(math.exp(x))                      # noqa: E731
    t = 0.5
    expected = (0.25 * (sp((0.28 - 0.86) / t) + sp((-0.8 - 1.0) / t)) / 3
                + 1.0 * sp((0.4 - 0.8) / t) / 2)
    d = DEV if backend == "triton" else torch.device("cpu")
    shallow = torch.tensor([[1.0, 1, 1, 0, 0, 0.6], [0, 0, 0, 1, 1, -0.8]]).view(1, 2, 1, 6)
    deep = torch.tensor([[1.0, 0.6, 0], [0, 0.8, 1]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, 0, 1, 1, 2]]])
    pred = torch.tensor([[[0, 0, 0, 1, 0, 2]]])
    loss = pixel_anchor_loss([shallow.to(d), deep.to(d)], labels.to(d), pred.to(d), num_classes=3,
                             layer_weights=(0.25, 1.0), w_low=0.3, w_high=0.7, temperature=t,
                             ks=0.5, backend=backend)
    assert loss.item() == pytest.approx(expected, abs=2e-6)


def test_anchor_fusion_uses_deep_anchor_only_where_present():
    a_shallow = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    a_deep = torch.tensor([[3.0, 0], [0, 0], [0, 0]])
    fused = ref.fuse_anchors([a_shallow, a_deep], [torch.ones(3, dtype=torch.bool),
                                                   torch.tensor([True, False, False])], 0.3, 0.7)
    assert torch.allclose(fused[0], torch.tensor([[2.4, 0], [0, 1], [1, 1]]))
    assert torch.equal(fused[1], a_deep)


def test_anchor_fusion_with_three_layers_reads_the_deepest_layer():
    """With two layers "the deepest" and "the next deeper" are the same layer; with three they
    are not (issue 33): layers 0 and 1 both fuse with layer 2's anchors, where the class is
    present at layer 2, whatever layer 1 holds. Checked on the fused paths' step (pixcon.core)
    and the reference's."""
    from pixcon.core import contextrast as core_ctx
    a0 = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    a1 = torch.tensor([[5.0, 5], [7, 7], [9, 9]])
    a2 = torch.tensor([[3.0, 0], [0, 0], [0, 0]])
    present = [torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool),
               torch.tensor([True, False, False])]         # class 1, 2 absent at layer 2 only
    for fuse in (core_ctx.fuse_anchors, ref.fuse_anchors):
        f0, f1, f2 = fuse([a0, a1, a2], present, 0.3, 0.7)
        assert torch.allclose(f0, torch.tensor([[2.4, 0], [0, 1], [1, 1]]))
        assert torch.allclose(f1, torch.tensor([[3.6, 1.5], [7, 7], [9, 9]]))
        assert torch.equal(f2, a2)


def test_fusion_backward_in_closed_form_equals_autograd():
    """The fused path's backward takes the anchors' gradients through the fusion in closed form
    (core.contextrast.fuse_anchors_backward): the same as autograd through fuse_anchors, with
    three layers and a class absent at the deepest."""
    from pixcon.core import contextrast as core_ctx
    g = torch.Generator().manual_seed(3)
    anchors = [torch.randn(4, 5, dtype=torch.float64, generator=g).requires_grad_()
               for _ in range(3)]
    deep = torch.tensor([True, False, True, True])
    present = [torch.ones(4, dtype=torch.bool)] * 2 + [deep]
    fused = core_ctx.fuse_anchors(anchors, present, 0.3, 0.7)
    grads = [torch.randn(4, 5, dtype=torch.float64, generator=g) for _ in range(3)]
    want = torch.autograd.grad(fused, anchors, grads)
    got = core_ctx.fuse_anchors_backward(grads, deep, 0.3, 0.7)
    for p, q in zip(got, want):
        assert torch.allclose(p, q, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS + ["native"])
@pytest.mark.parametrize("case", ["no_errors", "class_absent_deep", "all_wrong_deep"])
def test_degenerate_layers(backend, case):
    labels, pred = _scene()
    if case == "no_errors":
        pred = labels.clamp(max=4)             # no error pixel: no negative: loss 0
    elif case == "class_absent_deep":
        labels[labels == 4] = 3
        labels[:, 1:3] = 4                     # rows 1-2 only: seen at 16x32, gone at 8x16 and below
    embs = [e.to(DEV if backend == "triton" else "cpu").requires_grad_() for e in
            _embs(torch.float32)]
    dev = embs[0].device
    kw = dict(num_classes=5, backend=backend)
    if case == "all_wrong_deep":
        loss = pixel_anchor_loss(embs, labels.to(dev), torch.full_like(pred, 4).to(dev), **kw)
    else:
        loss = pixel_anchor_loss(embs, labels.to(dev), pred.to(dev), **kw)
    if case == "class_absent_deep":
        from pixcon.reference.common import pixel_labels
        assert (pixel_labels(labels, (16, 32), 5, 255) == 4).any()
        assert not (pixel_labels(labels, (2, 4), 5, 255) == 4).any()
    grads = torch.autograd.grad(loss, embs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert loss.grad_fn is not None
    if case == "no_errors":
        assert loss.item() == 0.0


@pytest.mark.parametrize("kernels", ["cpu", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_anchor_ops(normalize, kernels):
    """The Contextrast ops on an NCHW map (schemas, fake kernels, autograd through the unit
    rows), with the map's rows as the reference: inv_norms, unit_class_sums, anchor_contrast;
    their CPU kernels (the tiles) and their Triton kernels, one op each."""
    dev = DEV if kernels == "triton" else torch.device("cpu")
    with lib.kernels("triton" if kernels == "triton" else "native", dev):
        _opcheck_anchor_ops(normalize, dev, keep_logits=kernels == "triton")


def _opcheck_anchor_ops(normalize, DEV, keep_logits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, generator=g)
    x[0, :, 1, 2] = 0.0                                       # a zero pixel (norm below eps)
    a = torch.randn(3, 6, dtype=torch.float64, generator=g)
    gt = torch.randint(-1, 3, (40,), generator=g)
    neg = torch.where(torch.rand(40, generator=g) < 0.4, torch.randint(0, 3, (40,), generator=g), -1)
    x, a, gt, neg = (t.to(DEV) for t in (x, a, gt, neg))
    rows = x.permute(0, 2, 3, 1).reshape(40, 6)
    inv = lib.inv_norms(x) if normalize else torch.ones(40, dtype=torch.float64, device=DEV)
    if normalize:        # eps reaches the kernel as a float32 scalar: 1e-8 to 6e-8 relative
        assert_close(inv, 1 / rows.norm(dim=1).clamp(min=1e-8), rtol=1e-7, atol=0, what="inv")
    torch.library.opcheck(lib.inv_norms, (x,))
    torch.library.opcheck(lib.unit_class_sums, (x.requires_grad_(), gt, 3, normalize))
    torch.library.opcheck(lib.anchor_contrast, (x, inv, a.requires_grad_(), gt, neg, 0.1, False,
                                                normalize, keep_logits))
    torch.library.opcheck(lib.anchor_contrast, (x, inv, a, gt, neg, 0.1, True, normalize,
                                                keep_logits))
    sums, _, inv_sums = lib.unit_class_sums(x, gt, 3, normalize)
    # the same inverse norms from the sums' pass (its sum of squares may round with FMAs)
    assert_close(inv_sums, inv, rtol=1e-14, atol=0, what="inv from unit_class_sums")
    z = x.permute(0, 2, 3, 1).reshape(40, 6)                    # x requires grad by now
    z = torch.nn.functional.normalize(z, dim=1, eps=1e-8) if normalize else z
    onehot = torch.nn.functional.one_hot(gt.clamp(min=0), 3).to(z.dtype) * (gt >= 0)[:, None]
    assert_close(sums, onehot.T @ z, rtol=1e-12, atol=1e-12, what="unit class sums")
    gs = torch.randn(3, 6, dtype=torch.float64, generator=g).to(DEV)
    got, = torch.autograd.grad((sums * gs).sum(), x)
    want, = torch.autograd.grad(((onehot.T @ z) * gs).sum(), x)
    assert_close(got, want, rtol=1e-10, atol=1e-12, what="d x through unit class sums")


@pytest.mark.interpret
def test_fused_float64_gradcheck():
    labels, pred = _scene(B=1, C=3, H=8, W=8)
    embs = [e.to(DEV).requires_grad_() for e in
            _embs(torch.float64, B=1, D=3, sizes=(4, 2), seed=3)]
    # BANE selection and anchors' class membership do not move under finite differences
    assert torch.autograd.gradcheck(
        lambda a, b: pixel_anchor_loss([a, b], labels.to(DEV), pred.to(DEV), num_classes=3,
                                       layer_weights=(0.5, 1.0), backend="triton"),
        tuple(embs), fast_mode=True)


def test_module_heads():
    crit = ContextrastLoss(in_channels=(4, 8), dim=16, num_classes=5, backend="reference")
    feats = [torch.randn(2, 4, 16, 32), torch.randn(2, 8, 8, 16)]
    labels, pred = _scene()
    loss = crit(feats, labels, pred)
    loss.backward()
    assert all(p.grad is not None for p in crit.parameters())


BAD = [
    (dict(embs=torch.randn(2, 4, 4, 4)), TypeError, "embs must be a non-empty list"),
    (dict(w_low=0.3), ValueError, "w_low \\+ w_high must be 1"),
    (dict(layer_weights=(1.0,)), ValueError, "layer_weights has 1 entries for 2 layers"),
    (dict(reading="R3"), ValueError, "reading must be 'R1' or 'R2'"),
    (dict(ks=0.0), ValueError, "ks must be in"),
    (dict(num_classes=None), ValueError, "give num_classes"),
    (dict(pred=torch.zeros(1, 32, 48, dtype=torch.long)), ValueError, "pred has batch size 1"),
    (dict(temperature=-1), ValueError, "temperature must be a positive number"),
    (dict(embs=[torch.randn(2, 4, 16, 32), torch.full((2, 4, 8, 16), float("nan"))]), ValueError,
     r"pixel_anchor_loss: embs\[1\] contains NaN"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[b[2][:20] for b in BAD])
def test_bad_input(kw, exc, msg):
    labels, pred = _scene()
    args = dict(embs=[torch.randn(2, 4, 16, 32), torch.randn(2, 4, 8, 16)], labels=labels,
                pred=pred, num_classes=5, layer_weights=(0.5, 1.0), backend="reference")
    args.update(kw)
    with pytest.raises(exc, match=msg):
        pixel_anchor_loss(args.pop("embs"), args.pop("labels"), args.pop("pred"), **args)


@pytest.mark.interpret
def test_fused_path_makes_no_host_sync(monkeypatch):
    labels, pred = _scene()
    embs = [e.to(DEV).requires_grad_() for e in _embs(torch.float32)]

    forbid_host_syncs(monkeypatch)
    loss = pixel_anchor_loss(embs, labels.to(DEV), pred.to(DEV), num_classes=5, backend="triton",
                             check_values=False)
    loss.backward()
    monkeypatch.undo()
    assert loss.item() > 0


BANE_BAD = [
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must have 3"),
    (dict(pred=torch.zeros(2, 5, 6, dtype=torch.long)), ValueError, "does not match labels"),
    (dict(ks=1.5), ValueError, "ks must be in"),
    (dict(reading="FP"), ValueError, "reading must be 'R1' or 'R2'"),
    (dict(pred=torch.zeros(2, 3, 4, 6)), ValueError, "pred has 3 classes, expected 5"),
]


@pytest.mark.parametrize("kw,exc,msg", BANE_BAD, ids=[b[2][:20] for b in BANE_BAD])
def test_bane_bad_input(kw, exc, msg):
    args = dict(labels=torch.zeros(2, 4, 6, dtype=torch.long),
                pred=torch.zeros(2, 4, 6, dtype=torch.long), num_classes=5)
    args.update(kw)
    with pytest.raises(exc, match=msg):
        bane_negatives(args.pop("labels"), args.pop("pred"), args.pop("num_classes"), **args)


def test_detached_anchors_change_the_gradient_not_the_value():
    """detach_anchors=True stops the gradient through the class means: the same loss value, a
    different gradient, the same on the reference and the compiled path."""
    from tools import smoke
    x = smoke._contextrast_make(torch.device("cpu"), 0)
    out = {}
    backends = ["reference"] + (["native"] if pixcon.HAS_C else [])
    for be in backends:
        for detach in (False, True):
            embs = [e.clone().requires_grad_() for e in x["embs"]]
            loss = pixel_anchor_loss(embs, x["labels"], x["logits"], layer_weights=(0.3, 1.0),
                                     detach_anchors=detach, backend=be)
            out[be, detach] = (loss.detach(), torch.autograd.grad(loss, embs))
    for be in backends:
        assert torch.allclose(out[be, True][0], out[be, False][0], rtol=1e-6, atol=0)
        assert not torch.allclose(out[be, True][1][0], out[be, False][1][0], rtol=1e-3, atol=1e-6)
        for a, b in zip(out[be, True][1], out["reference", True][1]):
            assert_close(a, b, rtol=1e-4, atol=1e-6, what=f"{be} detached gradient")


@pytest.mark.parametrize("reading", ["R1", "R2"])
def test_bane_on_thick_error_regions_against_brute_force(reading):
    """BANE where distances vary inside an error region: blocks of classes 0, 1, 2 each
    misclassified over a thick band; the kept pixels of each class are its ceil(ks n) nearest
    to a pixel of another error value (ties by flat index), by brute force, on every backend."""
    gt = torch.zeros(1, 14, 15, dtype=torch.long)
    gt[0, :, 5:10], gt[0, :, 10:] = 1, 2
    pred = gt.clone()
    pred[0, 2:12, 1:5], pred[0, 3:13, 5:10], pred[0, 1:9, 10:14] = 2, 0, 1
    err = torch.where(pred != gt, gt if reading == "R1" else pred, -1)[0]
    H, W = err.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    want = torch.zeros(H * W, dtype=torch.bool)
    for c in range(3):
        cells = [(y, x) for y in range(H) for x in range(W) if err[y, x] == c]
        other = err != c
        d2 = [int(((ys - y) ** 2 + (xs - x) ** 2)[other].min()) for y, x in cells]
        keep = sorted(range(len(cells)), key=lambda i: (d2[i], cells[i]))[:math.ceil(0.5 * len(cells))]
        for i in keep:
            want[cells[i][0] * W + cells[i][1]] = True
    backends = ["reference"] + (["native"] if pixcon.HAS_C else [])
    for be in backends:
        sel, e = bane_negatives(gt, pred, 3, ks=0.5, reading=reading, backend=be)
        assert torch.equal(e[0], err), be
        assert torch.equal(sel.reshape(-1), want), be


@pytest.mark.parametrize("layers", [[(16, 24), (8, 12), (4, 6)], [(16, 24), (5, 7)],
                                    [(12, 16), (6, 8)]], ids=["nested", "not-nested", "uneven"])
def test_pyramid_labels_equal_each_layers_own(layers):
    """The fused path takes the scores' argmax once, at the finest layer, and subsamples it for
    the others where the nearest resizes nest: the same labels as each layer's own resize and
    argmax (scores with ties included: the first maximum either way), and each layer's own
    where they do not nest (5 x 7 of 32 x 48; 12 x 16 is not a whole factor of 32 x 48)."""
    from pixcon.core import contextrast as steps
    g = torch.Generator().manual_seed(3)
    labels, _ = _scene(C=5)
    scores = torch.randint(0, 3, (2, 5, 32, 48), generator=g).float()   # many ties
    shapes = [(2, 8, h, w) for h, w in layers]
    got = steps.pyramid_labels(shapes, labels, scores, 5, 255)
    for shape, (gt, pr) in zip(shapes, got):
        want_gt, want_pr = steps.layer_labels(shape, labels, scores, 5, 255)
        assert torch.equal(gt, want_gt) and torch.equal(pr, want_pr)
