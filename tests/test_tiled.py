"""The op pixcon::tiled_contrast (ContrastiveSeg, dense, CAC) on its CPU kernel
(csrc/cpu/tiled.cpp): opcheck, parity with the reference at tile boundaries and in degenerate
batches, the one rule by which it picks its thread count (tested at its boundary), and the same
bits on any number of threads.

Tolerances: float64 1e-12 (the same formula summed in another order: tile merges of an online
log-sum-exp); float32 1e-5 relative (the vectorised exp is within 2 ulp of expf, one LSE merge
per 4096-key chunk)."""
import pytest
import torch
import torch.nn.functional as F

import pixcon
from pixcon.ops import _library, supervised_contrast
from pixcon.ops.tiled import PARALLEL_WORK
from pixcon.reference import contrastiveseg as ref

from .conftest import assert_close, triton_device

native = pytest.mark.skipif(not pixcon.HAS_C, reason="needs the compiled extension")


def rows(M, D, C, seed, dtype=torch.float64, absent=True):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    y = torch.randint(-1 if absent else 0, C, (M,), generator=g)
    return a, y


@native
def test_opcheck_cpu_kernel():
    a, y = rows(30, 8, 3, 0, torch.float32)
    k, yk = rows(41, 8, 4, 1, torch.float32, absent=False)
    for args in ((a.clone().requires_grad_(), y, k, yk, 0.1, True, []),
                 (a.clone().requires_grad_(), y, None, None, 0.2, True, [7, 5]),
                 (a, y, k.clone().requires_grad_(), yk, 0.1, False, [])):
        torch.library.opcheck(_library.tiled_contrast_op, args)


@native
@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("block", [None, (5, 3), (16, 37), (512, 2048)])
def test_matches_reference_at_tile_boundaries(seed, block):
    """Odd sizes, absent rows (-1), unsorted labels, keys with gradient, grad of NL too."""
    a, y = rows(53, 6, 4, seed)
    k, yk = rows(67, 6, 5, seed + 10)
    for keys, key_labels in ((None, None), (k, yk)):
        ins = [a.clone().requires_grad_()] + ([] if keys is None else [keys.clone().requires_grad_()])
        kk = None if keys is None else ins[1]
        out = supervised_contrast(ins[0], y, kk, key_labels, temperature=0.3, backend="native",
                                  block=block, with_lse=True)
        want = supervised_contrast(ins[0], y, kk, key_labels, temperature=0.3,
                                   backend="reference", with_lse=True)
        assert torch.equal(out[1], want[1])
        assert_close(out[0], want[0], rtol=1e-12, atol=1e-12, what=f"terms {block}")
        fin = torch.isfinite(want[2])                    # -inf: absent rows, no negative
        assert torch.equal(torch.isfinite(out[2]), fin)
        assert_close(out[2][fin], want[2][fin], rtol=1e-12, atol=1e-12, what=f"NL {block}")
        gt, gnl = torch.randn(53, dtype=torch.float64), torch.randn(53, dtype=torch.float64)

        def obj(o):
            nl = torch.where(torch.isfinite(o[2]), o[2], 0.0)
            return (gt * o[0]).sum() + (gnl * nl).sum()
        g1 = torch.autograd.grad(obj(out), ins)
        g0 = torch.autograd.grad(obj(want), ins)
        for x, w in zip(g1, g0):
            assert_close(x, w, rtol=1e-10, atol=1e-12, what=f"grad {block}")


@native
@pytest.mark.parametrize("case", ["all_absent", "one_class", "no_positive"])
def test_degenerate_batches(case):
    a, y = rows(20, 5, 3, 7)
    if case == "all_absent":
        y = torch.full_like(y, -1)
    elif case == "one_class":
        y = torch.zeros_like(y)                 # positives only: NL = -inf, terms 0
    else:
        y = torch.arange(20)                    # every label once: no positive in-batch
    x = a.clone().requires_grad_()
    t1, n1 = supervised_contrast(x, y, temperature=0.1, backend="native")
    t0, n0 = supervised_contrast(a, y, temperature=0.1, backend="reference")
    assert torch.equal(n1, n0)
    assert_close(t1, t0, rtol=1e-12, atol=1e-12, what=case)
    g, = torch.autograd.grad(t1.sum(), x)        # connected, finite, zero
    assert torch.isfinite(g).all() and not g.abs().sum()


@native
def test_float32_against_float64():
    a, y = rows(300, 32, 6, 11)
    k, yk = rows(700, 32, 6, 12, absent=False)
    t64, _ = supervised_contrast(a, y, k, yk, temperature=0.07, backend="native")
    t32, _ = supervised_contrast(a.float(), y, k.float(), yk, temperature=0.07, backend="native")
    assert t32.dtype == torch.float32
    assert_close(t32.double(), t64, rtol=1e-5, atol=1e-6, what="fp32 terms")


@native
def test_thread_rule_at_its_boundary():
    """One thread below PARALLEL_WORK multiply-adds, then min(threads, items, pixcon's cap)."""
    rule = torch.ops.pixcon.tiled_threads
    old, cap = torch.get_num_threads(), pixcon.get_num_threads()
    try:
        torch.set_num_threads(2)
        pixcon.set_num_threads(None)
        assert rule(PARALLEL_WORK - 1, 100) == 1
        assert rule(PARALLEL_WORK, 100) == 2
        assert rule(PARALLEL_WORK, 1) == 1               # one item: one thread
        pixcon.set_num_threads(1)
        assert rule(PARALLEL_WORK, 100) == 1
        torch.set_num_threads(1)
        pixcon.set_num_threads(None)
        assert rule(10 * PARALLEL_WORK, 100) == 1
    finally:
        torch.set_num_threads(old)
        pixcon.set_num_threads(cap)


@native
@pytest.mark.parametrize("M, K, D", [(2100, None, 32), (2100, 2300, 32), (600, 20000, 32),
                                     (300, 70000, 64)])
def test_same_bits_on_one_and_two_threads(M, K, D):
    """Above the rule's boundary the passes run on two threads with items claimed in any order;
    partial results merge in a fixed order, so loss and gradients are bitwise those of one
    thread. The backward's key-gradient slabs (tiled.cpp kPartialBytes): one per anchor tile
    (in-batch, 2,300 keys), groups of tiles (20,000 keys: 13 slabs for 16 tiles), and too
    large for two (70,000 keys x 64: the key pass that recomputes the logits). The gradients
    also match the float64 reference (fp32 sums over up to 70,000 keys: rtol 1e-4)."""
    keys = K is not None
    a, y = rows(M, D, 5, 21, torch.float32)
    k, yk = rows(K or 1, D, 5, 22, torch.float32, absent=False)
    assert M * (K or M) * D >= PARALLEL_WORK
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ins = [a.clone().requires_grad_()] + ([k.clone().requires_grad_()] if keys else [])
            t, _, nl = supervised_contrast(ins[0], y, ins[1] if keys else None,
                                           yk if keys else None, temperature=0.1,
                                           backend="native", with_lse=True)
            grads = torch.autograd.grad(t.sum(), ins)
            outs.append((t, nl, grads))
    finally:
        torch.set_num_threads(old)
    (t1, nl1, g1), (t2, nl2, g2) = outs
    assert torch.equal(t1, t2) and torch.equal(nl1, nl2)
    assert all(torch.equal(x, z) for x, z in zip(g1, g2))
    ins = [a.double().requires_grad_()] + ([k.double().requires_grad_()] if keys else [])
    t0, _ = supervised_contrast(ins[0], y, ins[1] if keys else None, yk if keys else None,
                                temperature=0.1, backend="reference")
    for x, w in zip(g1, torch.autograd.grad(t0.sum(), ins)):
        assert_close(x.double(), w, rtol=1e-4, atol=1e-6, what="grad against the reference")


@native
def test_sorted_rows_are_not_copied_and_match_unsorted():
    """A bank sorted by label (and the dense mode's sorted pixels) takes the no-copy path; the
    result equals that of the same rows shuffled."""
    a, y = rows(80, 8, 4, 31)
    k, yk = rows(120, 8, 4, 32, absent=False)
    order = torch.argsort(yk, stable=True)
    ks, yks = k[order], yk[order]
    t1, _ = supervised_contrast(a, y, ks, yks, temperature=0.2, backend="native")
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    t2, _ = supervised_contrast(a, y, ks[perm], yks[perm], temperature=0.2, backend="native")
    assert_close(t1, t2, rtol=1e-12, atol=1e-13, what="sorted vs shuffled keys")
    t0, _ = ref.contrast_terms(a, y, ks, yks, temperature=0.2)
    assert_close(t1, t0, rtol=1e-12, atol=1e-12, what="vs reference")


@native
@pytest.mark.parametrize("block", [(16, 512), (8, 1000)])
def test_keys_over_several_chunks(block):
    """Items of one anchor tile x 4096 (4000) keys: with 9000 keys of 3 classes every class's
    positives and negatives span several chunks, whose partial log-sum-exps and positive sums
    are merged."""
    a, y = rows(37, 4, 3, 41)
    k, yk = rows(9000, 4, 3, 42, absent=False)
    kk = k.clone().requires_grad_()
    t1, n1, nl1 = supervised_contrast(a, y, kk, yk, temperature=0.5, backend="native",
                                      block=block, with_lse=True)
    t0, n0, nl0 = supervised_contrast(a, y, k, yk, temperature=0.5, backend="reference",
                                      with_lse=True)
    assert torch.equal(n1, n0)
    assert_close(t1, t0, rtol=1e-12, atol=1e-12, what="terms over chunks")
    fin = torch.isfinite(nl0)
    assert_close(nl1[fin], nl0[fin], rtol=1e-12, atol=1e-12, what="NL over chunks")
    g1, = torch.autograd.grad(t1.sum(), kk)
    kr = k.clone().requires_grad_()
    g0, = torch.autograd.grad(supervised_contrast(a, y, kr, yk, temperature=0.5,
                                                  backend="reference")[0].sum(), kr)
    assert_close(g1, g0, rtol=1e-10, atol=1e-12, what="key grad over chunks")


# --- the Triton kernels (pixcon_kernels.tiled), under the interpreter on CPU ------------------
@pytest.mark.interpret
@pytest.mark.parametrize("D", [6, 300])
@pytest.mark.parametrize("in_batch", [True, False])
def test_triton_splits_and_d_blocks(D, in_batch):
    """Keys split across programs (in the GPU configuration: 167 keys in 32-key tiles against
    one anchor tile give 6 splits; the key-gradient kernel 2 anchor splits), D = 300 in two
    gradient D blocks; loss, NL and gradients against the reference, and a repeat bitwise
    equal (partials merged in a fixed order)."""
    dev = triton_device()
    a, y = rows(53, D, 4, 51, torch.float32)
    k, yk = rows(167, D, 5, 52, torch.float32)
    a, y, k, yk = a.to(dev), y.to(dev), k.to(dev), yk.to(dev)
    keys, key_labels = (None, None) if in_batch else (k, yk)

    def go(backend):
        ins = [a.clone().requires_grad_()] + ([] if in_batch else [k.clone().requires_grad_()])
        t, n, nl = supervised_contrast(ins[0], y, None if in_batch else ins[1], key_labels,
                                       temperature=0.2, backend=backend, with_lse=True)
        fin = torch.isfinite(nl)
        gt = torch.linspace(-1, 1, 53, device=dev)
        grads = torch.autograd.grad((gt * t).sum() + torch.where(fin, nl, 0.0).sum(), ins)
        return t, n, nl, grads

    t1, n1, nl1, g1 = go("triton")
    t2, _, nl2, g2 = go("triton")
    t0, n0, nl0, g0 = go("reference")
    assert torch.equal(n1.cpu(), n0.cpu())
    assert_close(t1.cpu(), t0.cpu(), rtol=1e-5, atol=1e-6, what="triton terms")
    fin = torch.isfinite(nl0)
    assert torch.equal(torch.isfinite(nl1), fin)
    assert_close(nl1[fin].cpu(), nl0[fin].cpu(), rtol=1e-5, atol=1e-6, what="triton NL")
    for x, w in zip(g1, g0):
        assert_close(x.cpu(), w.cpu(), rtol=1e-4, atol=1e-5, what="triton grad")
    assert torch.equal(t1, t2) and torch.equal(nl1, nl2)
    assert all(torch.equal(x, z) for x, z in zip(g1, g2))


@pytest.mark.interpret
def test_triton_split_plan():
    """The GPU configuration splits the keys until tiles x splits reach about four programs per
    SM (whole key tiles per split); the interpreter's own configuration does not split."""
    from pixcon_kernels import tiled
    import os
    old = os.environ.get("PIXCON_LAUNCH_CONFIG")
    try:
        os.environ["PIXCON_LAUNCH_CONFIG"] = "gpu"
        S, per = tiled._splits(16, 190000, 32)              # the bank: 16 anchor tiles
        assert (S, per) == (33, 5760)                        # 16 x 33 = 528 = 4 x 132 SMs
        assert S * per >= 190000 > (S - 1) * per
        assert tiled._splits(4096, 131072, 32)[0] == 1      # dense: enough anchor tiles
        assert tiled._splits(1, 40, 32) == (2, 32)          # never more splits than tiles
        os.environ["PIXCON_LAUNCH_CONFIG"] = "interpreter"
        assert tiled._splits(16, 190000, 64)[0] == 1
    finally:
        if old is None:
            os.environ.pop("PIXCON_LAUNCH_CONFIG", None)
        else:
            os.environ["PIXCON_LAUNCH_CONFIG"] = old
    assert tiled._d_block(128) == 128 and tiled._d_block(256) == 256
    assert tiled._d_block(512) == 256 and tiled._d_block(40) == 64


# --- precision= (opt-in tensor-core products for fp32 rows) ------------------------------------
@pytest.mark.interpret
@pytest.mark.parametrize("precision, u", [("tf32", 2.0 ** -10), ("bf16", 2.0 ** -8)])
def test_triton_precision_within_its_stated_bound(precision, u):
    """precision="tf32" / "bf16" on the Triton kernels (the interpreter cuts the operands' bits
    as the GPU does: TF32 truncated to 10 stored bits, its worst case, bf16 rounded to 7). Each
    operand moves by at most u relative (2^-10, 2^-8), so on unit rows a logit moves by at most
    eps = (2u + u^2) / t, NL (a log-sum-exp: 1-Lipschitz) by eps, a term (softplus of
    NL - s) by 2 eps; + 2e-5 for fp32 sums in another order. The gradients' weights
    e^{s - NL} move by a factor within e^{+-2 eps} and each product by 2u more: norm-wise
    within 4 eps + 4u of the fp32 gradient here (no cancellation in these sums: measured
    at about a tenth of eps + 2u, the terms at 1-4% of their bound, on three seeds). The
    default stays at fp32 accuracy, and the opt-in is really taken: its error is ten times the
    default's at least."""
    dev = triton_device()
    t = 0.2
    a, y = rows(61, 48, 4, 71, torch.float32)
    k, yk = rows(150, 48, 5, 72, torch.float32)
    a, y, k, yk = a.to(dev), y.to(dev), k.to(dev), yk.to(dev)

    def go(backend, prec="fp32"):
        ins = [a.clone().requires_grad_(), k.clone().requires_grad_()]
        tm, n, nl = supervised_contrast(ins[0], y, ins[1], yk, temperature=t, backend=backend,
                                        with_lse=True, precision=prec)
        fin = torch.isfinite(nl)
        gt = torch.linspace(-1, 1, 61, device=dev)
        grads = torch.autograd.grad((gt * tm).sum() + torch.where(fin, nl, 0.0).sum(), ins)
        return tm.cpu().double(), nl.cpu().double(), [g.cpu().double() for g in grads]

    t0, nl0, g0 = go("reference")
    tf, nlf, gf = go("triton")
    tp, nlp, gp = go("triton", precision)
    eps = (2 * u + u * u) / t
    fin = torch.isfinite(nl0)
    assert torch.equal(torch.isfinite(nlp), fin)
    dnl = (nlp[fin] - nl0[fin]).abs().max().item()
    dterm = (tp - t0).abs().max().item()
    assert dnl <= eps + 2e-5 and dterm <= 2 * eps + 2e-5, (dnl, dterm, eps)
    assert dterm > 10 * (tf - t0).abs().max().item() + 1e-6, "the precision was not taken"
    for x, xf, w in zip(gp, gf, g0):
        rel = ((x - w).norm() / w.norm()).item()
        assert rel <= 4 * eps + 4 * u, (rel, eps)
        assert ((xf - w).norm() / w.norm()).item() < 1e-4


def test_precision_is_checked_and_the_cpu_kernel_multiplies_in_fp32():
    """A precision outside ("fp32", "tf32", "bf16") is an error naming it, on every loss that
    takes one; the CPU kernel and the reference compute in fp32 whatever it says (the same
    bits)."""
    from pixcon.ops import dense_contrast_loss, directional_contrast_loss, pixel_contrast_loss
    a, y = rows(40, 16, 3, 5, torch.float32)
    emb = torch.randn(2, 16, 5, 6)
    lab = torch.randint(0, 3, (2, 5, 6))
    calls = [lambda p: supervised_contrast(a, y, temperature=0.1, precision=p),
             lambda p: dense_contrast_loss(emb, lab, precision=p),
             lambda p: pixel_contrast_loss(emb, lab, lab, max_views=2, precision=p),
             lambda p: directional_contrast_loss(a, a, torch.randn(40, 3), torch.randn(40, 3),
                                                 a, y, precision=p)]
    for call in calls:
        with pytest.raises(ValueError, match="precision must be one of"):
            call("fp16")
    backends = ["reference"] + (["native"] if pixcon.HAS_C else [])
    for be in backends:
        want = supervised_contrast(a, y, temperature=0.1, backend=be)
        for p in ("tf32", "bf16"):
            got = supervised_contrast(a, y, temperature=0.1, backend=be, precision=p)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (be, p)
