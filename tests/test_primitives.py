"""Shared primitives: Triton kernels against the torch reference (bit-exact for the samplers and
counts, float tolerances for sums and InfoNCE), statistical checks of the sampling
distributions, float64 gradcheck, and torch.library.opcheck of the registered ops."""
import math

import pytest
import torch

import pixcon
from pixcon.ops import _library as lib
from pixcon.ops import class_means, sample_hard_queries, sample_negatives, sparse_infonce
from pixcon.reference import common as cm

from .conftest import assert_close, triton_device

DEV = triton_device()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _labels(P, C, p_invalid=0.2, gen=None):
    lab = torch.randint(0, C, (P,), generator=gen)
    lab[torch.rand(P, generator=gen) < p_invalid] = -1
    return lab


# --- class sums / means ----------------------------------------------------------------------
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,C", [((2, 37, 9, 11), 5), ((1, 3, 1, 7), 1), ((3, 70, 5, 5), 21)])
def test_class_means_matches_reference(dtype, shape, C):
    emb = torch.randn(shape).to(dtype)
    B, D, h, w = shape
    lab = _labels(B * h * w, C)
    s_ref, n_ref, m_ref = class_means(emb, lab, C, backend="reference")
    for x in (emb, emb.to(memory_format=torch.channels_last), cm.pixel_rows(emb)):
        s, n, m = class_means(x.to(DEV), lab.to(DEV), C, backend="triton")
        assert torch.equal(n.cpu(), n_ref)
        # float32 sums of <= 100 terms of |x| < 5 in another order: |error| < 100 * 5 * 6e-8
        tol = 1e-12 if dtype == torch.float64 else 3e-5
        assert_close(s, s_ref, rtol=tol, atol=tol, what="sums")
        assert_close(m, m_ref, rtol=tol, atol=tol, what="means")


@pytest.mark.interpret
def test_class_means_all_ignored_and_deterministic():
    emb = torch.randn(2, 8, 4, 4, device=DEV)
    lab = torch.full((32,), -1, device=DEV)
    s, n, m = class_means(emb, lab, 3, backend="triton")
    assert n.sum() == 0 and s.abs().sum() == 0 and m.abs().sum() == 0
    lab = torch.randint(0, 3, (32,), device=DEV)
    a = class_means(emb, lab, 3, backend="triton")[0]
    b = class_means(emb, lab, 3, backend="triton")[0]
    assert torch.equal(a, b)  # no float atomics: bitwise reproducible


# --- samplers --------------------------------------------------------------------------------
@pytest.mark.interpret
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_hard_query_sampler_bit_identical(seed):
    C, P, Q = 6, 300, 37
    lab = _labels(P, C)
    lab[lab == 4] = -1                               # an absent class
    hard = torch.rand(P) < 0.5
    hard[lab == 2] = False                           # a present class without hard pixels
    ref = sample_hard_queries(lab, hard, C, Q, seed, backend="reference")
    got = sample_hard_queries(lab.to(DEV), hard.to(DEV), C, Q, seed, backend="triton").cpu()
    assert torch.equal(got, ref)
    assert (ref[2] == -1).all() and (ref[4] == -1).all()
    for c in (0, 1, 3, 5):
        assert bool((lab[ref[c].long()] == c).all() and hard[ref[c].long()].all())


def test_hard_query_sampler_is_uniform():
    """Queries are uniform with replacement over the hard pixels of their class: chi-square over
    the 40 hard pixels of class 1 inside its two-sided band (39 dof: 17.26 .. 72.05, the 0.001
    and 0.999 quantiles; fixed seed), so a too-even sampler fails as well as a biased one."""
    C, P, Q = 3, 200, 20000
    lab = torch.arange(P) % C
    hard = torch.zeros(P, dtype=torch.bool)
    hard[(lab == 1).nonzero()[:40, 0]] = True
    q = sample_hard_queries(lab, hard, C, Q, 11, backend="reference")[1].long()
    counts = torch.bincount(q, minlength=P)[hard].double()
    assert counts.sum() == Q and counts.numel() == 40
    chi2 = ((counts - Q / 40) ** 2 / (Q / 40)).sum().item()
    assert 17.26 < chi2 < 72.05
    assert len(torch.unique(q)) == 40            # with replacement, all 40 seen


@pytest.mark.interpret
@pytest.mark.parametrize("seed", [1, 99])
def test_negative_sampler_bit_identical(seed):
    C, P, N = 7, 400, 45
    lab = _labels(P, C)
    lab[lab == 5] = -1
    means = torch.randn(C, 6)
    cdf = cm.relation_cdf(means, torch.bincount(lab[lab >= 0], minlength=C) > 0, 0.5)
    row_class = torch.tensor([0, 1, 2, 3, -1, 5, 6, 0, 2])
    ref = sample_negatives(row_class, cdf, lab, N, seed, backend="reference")
    got = sample_negatives(row_class.to(DEV), cdf.to(DEV), lab.to(DEV), N, seed,
                           backend="triton").cpu()
    assert torch.equal(got, ref)
    assert (ref[4] == -1).all() and (ref[5] == -1).all()        # no class / absent class
    for r, c in enumerate(row_class.tolist()):
        if c in (0, 1, 2, 3, 6):
            cls = lab[ref[r].long()]
            assert bool((cls >= 0).all() and (cls != c).all() and (cls != 5).all())


def test_negative_class_frequencies_follow_relation_softmax():
    """Negative classes ~ softmax_{j != c}(cos(m_c, m_j) / t): chi-square of 200k draws against
    the exact probabilities (4 dof, two-sided band 0.091 .. 18.47 at p = 0.001, fixed seed);
    pixels uniform within a class (chi-square over class 3's 60 pixels, 59 dof, 31.02 .. 98.32)."""
    C, t = 5, 0.5
    lab = torch.arange(300) % C
    means = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.1], [0.3, -1.0]])
    cdf = cm.relation_cdf(means, torch.ones(C, dtype=torch.bool), t)
    R, N = 400, 500
    neg = sample_negatives(torch.zeros(R, dtype=torch.long), cdf, lab, N, 5,
                           backend="reference").long().flatten()
    freq = torch.bincount(lab[neg], minlength=C).double()
    mn = cm.normalize(means.double())
    p = torch.softmax((mn[0] @ mn[1:].T) / t, dim=0)
    assert freq[0] == 0
    expected = p * R * N
    chi2 = ((freq[1:] - expected) ** 2 / expected).sum().item()
    assert 0.091 < chi2 < 18.47
    pix3 = neg[lab[neg] == 3]
    counts = torch.bincount(pix3, minlength=300)[lab == 3].double()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert 31.02 < chi2 < 98.32


def test_relation_cdf_edge_cases():
    means = torch.randn(4, 3)
    # one present class: no negatives at all
    cdf = cm.relation_cdf(means, torch.tensor([True, False, False, False]), 0.5)
    assert (cdf == 0).all()
    # two present classes: all mass on the other one
    cdf = cm.relation_cdf(means, torch.tensor([True, False, True, False]), 0.5)
    assert cdf[0].tolist() == [0, 0, 2**32, 2**32] and cdf[2].tolist() == [2**32] * 4
    assert (cdf[1] == 0).all()


# --- sparse InfoNCE --------------------------------------------------------------------------
def _infonce_case(dtype, M=9, N=70, shape=(2, 37, 5, 7), R=4, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    B, D, h, w = shape
    P = B * h * w
    emb = torch.randn(shape, generator=g).to(dtype)
    pos = torch.randn(R, D, generator=g, dtype=torch.promote_types(dtype, torch.float32))
    q = torch.randint(0, P, (M,), generator=g)
    q[M // 2] = -1
    p = torch.randint(0, R, (M,), generator=g)
    neg = torch.randint(-1, P, (M, N), generator=g)
    neg[0] = -1                                  # a query with no negative at all
    return emb, pos, q, p, neg


FUSED = [pytest.param("triton", marks=pytest.mark.interpret),
         pytest.param("native", marks=pytest.mark.skipif(not pixcon.HAS_C, reason="not built"))]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key_grad", [False, True])
def test_sparse_infonce_matches_reference(dtype, key_grad, fused):
    """Triton kernels (GPU, or the interpreter) and the compiled CPU kernels ("native")."""
    emb, pos, q, p, neg = _infonce_case(dtype)
    gout = torch.randn(q.shape[0], dtype=pos.dtype)
    res = {}
    for be, dev in (("reference", "cpu"), (fused, DEV if fused == "triton" else "cpu")):
        e = emb.to(dev).requires_grad_()
        ps = pos.to(dev).requires_grad_()
        loss = sparse_infonce(e, q.to(dev), p.to(dev), neg.to(dev), temperature=0.3,
                              pos_pool=ps, key_grad=key_grad, backend=be)
        grads = torch.autograd.grad(loss, [e, ps], gout.to(dev), allow_unused=True)
        res[be] = loss, grads
    (l_ref, (ge_ref, gp_ref)), (l, (ge, gp)) = res["reference"], res[fused]
    # both compute in float32 (float64) from the same input values; the tolerances cover the
    # summation order of D = 37 products and one exp/log (fp32: ~1e-6 relative)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close(l, l_ref, rtol=tol, atol=tol, what="loss")
    assert l_ref[q.shape[0] // 2] == 0 and l[q.shape[0] // 2] == 0
    # the gradient is rounded to emb's dtype at the end: one rounding of half/bfloat16
    gtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, tol)
    assert_close(ge, ge_ref, rtol=gtol, atol=gtol * 0.1, what="d emb")
    if key_grad:
        assert_close(gp, gp_ref, rtol=tol, atol=tol, what="d pos")
    else:
        assert gp is None or gp.abs().sum() == 0


@pytest.mark.interpret
def test_sparse_infonce_float64_gradcheck():
    emb, pos, q, p, neg = _infonce_case(torch.float64, M=4, N=5, shape=(1, 3, 2, 3), R=2)
    emb = emb.to(DEV).requires_grad_()
    pos = pos.to(DEV).requires_grad_()
    for be in ("reference", "triton"):
        def f(e, ps):
            return sparse_infonce(e, q.to(DEV), p.to(DEV), neg.to(DEV), temperature=0.5,
                                  pos_pool=ps, key_grad=True, backend=be)
        assert torch.autograd.gradcheck(f, (emb, pos), fast_mode=True)


@pytest.mark.interpret
def test_opcheck_registered_ops(triton_kernels):
    emb, pos, q, p, neg = _infonce_case(torch.float64, M=4, N=6, shape=(1, 5, 3, 3))
    emb, pos, q, p, neg = (t.to(DEV) for t in (emb, pos, q, p, neg))
    torch.library.opcheck(lib.sparse_infonce,
                          (emb.requires_grad_(), pos, q, p, neg, 0.5, False, False))
    torch.library.opcheck(lib.sparse_infonce,
                          (emb, pos.requires_grad_(), q, p, neg, 0.5, True, False))
    lab = torch.randint(-1, 3, (9,), device=DEV)
    torch.library.opcheck(lib.class_sums, (emb.detach(), lab, 3))
    order, off, cnt = cm.group_by_class(lab, 3)
    torch.library.opcheck(lib.sample_in_groups, (order, off, cnt, torch.arange(3, device=DEV),
                                                 5, 11, 1))
    cdf = cm.relation_cdf(torch.randn(3, 2, device=DEV), cnt > 0, 0.5)
    torch.library.opcheck(lib.sample_negatives, (torch.tensor([0, 2, -1], device=DEV), cdf,
                                                 order, off, cnt, 4, 11, 2))


def test_sparse_infonce_loss_value_by_hand():
    # query (1, 0); positive (2, 0): cos 1; negatives (0, 3) and (-1, 0): cos 0 and -1; t = 0.5
    pool = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    pos = torch.tensor([[2.0, 0.0]])
    loss = sparse_infonce(pool, torch.tensor([0]), torch.tensor([0]), torch.tensor([[1, 2]]),
                          temperature=0.5, pos_pool=pos, backend="reference")
    want = math.log(math.exp(2) + math.exp(0) + math.exp(-2)) - 2
    assert abs(loss.item() - want) < 1e-6


# --- bad input -------------------------------------------------------------------------------
def _si_args():
    emb, pos, q, p, neg = _infonce_case(torch.float32)
    return dict(pool=emb, q_idx=q, pos_idx=p, neg_idx=neg, temperature=0.5, pos_pool=pos)


PRIM_BAD = [
    ("pool rank", lambda a: a.update(pool=a["pool"][0]), ValueError, "pool must have"),
    ("pool dtype", lambda a: a.update(pool=a["pool"].long()), TypeError, "pool must have dtype"),
    ("q_idx dtype", lambda a: a.update(q_idx=a["q_idx"].float()), TypeError, "q_idx must have dtype"),
    ("neg rank", lambda a: a.update(neg_idx=a["neg_idx"][0]), ValueError, "neg_idx must have 2"),
    ("rows", lambda a: a.update(pos_idx=a["pos_idx"][:3]), ValueError, "same number of rows"),
    ("pos D", lambda a: a.update(pos_pool=a["pos_pool"][:, :5]), ValueError, "pos_pool rows must"),
    ("temperature", lambda a: a.update(temperature=-1.0), ValueError, "temperature must be"),
    ("device", lambda a: a.update(q_idx=torch.empty(9, dtype=torch.long, device="meta")),
     ValueError, "q_idx is on meta"),
    ("q range", lambda a: a["q_idx"].__setitem__(0, a["pool"].numel()), ValueError,
     r"q_idx must hold row indices of pool in \[-1, \d+\)"),
    ("neg range", lambda a: a["neg_idx"].__setitem__((1, 2), -2), ValueError,
     r"neg_idx must hold row indices of pool .* found -2"),
    ("pos range", lambda a: a["pos_idx"].__setitem__(0, a["pos_pool"].shape[0]), ValueError,
     r"pos_idx must hold row indices of pos_pool"),
]


@pytest.mark.parametrize("name,edit,exc,msg", PRIM_BAD, ids=[b[0] for b in PRIM_BAD])
def test_sparse_infonce_bad_input(name, edit, exc, msg):
    a = _si_args()
    edit(a)
    pool = a.pop("pool")
    with pytest.raises(exc, match=msg):
        sparse_infonce(pool, a.pop("q_idx"), a.pop("pos_idx"), a.pop("neg_idx"),
                       backend="reference", **a)


def test_other_primitives_bad_input():
    emb = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"labels must have one entry per pixel row \(18\)"):
        class_means(emb, torch.zeros(17, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        class_means(emb, torch.zeros(18, dtype=torch.long), 0)
    lab = torch.zeros(18, dtype=torch.long)
    with pytest.raises(ValueError, match="hard must have the shape of lab"):
        sample_hard_queries(lab, torch.ones(17, dtype=torch.bool), 3, 4, 0)
    with pytest.raises(TypeError, match="hard must have dtype"):
        sample_hard_queries(lab, torch.ones(18), 3, 4, 0)
    with pytest.raises(ValueError, match="cdf must be square"):
        sample_negatives(torch.zeros(2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long),
                         lab, 4, 0)
    with pytest.raises(TypeError, match="cdf must have dtype"):
        sample_negatives(torch.zeros(2, dtype=torch.long), torch.zeros(3, 3), lab, 4, 0)


def test_sparse_infonce_range_check_without_value_checks():
    """With check_values=False (the default on CUDA tensors) the host check with its message
    gives way to a device-side assert, which still stops the call before any gather reads
    past the pool (issue 30: an index is guarded whatever check_values says)."""
    a = _si_args()
    a["q_idx"][0] = 10**6
    pool = a.pop("pool")
    with pytest.raises(RuntimeError, match="q_idx holds an index outside"):
        sparse_infonce(pool, a.pop("q_idx"), a.pop("pos_idx"), a.pop("neg_idx"),
                       backend="reference", check_values=False, **a)


@pytest.mark.skipif(not pixcon.HAS_C, reason="needs the compiled extension")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "w1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_scatter_rows_cpu_kernel_equals_its_torch_kernel(layout, dtype):
    """pixcon::scatter_rows: the compiled CPU kernel (pixel order within channel planes) against
    the op's torch code, with repeated pixels (summed), -1 rows (skipped), the map's strides
    kept; and opcheck."""
    from pixcon.ops import _library as L
    g = torch.Generator().manual_seed(5)
    like = torch.randn(3, 5, 4, 1 if layout == "w1" else 6, generator=g)
    if layout == "channels_last":
        like = like.to(memory_format=torch.channels_last)
    P = 3 * 4 * like.shape[3]
    idx = torch.randint(-1, P, (60,), generator=g)
    idx[:5] = idx[5]                                       # one pixel five times more
    rows = torch.randn(60, 5, generator=g, dtype=torch.float64).to(dtype)
    got = L.scatter_rows(rows, idx, like)
    want = L._add_query_grads(torch.zeros_like(like, dtype=dtype), rows, idx, like)
    assert got.dtype == dtype and got.stride() == like.stride()
    tol = 1e-12 if dtype == torch.float64 else 2e-3
    assert torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
    torch.library.opcheck(L.scatter_rows, (rows, idx, like))


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not pixcon.HAS_C, reason="pixcon._C not built"))])
def test_group_sampler_at_the_smallest_groupings(backend):
    """sample_in_groups where the grouping is smallest: one item in all (its group always
    draws it, the others -1), empty groups at the end of the order (their offset is the
    order's length), and a row without a group."""
    from pixcon.ops.primitives import sample_in_groups
    order = torch.tensor([7])
    offsets, counts = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 0])
    rows = torch.tensor([1, 0, 2, 3, -1, 1])
    got = sample_in_groups(order, offsets, counts, rows, 3, 5, 1, backend=backend)
    assert got.tolist() == [[7] * 3, [-1] * 3, [-1] * 3, [-1] * 3, [-1] * 3, [7] * 3]
    order = torch.tensor([4, 2, 9])
    offsets, counts = torch.tensor([0, 2, 3, 3]), torch.tensor([2, 1, 0, 0])
    got = sample_in_groups(order, offsets, counts, torch.tensor([3, 1, 0, 2]), 40, 6, 2,
                           backend=backend)
    assert got[0].tolist() == [-1] * 40 and got[1].tolist() == [9] * 40
    assert set(got[2].tolist()) == {4, 2} and got[3].tolist() == [-1] * 40


def test_group_by_class_has_one_entry_per_class():
    """group_by_class: C offsets and C counts (the ignored pixels, last in the order, are no
    group), by hand."""
    from pixcon.core.common import group_by_class
    order, offsets, counts = group_by_class(torch.tensor([2, -1, 0, 2, -1, 1]), 4)
    assert order.tolist() == [2, 5, 0, 3, 1, 4]
    assert offsets.tolist() == [0, 1, 2, 4] and counts.tolist() == [1, 1, 2, 0]
