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
