"""Contextrast's CPU tiles (pixcon.ops.anchor_tiles, kernels in csrc/cpu/anchor.cpp): the class
sums and pixel x anchor terms made tile by tile from the NCHW embedding and remade in backward
equal the dense formulas (float64 1e-12), pass gradcheck (also with rows below the
normalisation's eps and tiles that split images), take labels scattered pixel by pixel and in
regions (the kernels' two loops), compute half inputs in float32, give the same bits on one
thread and two, and save nothing of the embedding's size but the embedding itself."""
import pytest
import torch
import torch.nn.functional as F

import pixcon

from pixcon.measure import saved_bytes
from pixcon.ops import anchor_tiles as tiles
from pixcon.reference import common as cm
from pixcon.reference import contextrast as ref


def case(B=2, D=5, h=4, w=6, C=4, seed=0, dtype=torch.float64, tiny_row=True, regions=False):
    """regions: labels constant over runs of 16 pixels along x (the kernels' run loops; ignored
    runs included), else scattered pixel by pixel."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, h, w, generator=g, dtype=dtype)
    if tiny_row:                 # a row below eps: the clamp's branch (not for gradcheck, whose
        emb[0, :, 0, 0] = 1e-10  # 1e-6 steps would cross it)
    if regions:
        gt = torch.randint(-1, C, (B, h, -(-w // 16)), generator=g)
        gt = gt.repeat_interleave(16, dim=2)[..., :w].reshape(-1)
    else:
        gt = torch.randint(-1, C, (B * h * w,), generator=g)
    sel = torch.rand(B * h * w, generator=g) < 0.5
    err = torch.where(torch.rand(B * h * w, generator=g) < 0.6,
                      torch.randint(0, C, (B * h * w,), generator=g), -1)
    a = F.normalize(torch.randn(C, D, generator=g, dtype=dtype), dim=1)
    return emb, gt, sel, err, a


def dense_terms(emb, a, gt, sel, err, C, t, reading, normalize=True):
    z = cm.pixel_rows(emb)
    if normalize:
        z = F.normalize(z, dim=1, eps=cm.EPS)
    neg = ref.negative_mask(sel, err, C, reading)
    s = z @ a.T / t
    has = neg.any(0)
    nl = torch.logsumexp(torch.where(has[None], s.masked_fill(~neg, float("-inf")), 0.0), 0)
    g = gt.clamp(min=0)
    use = (gt >= 0) & has[g]
    per = torch.where(use, F.softplus(nl[g] - s.gather(1, g[:, None])[:, 0]), 0.0)
    return per.new_zeros(C).index_add(0, g, per)


@pytest.fixture(params=[3, 0], ids=["tiles-of-3", "own-tiles"])
def tile(request):
    torch.ops.pixcon.set_anchor_tile(request.param)
    yield request.param
    torch.ops.pixcon.set_anchor_tile(0)


@pytest.mark.parametrize("regions", [False, True], ids=["scattered", "regions"])
@pytest.mark.parametrize("reading", ["R1", "R2"])
@pytest.mark.parametrize("normalize", [True, False])
def test_anchor_terms_equal_the_dense_formula_and_gradcheck(tile, reading, normalize, regions):
    emb, gt, sel, err, a = case(seed=len(reading) + normalize, w=6 + 30 * regions,
                                regions=regions)
    x, av = emb.clone().requires_grad_(), a.clone().requires_grad_()
    got = tiles.anchor_terms(x, av, gt, sel, err, 4, 0.3, reading, normalize=normalize)
    want = dense_terms(x, av, gt, sel, err, 4, 0.3, reading, normalize)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(4, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), [x, av])
    g_want = torch.autograd.grad((want * w).sum(), [x, av])
    # Above 20 torch's softplus is linear (derivative exactly 1: the dense formula's autograd)
    # where the kernels use the exact derivative sigmoid(v), 1 - e^-20 = 1 - 2e-9: the unnormalised
    # cases reach it. Below it the two agree to 1e-13.
    for p, q in zip(g_got, g_want):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-8 * q.abs().max())
    emb, *_ = case(seed=len(reading) + normalize, tiny_row=False, w=6 + 30 * regions)
    assert torch.autograd.gradcheck(
        lambda e, b: tiles.anchor_terms(e, b, gt, sel, err, 4, 0.3, reading,
                                        normalize=normalize), (emb.requires_grad_(), av))


def _both_passes(D, C, regions, dtype, seed=11, w=36, h=4):
    """(dx, da) of pass A then pass B with a class sums' gradient dS folded in, and the dense
    formula's (float64 autograd) for the same inputs."""
    emb, gt, sel, err, a = case(seed=seed, D=D, C=C, h=h, w=w, regions=regions)
    x, av = emb.clone().requires_grad_(), a.clone().requires_grad_()
    xd, ad = emb.to(dtype), a.to(dtype)
    lib = pixcon.ops._library
    inv = lib.inv_norms(xd)
    neg = torch.where(sel, err, -1)
    loss, nl, sig, S = lib.anchor_contrast(xd, inv, ad, gt, neg, 0.3, False, True, False)
    G = torch.randn(C, dtype=torch.float64)
    dS = torch.randn(C, D, dtype=torch.float64)
    da, kept = lib.anchor_contrast_da(G.to(dtype), xd, inv, ad, gt, neg, nl, sig, S, 0.3, False,
                                      True)
    assert kept.numel() == 0                           # pass B remakes what it needs
    dx = lib.anchor_contrast_dx(G.to(dtype), xd, inv, ad, gt, neg, nl, sig, S, kept,
                                dS.to(dtype), 0.3, False, True)
    want = dense_terms(x, av, gt, sel, err, C, 0.3, "R1")
    z = F.normalize(cm.pixel_rows(x), dim=1, eps=cm.EPS)
    keep = gt >= 0
    sums = z.new_zeros(C, D).index_add(0, gt[keep], z[keep])
    w_x, w_a = torch.autograd.grad((want * G).sum() + (sums * dS).sum(), [x, av])
    return dx, da, w_x, w_a


@pytest.mark.parametrize("D, C, regions", [(5, 4, True), (3, 4, False), (5, 48, False)],
                         ids=["regions", "scattered", "many-classes"])
def test_backward_with_the_class_sums_gradient(tile, D, C, regions):
    """Pass A (the anchors' gradient) keeps nothing; pass B remakes each tile's weights (one
    anchor row a pixel, a product over the anchors at BANE's negatives) and folds in the
    gradient dS of the class sums, the fused loss's one write of the pixels' gradient: equal to
    the dense formula's gradients with labels in runs and scattered pixel by pixel (the run
    loops and the per-pixel ones), 48 classes included."""
    dx, da, w_x, w_a = _both_passes(D, C, regions, torch.float64)
    assert torch.allclose(dx, w_x, rtol=1e-10, atol=1e-12)
    assert torch.allclose(da, w_a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("D, C, regions", [(70, 19, True), (37, 21, False)],
                         ids=["regions", "scattered"])
def test_float32_products_equal_the_dense_formula(tile, D, C, regions):
    """Float32 takes the tiles' products through csrc/cpu/gemm.h's kernels (where the CPU has
    AVX-512; else BLAS): with D and the negatives' count not multiples of their 16-wide vectors
    and 6-row blocks (masked tails, uneven row blocks), both gradients equal the float64 dense
    formula within 1e-5 of their largest entry (float32 sums of at most a few hundred terms)."""
    dx, da, w_x, w_a = _both_passes(D, C, regions, torch.float32, seed=13, w=150, h=3)
    assert dx.dtype == torch.float32
    assert torch.allclose(dx.double(), w_x, rtol=1e-5, atol=1e-5 * w_x.abs().max())
    assert torch.allclose(da.double(), w_a, rtol=1e-5, atol=1e-5 * w_a.abs().max())


def test_class_without_negatives_gives_zero(tile):
    emb, gt, sel, err, a = case(seed=4)
    err = torch.where(err == 2, -1, err)
    got = tiles.anchor_terms(emb, a, gt, sel, err, 4, 0.5, "R2")   # R2: class 2 has none
    assert got[2] == 0 and got[[0, 1, 3]].gt(0).all()


@pytest.mark.parametrize("regions", [False, True], ids=["scattered", "regions"])
def test_unit_class_sums_and_gradcheck(tile, regions):
    w = 6 + 30 * regions
    emb, gt, _, _, _ = case(seed=5, w=w, regions=regions)
    x = emb.clone().requires_grad_()
    got = tiles.unit_class_sums(x, gt, 4)
    z = F.normalize(cm.pixel_rows(x), dim=1, eps=cm.EPS)
    keep = gt >= 0
    want = z.new_zeros(4, 5).index_add(0, gt[keep], z[keep])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    gs = torch.randn(4, 5, dtype=torch.float64)
    g_got, = torch.autograd.grad((got * gs).sum(), x)
    g_want, = torch.autograd.grad((want * gs).sum(), x)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert g_got.view(2, 5, -1).permute(0, 2, 1).reshape(-1, 5)[~keep].eq(0).all()
    x_smooth = case(seed=5, tiny_row=False, w=w)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda e: tiles.unit_class_sums(e, gt, 4), (x_smooth,))
    raw = tiles.unit_class_sums(x, gt, 4, normalize=False)
    assert torch.allclose(raw, cm.pixel_rows(x).new_zeros(4, 5).index_add(
        0, gt[keep], cm.pixel_rows(x)[keep]))


@pytest.mark.parametrize("C", [4, 48])
@pytest.mark.parametrize("regions", [False, True], ids=["scattered", "regions"])
def test_unit_class_sums_both_kernels(tile, C, regions):
    """A tile of up to 32 classes takes its sums as one product with its classes' scaled one-hot
    rows, a tile of more (48 classes scattered over a whole image's tile) the run loops: both
    equal the dense sums, and the inverse norms come out of the same read."""
    emb, gt, _, _, _ = case(seed=12, C=C, w=36, regions=regions)
    sums, counts, inv = pixcon.ops._library.unit_class_sums(emb, gt, C, True)
    rows = cm.pixel_rows(emb)
    z = F.normalize(rows, dim=1, eps=cm.EPS)
    keep = gt >= 0
    assert torch.allclose(sums, z.new_zeros(C, 5).index_add(0, gt[keep], z[keep]), rtol=1e-12,
                          atol=1e-12)
    assert torch.equal(counts, torch.bincount(gt[keep], minlength=C))
    assert torch.allclose(inv, 1 / rows.norm(dim=1).clamp(min=cm.EPS), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precisions_compute_in_float32(tile, dtype):
    """Inputs in float32 or half: the terms, sums and gradients equal the dense formula in float64
    on the same (rounded) inputs within 1e-5 relative (float32 accumulation over a few hundred
    pixels: a few ulps of 1e-7 each); the gradient comes back in the input's dtype."""
    emb, gt, sel, err, a = case(B=2, D=24, h=6, w=40, C=5, seed=7, dtype=torch.float64,
                                tiny_row=False, regions=True)
    x = emb.to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w8 = torch.randn(5, dtype=torch.float64)
    got = tiles.anchor_terms(x, a.float(), gt, sel, err, 5, 0.3)
    got = got + tiles.unit_class_sums(x, gt, 5).sum(1)
    want = dense_terms(x64, a, gt, sel, err, 5, 0.3, "R1")
    z = F.normalize(cm.pixel_rows(x64), dim=1, eps=cm.EPS)
    keep = gt >= 0
    want = want + z.new_zeros(5, 24).index_add(0, gt[keep], z[keep]).sum(1)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    g_got, = torch.autograd.grad((got * w8.float()).sum(), x)
    g_want, = torch.autograd.grad((want * w8).sum(), x64)
    assert g_got.dtype == dtype
    # the gradient is rounded to the input's dtype once: its own resolution on top
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(g_got.double(), g_want, rtol=tol, atol=tol)


def test_same_bits_on_one_thread_and_two():
    """Chunks of tiles merge in a fixed order: a problem large enough for two threads gives the
    same bits on one (forward and both gradients)."""
    emb, gt, sel, err, a = case(B=2, D=64, h=64, w=512, C=32, seed=9, dtype=torch.float32,
                                regions=True)
    runs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            pixcon.set_num_threads(n)
            x, av = emb.clone().requires_grad_(), a.clone().requires_grad_()
            out = tiles.anchor_terms(x, av + tiles.unit_class_sums(x, gt, 32) / 100, gt, sel,
                                     err, 32, 0.1)
            runs.append((out, *torch.autograd.grad(out.sum(), [x, av])))
    finally:
        torch.set_num_threads(before)
        pixcon.set_num_threads(None)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_saves_no_copy_of_the_embedding():
    emb, gt, sel, err, a = case(B=2, D=64, h=32, w=32, dtype=torch.float32)
    x = emb.requires_grad_()
    nbytes = saved_bytes(lambda: tiles.anchor_terms(
        x, tiles.unit_class_sums(x, gt, 4) / 10, gt, sel, err, 4, 0.1), [x])
    assert nbytes < x.numel() * x.element_size() // 4         # labels and (C,) stats only


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 3)], ids=["no-image", "no-row"])
def test_empty_maps(shape):
    """A map without pixels: zero sums and terms, -inf NL (no negative), an empty gradient; the
    kernels have no tile and no chunk (a division by the chunk count crashed here)."""
    x = torch.zeros(shape, requires_grad=True)
    P = shape[0] * shape[2] * shape[3]
    gt = torch.zeros(P, dtype=torch.long)
    a = torch.randn(2, 4)
    terms = tiles.anchor_terms(x, a, gt, gt >= 0, gt, 2, 0.1)
    sums = tiles.unit_class_sums(x, gt, 2)
    assert terms.eq(0).all() and sums.eq(0).all() and sums.shape == (2, 4)
    (terms.sum() + sums.sum()).backward()
    assert x.grad.shape == shape


def test_freed_gradient_blocks_are_reused():
    """A freed gradient of 8 MiB or more goes back to the block cache (csrc/cpu/memory.h), and
    the next one of its size takes it with its pages mapped: the cache holds it between the
    steps, the second step's gradient is the same block, and it gives the same values."""
    emb, gt, sel, err, a = case(B=1, D=256, h=96, w=96, C=4, dtype=torch.float32, regions=True)
    nbytes = emb.numel() * 4
    ptrs, grads, between = [], [], []
    for _ in range(2):
        x = emb.clone().requires_grad_()
        tiles.anchor_terms(x, a, gt, sel, err, 4, 0.1).sum().backward()
        ptrs.append(x.grad.data_ptr())
        grads.append(x.grad.clone())
        held = torch.ops.pixcon.block_cache_bytes()
        del x                                               # the gradient goes back
        between.append(torch.ops.pixcon.block_cache_bytes() - held)
    assert between == [nbytes, nbytes]
    assert ptrs[0] == ptrs[1]
    assert torch.equal(grads[0], grads[1])
