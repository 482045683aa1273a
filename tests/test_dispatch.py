"""One op, one name, a kernel per device (docs/design.md §1): every fused primitive is a single
``pixcon::`` op whose CPU kernel is C++ and whose CUDA kernel is Triton, the Triton kernels
serve CPU tensors only inside one scope, and a public loss chooses its backend once."""
import pytest
import torch

import pixcon
from pixcon.ops import _common, _library
from pixcon.reference import common as cm

from .test_primitives import _infonce_case, _labels

# The ops with a CPU kernel (C++, or Contextrast's Python tiles), and those that exist only as
# Triton kernels.
WITH_CPU = ("philox", "edt", "edt_exact", "class_sums", "sample_in_groups", "sample_negatives",
            "sample_anchors", "class_ranks", "group_columns", "bank_push", "sparse_infonce", "sparse_infonce_backward",
            "tiled_contrast", "tiled_contrast_backward", "inv_norms", "unit_class_sums",
            "unit_class_sums_backward", "anchor_contrast", "anchor_contrast_da",
            "anchor_contrast_dx")
TRITON_ONLY = ("edt_ragged", "rows_and_class_sums", "reco_infonce")


def _has_cpu(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pixcon::{name}", "CPU")


def test_every_triton_op_is_listed_once_and_has_a_cuda_kernel():
    names = [op._name for op in _library._TRITON_OPS]
    assert sorted(names) == sorted(WITH_CPU + TRITON_ONLY)
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pixcon::{name}", "CUDA"), name


def test_no_second_name_per_backend():
    """The old per-backend names are gone from the namespace (one schema per op)."""
    for old in ("philox4x32", "distance_transform", "class_sums_native",
                "sample_in_groups_native", "sample_negatives_native", "infonce_fwd_native",
                "infonce_bwd_native"):
        assert not hasattr(torch.ops.pixcon, old), old


@pytest.mark.skipif(not pixcon.HAS_C, reason="extension not built")
def test_cpu_kernels_and_the_scope_swaps_them_back():
    for name in WITH_CPU:
        assert _has_cpu(name), name
    for name in TRITON_ONLY:
        assert not _has_cpu(name), name
    counter = torch.arange(37)
    cpp = torch.ops.pixcon.philox(counter, 9, 2)
    with _library.triton_on_cpu():
        for name in WITH_CPU + TRITON_ONLY:
            assert _has_cpu(name), name
        assert _library.triton_here(counter.device) and not _library.compiled_cpu(counter.device)
        if _common.triton_usable(counter.device)[0]:
            assert torch.equal(torch.ops.pixcon.philox(counter, 9, 2), cpp)   # same bits
    for name in TRITON_ONLY:                         # the scope's registrations are gone
        assert not _has_cpu(name), name
    for name in WITH_CPU:                            # and the CPU kernels are back
        assert _has_cpu(name), name
    assert torch.equal(torch.ops.pixcon.philox(counter, 9, 2), cpp)
    x = torch.randn(1, 3, 2, 2)
    inv = torch.ops.pixcon.inv_norms(x)              # the Python CPU kernel, not the Triton one
    assert torch.equal(inv, 1.0 / x.square().sum(1).sqrt().reshape(-1).clamp(min=1e-8))


def _cases():
    emb, pos, q, p, neg = _infonce_case(torch.float64, M=4, N=6, shape=(1, 5, 3, 3))
    lab = _labels(9, 3)
    order, off, cnt = cm.group_by_class(lab, 3)
    cdf = cm.relation_cdf(torch.randn(3, 5, dtype=torch.float64), cnt > 0, 0.5)
    ops = torch.ops.pixcon
    return [
        (ops.philox.default, (torch.arange(11), 5, 1)),
        (ops.edt.default, ((torch.rand(2, 6, 7) < 0.4).to(torch.int32), 0, True)),
        (ops.edt_exact.default, ((torch.rand(2, 6, 7) < 0.4).to(torch.int32), 0)),
        (ops.class_sums.default, (emb.detach().clone().requires_grad_(), lab, 3)),
        (ops.sample_in_groups.default, (order, off, cnt, torch.arange(3), 5, 11, 1)),
        (ops.sample_negatives.default, (torch.tensor([0, 2, -1]), cdf, order, off, cnt, 4, 11, 2)),
        (ops.sample_anchors.default, (lab.view(1, 3, 3) - 1, lab.view(1, 3, 3).flip(-1), 6, 2, 4)),
        (ops.class_ranks.default, (torch.tensor([[0.2, 0.5, 0.2], [0.1, 0.1, 0.8]]),)),
        (ops.group_columns.default, (torch.tensor([[True, False], [True, True], [False, False]]),)),
        (ops.bank_push.default,                   # 9 rows into a 12-row bank, 2 classes
         (torch.zeros(12, 5, dtype=torch.float64), emb.detach()[0].reshape(5, 9).T.contiguous(),
          torch.tensor([[True, False] * 4 + [True], [False] * 8 + [True]]),
          torch.tensor([list(range(9)), [11] * 9]))),
        (ops.sparse_infonce.default,
         (emb.detach().clone().requires_grad_(), pos, q, p, neg, 0.5, False, False)),
        (ops.sparse_infonce.default,
         (emb.detach().clone(), pos.clone().requires_grad_(), q, p, neg, 0.5, True, False)),
        (ops.sparse_infonce.default,
         (emb.detach().clone().requires_grad_(), pos, q, p, neg, 0.5, False, True)),
    ]


@pytest.mark.skipif(not pixcon.HAS_C, reason="extension not built")
def test_opcheck_cpu_kernels():
    """Schema, fake kernel, autograd registration and dispatch of each op's C++ kernel (the
    InfoNCE forward also with its kept direction)."""
    for op, args in _cases():
        torch.library.opcheck(op, args)


@pytest.mark.interpret
def test_opcheck_triton_kernels_on_cpu():
    """The same ops, the same checks, with their Triton kernels (the interpreter's scope)."""
    if not _common.triton_usable(torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is not on")
    with _library.triton_on_cpu():
        for op, args in _cases():
            torch.library.opcheck(op, args)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_kernels_keep_the_same_direction(dtype, monkeypatch):
    """keep_direction on the Triton kernel (in its GPU launch configuration too: whole-row key
    tiles of 8 x 64) keeps what the C++ kernel keeps: each query's softmax-weighted mean unit
    key v and mean cosine cbar (zero for an absent query), and the backward made from them equals
    the one that recomputes the logits. Tolerance: fp32 sums of 64 products and one exp per key,
    in another order (~1e-6 relative)."""
    if not _common.triton_usable(torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is not on")
    emb, pos, q, p, neg = _infonce_case(dtype, M=7, N=19, shape=(2, 64, 3, 5))
    tol = 1e-11 if dtype == torch.float64 else 2e-6
    ops = torch.ops.pixcon
    want = ops.sparse_infonce(emb, pos, q, p, neg, 0.4, False, True) if pixcon.HAS_C else None
    for config in ("interpreter", "gpu"):
        monkeypatch.setenv("PIXCON_LAUNCH_CONFIG", config)
        with _library.triton_on_cpu():
            loss, lse, v, cbar = ops.sparse_infonce(emb, pos, q, p, neg, 0.4, False, True)
            e = emb.clone().requires_grad_()
            g_dir, = torch.autograd.grad(ops.sparse_infonce(e, pos, q, p, neg, 0.4, False, True)[0]
                                         .sum(), e)
            g_rec, = torch.autograd.grad(ops.sparse_infonce(e, pos, q, p, neg, 0.4, False, False)[0]
                                         .sum(), e)
        assert v.shape == (7, 64) and cbar.shape == (7,)
        assert v[7 // 2].abs().sum() == 0 and cbar[7 // 2] == 0 and loss[7 // 2] == 0
        assert torch.allclose(g_dir, g_rec, rtol=tol * 10, atol=tol)
        assert g_dir.abs().sum() > 0
        if want is not None:
            for got, ref, what in zip((loss, lse, v, cbar), want, ("loss", "lse", "v", "cbar")):
                assert torch.allclose(got, ref, rtol=tol * 10, atol=tol), what


def _loss_calls():
    """One call of each public loss on small inputs (tools.smoke's), backend "auto"."""
    from pixcon import ops
    from tools import smoke
    from pixcon.nn import UnreliableBank
    cpu = torch.device("cpu")
    r = smoke._reco_make(cpu, 0)
    cs = smoke._cs_make(cpu, 0)
    cx = smoke._contextrast_make(cpu, 0)
    cac = smoke._cac_make(cpu, 0)
    u = smoke._u2pl_make(cpu, 0)
    return {
        "reco": lambda: ops.reco_loss(r["emb"], r["labels"], r["probs"], num_queries=8,
                                      num_negatives=16, seed=5),
        "pixel_contrast": lambda: ops.pixel_contrast_loss(cs["emb"], cs["labels"], cs["pred"],
                                                          max_samples=40, max_views=6, seed=3),
        "dense": lambda: ops.dense_contrast_loss(cs["emb"], cs["labels"]),
        "pixel_anchor": lambda: ops.pixel_anchor_loss(cx["embs"], cx["labels"], cx["logits"],
                                                      layer_weights=(0.3, 1.0)),
        "bane": lambda: ops.bane_negatives(cx["labels"], cx["logits"], 5)[0],
        "cac": lambda: ops.directional_contrast_loss(cac["f1"], cac["f2"], cac["l1"],
                                                     cac["l2"], cac["bank"], cac["lab"]),
        "u2pl": lambda: ops.u2pl_loss(u["emb"], u["labels"], u["probs"], u["temb"],
                                      UnreliableBank(5, 8, size=12), num_labeled=2,
                                      reliable=u["rel"], unreliable=u["unrel"], num_queries=6,
                                      num_negatives=4, seed=0),
    }


@pytest.mark.parametrize("loss", ["reco", "pixel_contrast", "dense", "pixel_anchor", "bane",
                                  "cac", "u2pl"])
def test_a_loss_resolves_its_backend_once(loss, monkeypatch):
    """The backend is chosen once, at the public loss; the primitives it calls take none."""
    call = _loss_calls()[loss]
    calls = []
    real = _common.resolve_backend

    def counting(*args, **kw):
        calls.append(args[2] if len(args) > 2 else kw.get("op"))
        return real(*args, **kw)

    for mod in ("_common", "primitives", "tiled"):
        monkeypatch.setattr(f"pixcon.ops.{mod}.resolve_backend", counting, raising=False)
    value = call()
    assert torch.isfinite(value.float()).all()
    assert len(calls) == 1, calls
