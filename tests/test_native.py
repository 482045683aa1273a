"""The compiled CPU kernels (backend "native", csrc/cpu) against the reference: the same samples
bit for bit, whole ReCo losses and gradients, InfoNCE gradcheck with key gradients (its parity
with the reference is test_primitives.test_sparse_infonce_matches_reference[native]), results
independent of the thread count, opcheck, torch.compile, degenerate batches, backend names."""
import time
import warnings

import pytest
import torch

import pixcon
from pixcon.ops import (class_means, philox, reco_loss, sample_hard_queries, sample_negatives,
                        sparse_infonce)
from pixcon.reference import common as cm
from pixcon.synthetic import reco_batch

from .conftest import assert_close
from .test_primitives import _infonce_case, _labels
from .test_reco import CASES

pytestmark = pytest.mark.skipif(not pixcon.HAS_C, reason="pixcon._C not built")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _reco(case, backend, Q=8, N=24, mask=None, contiguous=True, gscale=2.5):
    B, D, h, w, C, present, scale, dtype, seed = case
    emb, labels, probs = reco_batch(B, D, h, w, num_classes=C, present=present,
                                    label_scale=scale, dtype=dtype, seed=seed % 1000)
    if not contiguous:
        emb = emb.to(memory_format=torch.channels_last)
    emb.requires_grad_()
    loss = reco_loss(emb, labels, probs, mask=mask, num_queries=Q, num_negatives=N, seed=seed,
                     backend=backend)
    g, = torch.autograd.grad(loss * gscale, emb)
    return loss.detach(), g


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[7]}-C{c[4]}".replace("torch.", ""))
def test_reco_native_matches_reference(case):
    l_ref, g_ref = _reco(case, "reference")
    l, g = _reco(case, "native")
    # the same samples; fp32 (fp64) arithmetic in another summation order: ~1e-6 relative;
    # gradients rounded once to emb's dtype at the end
    tol = 1e-10 if case[7] == torch.float64 else 1e-5
    assert_close(l, l_ref, rtol=tol, atol=tol, what="loss")
    gtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(case[7], tol)
    assert_close(g, g_ref, rtol=gtol, atol=gtol * 1e-2, what="d emb")
    assert g.dtype == case[7] and l.item() > 0


def test_reco_native_fresh_seed_mask_channels_last():
    seed = int(time.time_ns() % (2**62))
    mask = torch.rand(2, 14, 18, generator=torch.Generator().manual_seed(seed)) > 0.3
    case = (2, 20, 7, 9, 6, 5, 2, torch.float32, seed)
    l_ref, g_ref = _reco(case, "reference", Q=6, N=10, mask=mask)
    l, g = _reco(case, "native", Q=6, N=10, mask=mask, contiguous=False)
    assert_close(l, l_ref, rtol=1e-5, atol=1e-5, what=f"loss (seed {seed})")
    assert_close(g, g_ref, rtol=1e-5, atol=1e-7, what=f"d emb (seed {seed})")


def test_channels_last_embedding_gets_its_gradient_in_its_own_layout():
    """The query gradients are scattered into a tensor of the embedding's own layout, which
    autograd can keep as .grad; one of another layout it copies (4 bytes x B x D x h x w, a
    quarter of the step at the VOC setting)."""
    emb, labels, probs = reco_batch(2, 16, 9, 11, num_classes=5, present=4, seed=3)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        e = emb.contiguous(memory_format=fmt).requires_grad_()
        loss = reco_loss(e, labels, probs, backend="native", seed=0, num_queries=8,
                         num_negatives=12)
        (g,) = torch.autograd.grad(loss, e)             # as the op's backward made it
        assert g.is_contiguous(memory_format=fmt), fmt
        grads.append(g)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("seed", [0, 7, 2**62 + 5])
def test_samplers_bit_identical(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    C, P = 9, 500
    lab = _labels(P, C, gen=g)
    lab[lab == 4] = -1                                         # an absent class
    hard = torch.rand(P, generator=g) < 0.6
    q = {be: sample_hard_queries(lab, hard, C, 37, seed, backend=be)
         for be in ("reference", "native")}
    assert torch.equal(q["native"], q["reference"])
    means = torch.randn(C, 5, generator=g)
    present = torch.bincount(lab.clamp(min=0), minlength=C) > 0
    present[4] = False
    cdf = cm.relation_cdf(means, present, 0.5)
    row_class = torch.arange(C).repeat_interleave(3)
    row_class[::4] = -1
    n = {be: sample_negatives(row_class, cdf, lab, 53, seed, backend=be)
         for be in ("reference", "native")}
    assert torch.equal(n["native"], n["reference"])
    assert (n["native"] >= 0).any() and (n["native"] == -1).any()
    c = torch.arange(1000)
    assert torch.equal(philox(c, seed, 3, backend="native"), philox(c, seed, 3,
                                                                     backend="reference"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_means_native(dtype):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 37, 9, 11, generator=g).to(dtype)
    lab = _labels(2 * 9 * 11, 5, gen=g)
    s_ref, n_ref, _ = class_means(emb, lab, 5, backend="reference")
    for x in (emb, emb.to(memory_format=torch.channels_last), cm.pixel_rows(emb)):
        s, n, m = class_means(x, lab, 5, backend="native")
        assert torch.equal(n, n_ref)
        assert_close(s, s_ref, rtol=1e-5, atol=1e-5, what="class sums")
        assert s.dtype == s_ref.dtype


def test_sparse_infonce_native_gradcheck():
    emb, pos, q, p, neg = _infonce_case(torch.float64, M=4, N=5, shape=(1, 3, 2, 3), R=2)
    emb.requires_grad_()
    pos.requires_grad_()

    def f(e, ps):
        return sparse_infonce(e, q, p, neg, temperature=0.5, pos_pool=ps, key_grad=True,
                              backend="native")
    assert torch.autograd.gradcheck(f, (emb, pos))


def test_thread_count_does_not_change_results():
    """Every native kernel gives bitwise the same result on 1 and 2 threads (draws depend on
    counters only; sums run in pixel order per channel block; queries are independent)."""
    case = (3, 33, 16, 17, 12, 9, 2, torch.float32, 11)
    old = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(_reco(case, "native", Q=64, N=128))
            emb, pos, q, p, neg = _infonce_case(torch.float32, M=40)
            e = emb.requires_grad_()
            loss = sparse_infonce(e, q, p, neg, temperature=0.3, pos_pool=pos, key_grad=True,
                                  backend="native")
            out.append((loss.detach(), torch.autograd.grad(loss.sum(), e)[0]))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(out[:2], out[2:]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_degenerate_batch_is_connected_zero():
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=4, present=4, seed=1)
    e = emb.requires_grad_()
    loss = reco_loss(e, torch.full_like(labels, 255), probs, backend="native", num_queries=4,
                     num_negatives=8)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    g, = torch.autograd.grad(loss, e)
    assert g.abs().sum() == 0


def test_opcheck_native_ops():
    """The one-name ops with their C++ CPU kernels: schema, fake, autograd (every op of the
    library on both kernels: tests/test_dispatch.py)."""
    emb, pos, q, p, neg = _infonce_case(torch.float64, M=4, N=6, shape=(1, 5, 3, 3))
    ops = torch.ops.pixcon
    torch.library.opcheck(ops.sparse_infonce.default,
                          (emb.requires_grad_(), pos, q, p, neg, 0.5, False, True))
    torch.library.opcheck(ops.sparse_infonce.default,
                          (emb, pos.requires_grad_(), q, p, neg, 0.5, True, False))
    lab = _labels(9, 3)
    torch.library.opcheck(ops.class_sums.default, (emb.detach(), lab, 3))
    order, offsets, counts = cm.group_by_class(lab, 3)
    torch.library.opcheck(ops.sample_in_groups.default,
                          (order, offsets, counts, torch.arange(3), 5, 1, 1))


def test_thread_cap_keeps_results_and_round_trips():
    """pixcon.set_num_threads caps the compiled kernels only; results are bitwise the same
    capped at 1 and uncapped (2 threads); PIXCON_NUM_THREADS sets it at import."""
    import subprocess
    import sys
    case = (3, 33, 16, 17, 12, 9, 2, torch.float32, 11)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        free = _reco(case, "native", Q=64, N=128)
        pixcon.set_num_threads(1)
        assert pixcon.get_num_threads() == 1
        capped = _reco(case, "native", Q=64, N=128)
        maps = torch.randint(0, 5, (3, 40, 50))
        d_capped = pixcon.ops.distance_transform(maps, labels=True)
    finally:
        pixcon.set_num_threads(None)
        torch.set_num_threads(old)
    assert pixcon.get_num_threads() is None
    assert torch.equal(free[0], capped[0]) and torch.equal(free[1], capped[1])
    assert torch.equal(pixcon.ops.distance_transform(maps, labels=True), d_capped)
    with pytest.raises(ValueError, match="pixcon.set_num_threads: n must be"):
        pixcon.set_num_threads(-1)
    code = "import pixcon; print(pixcon.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "PIXCON_NUM_THREADS": "1"})
    assert out.stdout.strip() == "1", out.stderr


def test_torch_compile_fullgraph_matches_eager():
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=4, present=4, seed=1)

    def step(e):
        return reco_loss(e, labels, probs, seed=7, backend="native", check_values=False,
                         num_queries=4, num_negatives=8)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    l1, l2 = step(e1), compiled(e2)
    assert_close(l2, l1, rtol=1e-6, atol=1e-6, what="compiled loss")
    assert_close(torch.autograd.grad(l2, e2)[0], torch.autograd.grad(l1, e1)[0], rtol=1e-6,
                 atol=1e-8, what="compiled grad")


def test_backend_names(monkeypatch):
    emb, labels, probs = reco_batch(2, 8, 6, 6, num_classes=4, present=4, seed=1)
    monkeypatch.delenv("PIXCON_BACKEND", raising=False)
    from pixcon.ops import _common
    assert _common.resolve_backend("auto", torch.device("cpu"), "x",
                                   ("reference", "triton", "native")) == "native"
    assert _common.resolve_backend("auto", torch.device("cpu"), "x") == "reference"
    with pytest.warns(DeprecationWarning, match="renamed 'native'"):
        be = _common.resolve_backend("cuda", torch.device("cpu"), "x",
                                     ("reference", "triton", "native"))
    assert be == "native"
    auto = reco_loss(emb, labels, probs, seed=3, num_queries=4, num_negatives=8)
    nat = reco_loss(emb, labels, probs, seed=3, num_queries=4, num_negatives=8, backend="native")
    assert torch.equal(auto, nat)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reco_loss(emb, labels, probs, seed=3, num_queries=4, num_negatives=8, backend="native")


@pytest.mark.parametrize("mib, offset", [(40, 1001), (40, 0), (1, 7)])
def test_zero_fill_zeroes_dirty_memory_and_nothing_around_it(mib, offset):
    """csrc/cpu/memory.h's zero_fill (the kernels' embedding-sized gradients start with it):
    above 32 MiB it discards the block's whole pages (MADV_DONTNEED) and memsets the partial
    pages at either end, below it memsets. On memory full of NaN, from a start that is not at a
    page boundary (offset floats in), every element reads back 0 and the floats just outside the
    tensor keep their NaN."""
    n = mib * 2**20 // 4
    base = torch.full((n + offset + 3000,), float("nan"))
    t = base[offset:offset + n]
    torch.ops.pixcon.zero_fill_(t)
    assert bool((t == 0).all())
    assert bool(base[:offset].isnan().all()) and bool(base[offset + n:].isnan().all())
