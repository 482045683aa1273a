"""Every option of every public loss at a non-default value on every backend (issue 33: an
argument a fused path ignores passes a test that only uses the default). For each option the
fused backends agree with the reference at the new value, and the value changes the result
from the default's on every backend (so ignoring it would show). Inputs: the smoke cases.
Tolerance: float32 sums in another order, 1e-4 relative."""
import pytest
import torch

import pixcon
from pixcon import ops
from pixcon.nn import UnreliableBank
from tools import smoke

from .conftest import triton_device

CPU = torch.device("cpu")


def _reco(x, **kw):
    kw = {"num_queries": 8, "num_negatives": 16, "seed": 5, **kw}
    return ops.reco_loss(x["emb"], x["labels"], x["probs"], **kw)


def _pixel(x, **kw):
    kw = {"max_samples": 40, "max_views": 6, "seed": 3, **kw}
    return ops.pixel_contrast_loss(x["emb"], x["labels"], x["pred"], **kw)


def _dense(x, **kw):
    return ops.dense_contrast_loss(x["emb"], x["labels"], **kw)


def _anchor(x, **kw):
    kw = {"layer_weights": (0.3, 1.0), **kw}
    return ops.pixel_anchor_loss(x["embs"], x["labels"], x["logits"], **kw)


def _cac(x, **kw):
    return ops.directional_contrast_loss(x["f1"], x["f2"], x["l1"], x["l2"], x["bank"],
                                         x["lab"], **kw)


def _u2pl(x, **kw):
    bank = UnreliableBank(5, 8, size=12).to(x["emb"].device)
    out = []
    for step in range(2):                          # the second call reads a filled bank
        out.append(ops.u2pl_loss(x["emb"], x["labels"], x["probs"], x["temb"], bank,
                                 num_labeled=2, reliable=x["rel"], unreliable=x["unrel"],
                                 **{"num_queries": 6, "num_negatives": 4, "seed": step, **kw}))
    return torch.stack(out)


CASES = {   # loss: (maker, call, [(option, non-default value), ...])
    "reco": (smoke._reco_make, _reco, [
        ("strong_threshold", 0.9), ("temperature", 0.3), ("num_queries", 5),
        ("num_negatives", 7), ("relation_temperature", 0.9), ("reduction", "none"),
        ("ignore_index", 0)]),
    "pixel_contrast": (smoke._cs_make, _pixel, [
        ("temperature", 0.3), ("base_temperature", 0.2), ("max_samples", 20),
        ("max_views", 2), ("ignore_index", 0)]),
    "dense": (smoke._cs_make, _dense, [
        ("temperature", 0.3), ("base_temperature", 0.2), ("ignore_index", 0)]),
    "pixel_anchor": (smoke._contextrast_make, _anchor, [
        ("w_low", 0.2), ("layer_weights", (0.6, 0.4)), ("temperature", 0.3), ("ks", 0.25),
        ("normalize", False), ("reading", "R2"), ("ignore_index", 0)]),
    "cac": (smoke._cac_make, _cac, [
        ("pos_threshold", 0.3), ("temperature", 0.3), ("reduction", "none"),
        ("directional", False), ("positive_filtering", False), ("negative_sampling", False),
        ("alignment", "l2")]),
    "u2pl": (smoke._u2pl_make, _u2pl, [
        ("low_rank", 2), ("high_rank", 4), ("anchor_threshold", 0.6),
        ("negative_threshold", 0.5), ("temperature", 0.3), ("num_queries", 4),
        ("num_negatives", 3), ("reduction", "none")]),
}
EXTRA = {"pixel_anchor": {"w_low": {"w_high": 0.8}}}      # options that come in pairs


def _params():
    for loss, (_, _, options) in CASES.items():
        for name, value in options:
            yield pytest.param(loss, name, value, id=f"{loss}-{name}")


BACKENDS = [pytest.param("native", marks=pytest.mark.skipif(not pixcon.HAS_C,
                                                              reason="pixcon._C not built")),
            pytest.param("triton", marks=[pytest.mark.interpret, pytest.mark.slow])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,name,value", list(_params()))
def test_every_option_is_honoured_by_every_backend(loss, name, value, backend):
    make, call, _ = CASES[loss]
    kw = {name: value, **EXTRA.get(loss, {}).get(name, {})}
    if name == "ignore_index":          # class 0 ignored: the maps' 255 pixels become 0 too

        def make(dev, seed, make=make):
            x = make(dev, seed)
            x["labels"] = torch.where(x["labels"] == 255, value, x["labels"])
            return x
    dev = triton_device() if backend == "triton" else CPU
    ref = call(make(CPU, 0), backend="reference", **kw)
    x = make(dev, 0)
    got = call(x, backend=backend, **kw).cpu()
    default = call(x, backend=backend).cpu()
    assert got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-4, atol=1e-5)
    assert got.shape != default.shape or not torch.allclose(got, default, rtol=1e-6,
                                                            atol=1e-7), \
        f"{loss}({name}={value!r}) on {backend} gives the default's value"


# --- the primitives (issue 33 item 1: "every option of every public op") -----------------------
def _out(d):
    """A call's outputs as one dict of float64 tensors (indices and counts included)."""
    return {k: v.detach().double().cpu() for k, v in d.items()}


def _infonce(x, backend, **kw):
    kw = {"temperature": 0.1, "pos_pool": x["pos"], "key_grad": False, **kw}
    if callable(kw.get("keys")):
        kw["keys"] = kw["keys"](x)
    e = x["pool"].detach().clone().requires_grad_()
    loss = ops.sparse_infonce(e, x["q"], x["p"], x["neg"], backend=backend, **kw)
    w = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device)
    return _out({"loss": loss, "grad": torch.autograd.grad((loss * w).sum(), e)[0]})


def _contrast(x, backend, **kw):
    kw = {"keys": x["k"], "key_labels": x["yk"], "temperature": 0.1, **kw}
    a = x["a"].detach().clone().requires_grad_()
    terms, npos = ops.supervised_contrast(a, x["ya"], backend=backend, **kw)
    return _out({"terms": terms, "npos": npos, "grad": torch.autograd.grad(terms.sum(), a)[0]})


def _nl(x, backend, **kw):
    kw = {"temperature": 0.1, **kw}
    a = x["a"].detach().clone().requires_grad_()
    nl = ops.negative_logsumexp(a, x["ya"], x["k"], x["yk"], backend=backend, **kw)
    nl = torch.where(x["ya"] >= 0, nl, 0.0)
    return _out({"nl": nl, "grad": torch.autograd.grad(nl.sum(), a)[0]})


def _edt(x, backend, **kw):
    out = {"d": ops.distance_transform(x["x"], backend=backend, **kw)}
    if "squared" not in kw:                 # the exact (float64) op reads every option too
        out["d2"] = ops.distance_transform(x["x"], backend=backend, squared=True, **kw)
    return _out(out)


def _bane(x, backend, **kw):
    sel, err = ops.bane_negatives(x["labels"], x["logits"], 5, backend=backend, **kw)
    return _out({"selected": sel, "err": err})


def _philox(x, backend, **kw):
    kw = {"seed": 7, "stream": 0, **kw}
    return _out({"r": ops.philox(torch.arange(500, device=x["lab"].device), backend=backend,
                                 **kw)})


def _queries(x, backend, **kw):
    kw = {"num_queries": 17, "seed": 3, **kw}
    return _out({"q": ops.sample_hard_queries(x["lab"], x["hard"], 6, backend=backend, **kw)})


def _negatives(x, backend, **kw):
    kw = {"num_negatives": 23, "seed": 4, **kw}
    return _out({"n": ops.sample_negatives(x["rows"], x["cdf"], x["lab"], backend=backend,
                                           **kw)})


def _groups(x, backend, **kw):
    from pixcon.ops.primitives import sample_in_groups
    from pixcon.reference import common as rcm
    kw = {"per_row": 11, "seed": 2, "stream": 1, **kw}
    order, offsets, counts = rcm.group_by_class(x["lab"], 6)
    return _out({"s": sample_in_groups(order, offsets, counts, x["rows"], backend=backend, **kw)})


def _means(x, backend, **kw):
    kw = {"num_classes": 5, **kw}
    s, n, m = ops.class_means(x["emb"], x["lab"], backend=backend, **kw)
    return _out({"sums": s, "counts": n, "means": m})


def _bane_make(dev, seed):
    x = smoke._contextrast_make(dev, seed)
    return {"labels": x["labels"], "logits": x["logits"]}


PRIMS = {   # primitive: (maker, call, [(option, non-default value), ...])
    "sparse_infonce": (smoke._infonce_make, _infonce, [
        ("temperature", 0.7), ("key_grad", True), ("pos_pool", None),
        ("keys", lambda x: torch.roll(x["pool"], 1, 0) + 0.5)]),
    "supervised_contrast": (smoke._tiled_make, _contrast, [
        ("temperature", 0.4), ("keys", None)]),
    "negative_logsumexp": (smoke._tiled_make, _nl, [("temperature", 0.4)]),
    "distance_transform": (smoke._edt_make, _edt, [
        ("squared", True), ("labels", True), ("background", 0)]),
    "bane_negatives": (_bane_make, _bane, [("ks", 0.25), ("reading", "R2"), ("ignore_index", 0)]),
    "philox": (smoke._samplers_make, _philox, [("seed", 8), ("stream", 3)]),
    "sample_hard_queries": (smoke._samplers_make, _queries, [("num_queries", 5), ("seed", 4)]),
    "sample_negatives": (smoke._samplers_make, _negatives, [("num_negatives", 9), ("seed", 5)]),
    "sample_in_groups": (smoke._samplers_make, _groups, [
        ("per_row", 4), ("seed", 9), ("stream", 2)]),
    "class_means": (smoke._means_make, _means, [("num_classes", 7)]),
}
PRIM_EXTRA = {"supervised_contrast": {"keys": {"key_labels": None}},
              "distance_transform": {"background": {"labels": True}}}


def _prim_params():
    for prim, (_, _, options) in PRIMS.items():
        for name, value in options:
            yield pytest.param(prim, name, value, id=f"{prim}-{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prim,name,value", list(_prim_params()))
def test_every_option_of_every_primitive_on_every_backend(prim, name, value, backend):
    """As above for the primitives: at the non-default value each fused backend equals the
    reference (integers exactly; float32 sums in another order to 1e-4), and the value changes
    the result. distance_transform's background is compared with labels=True against
    labels=True at the default background (with labels=False it is not read)."""
    make, call, _ = PRIMS[prim]
    extra = PRIM_EXTRA.get(prim, {}).get(name, {})
    kw = {name: value, **extra}
    dev = triton_device() if backend == "triton" else CPU
    ref = call(make(CPU, 0), "reference", **kw)
    x = make(dev, 0)
    got = call(x, backend, **kw)
    default = call(x, backend, **{k: v for k, v in extra.items() if k != "key_labels"})
    assert got.keys() == ref.keys()
    for k in got:
        assert got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, equal_nan=True)
    same = all(got[k].shape == default[k].shape and torch.allclose(
        got[k], default[k], rtol=1e-6, atol=1e-7, equal_nan=True) for k in got)
    assert not same, f"{prim}({name}={value!r}) on {backend} gives the default's value"
