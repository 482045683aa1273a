"""Contextrast's CPU tiles (pixcon.ops.anchor_tiles): the class sums and pixel x anchor terms
made tile by tile from the NCHW embedding and remade in backward equal the dense formulas
(float64 1e-12), pass gradcheck (also with rows below the normalisation's eps and tiles that
split images), and save nothing of the embedding's size but the embedding itself."""
import pytest
import torch
import torch.nn.functional as F

from pixcon.measure import saved_bytes
from pixcon.ops import anchor_tiles as tiles
from pixcon.reference import common as cm
from pixcon.reference import contextrast as ref


def case(B=2, D=5, h=4, w=6, C=4, seed=0, dtype=torch.float64, tiny_row=True):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, h, w, generator=g, dtype=dtype)
    if tiny_row:                 # a row below eps: the clamp's branch (not for gradcheck, whose
        emb[0, :, 0, 0] = 1e-10  # 1e-6 steps would cross it)
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


@pytest.fixture(params=[3, 32768], ids=["tiles-of-3", "one-tile-per-image"])
def tile(request, monkeypatch):
    monkeypatch.setattr(tiles, "TILE", request.param)
    return request.param


@pytest.mark.parametrize("reading", ["R1", "R2"])
@pytest.mark.parametrize("normalize", [True, False])
def test_anchor_terms_equal_the_dense_formula_and_gradcheck(tile, reading, normalize):
    emb, gt, sel, err, a = case(seed=len(reading) + normalize)
    x, av = emb.clone().requires_grad_(), a.clone().requires_grad_()
    got = tiles.anchor_terms(x, av, gt, sel, err, 4, 0.3, reading, normalize=normalize)
    want = dense_terms(x, av, gt, sel, err, 4, 0.3, reading, normalize)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(4, dtype=torch.float64)
    g_got = torch.autograd.grad((got * w).sum(), [x, av])
    g_want = torch.autograd.grad((want * w).sum(), [x, av])
    for p, q in zip(g_got, g_want):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    emb, *_ = case(seed=len(reading) + normalize, tiny_row=False)
    assert torch.autograd.gradcheck(
        lambda e, b: tiles.anchor_terms(e, b, gt, sel, err, 4, 0.3, reading,
                                        normalize=normalize), (emb.requires_grad_(), av))


def test_class_without_negatives_gives_zero(tile):
    emb, gt, sel, err, a = case(seed=4)
    err = torch.where(err == 2, -1, err)
    got = tiles.anchor_terms(emb, a, gt, sel, err, 4, 0.5, "R2")   # R2: class 2 has none
    assert got[2] == 0 and got[[0, 1, 3]].gt(0).all()


def test_unit_class_sums_and_gradcheck(tile):
    emb, gt, _, _, _ = case(seed=5)
    x = emb.clone().requires_grad_()
    got = tiles.unit_class_sums(x, gt, 4)
    z = F.normalize(cm.pixel_rows(x), dim=1, eps=cm.EPS)
    keep = gt >= 0
    want = z.new_zeros(4, 5).index_add(0, gt[keep], z[keep])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    x_smooth = case(seed=5, tiny_row=False)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda e: tiles.unit_class_sums(e, gt, 4), (x_smooth,))
    raw = tiles.unit_class_sums(x, gt, 4, normalize=False)
    assert torch.allclose(raw, cm.pixel_rows(x).new_zeros(4, 5).index_add(
        0, gt[keep], cm.pixel_rows(x)[keep]))


def test_saves_no_copy_of_the_embedding():
    emb, gt, sel, err, a = case(B=2, D=64, h=32, w=32, dtype=torch.float32)
    x = emb.requires_grad_()
    nbytes = saved_bytes(lambda: tiles.anchor_terms(
        x, tiles.unit_class_sums(x, gt, 4) / 10, gt, sel, err, 4, 0.1), [x])
    assert nbytes < x.numel() * x.element_size() // 4         # labels and (C,) stats only
