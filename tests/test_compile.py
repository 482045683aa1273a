"""torch.compile(fullgraph=True) on a user's module that calls reco_loss, pixel_anchor_loss and
distance_transform with their defaults: no graph break, numbers equal to eager.

Under compile the value checks (a read-back to the host) are off by default (documented in
``want_value_checks``); everything else is a registered ``pixcon::`` op with a fake kernel."""
import pytest
import torch

import pixcon
from pixcon.ops import _common, distance_transform, pixel_anchor_loss, reco_loss

from .conftest import HAS_CUDA, assert_close, triton_device

B, D, H, W, C = 2, 8, 12, 10, 4


class UserHead(torch.nn.Module):
    """What a trainer writes: features, logits, and the three ops with their default arguments."""

    def __init__(self, backend="auto"):
        super().__init__()
        self.backend = backend
        self.features = torch.nn.Conv2d(3, D, 1)
        self.deep = torch.nn.Conv2d(D, D, 1)
        self.classifier = torch.nn.Conv2d(D, C, 1)

    def forward(self, x, labels):
        f = self.features(x)
        g = self.deep(torch.relu(f))
        logits = self.classifier(g)
        probs = torch.softmax(logits, 1).detach()
        reco = reco_loss(g, labels, probs, num_queries=4, num_negatives=8, seed=5,
                         backend=self.backend)
        pal = pixel_anchor_loss([f, g], labels, logits, layer_weights=(0.3, 1.0),
                                backend=self.backend)
        dist = distance_transform(labels, labels=True, backend=self.backend)
        ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
        return ce + reco + pal, dist


def _batch(seed, device):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=gen)
    labels = torch.randint(0, C, (B, H, W), generator=gen)
    labels[0, :3] = 255                               # some ignored pixels
    return x.to(device), labels.to(device)


def _eager_and_compiled(backend, compiler, device):
    torch.manual_seed(0)
    eager = UserHead(backend).to(device)
    compiled_model = UserHead(backend).to(device)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend=compiler, fullgraph=True)
    x, labels = _batch(1, device)
    (l1, d1), (l2, d2) = eager(x, labels), compiled(x, labels)
    g1 = torch.autograd.grad(l1, list(eager.parameters()))
    g2 = torch.autograd.grad(l2, list(compiled_model.parameters()))
    return (l1, d1, g1), (l2, d2, g2)


def _check(eager, compiled, rtol):
    (l1, d1, g1), (l2, d2, g2) = eager, compiled
    assert torch.equal(d2, d1)                  # integer-exact distances
    assert float(l1.detach()) > 0
    assert_close(l2, l1, rtol=rtol, atol=1e-6, what="compiled loss")
    for a, b in zip(g2, g1):
        assert_close(a, b, rtol=rtol, atol=1e-6, what="compiled gradient")


@pytest.mark.skipif(not pixcon.HAS_C, reason="the CPU default needs pixcon._C")
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor",
                                                                 marks=pytest.mark.slow)])
def test_cpu_default_compiles_fullgraph(compiler):
    """The CPU default ("native"): Inductor generates C++ around the registered ops. fp32,
    same kernels on both sides; Inductor may fuse the softmax/conv glue differently, so the
    tolerance is fp32 reduction-order level."""
    _check(*_eager_and_compiled("auto", compiler, torch.device("cpu")), rtol=1e-5)


@pytest.mark.interpret
def test_fused_path_compiles_fullgraph():
    """The Triton path: under the interpreter Inductor cannot generate code around interpreted
    kernels, so the graph is captured with aot_eager (same fake-tensor tracing, fullgraph);
    Inductor on a GPU."""
    device = triton_device()
    compiler = "inductor" if HAS_CUDA else "aot_eager"
    _check(*_eager_and_compiled("triton", compiler, device), rtol=1e-5)


def test_value_checks_default_off_under_compile_only(monkeypatch):
    monkeypatch.delenv("PIXCON_CHECK_VALUES", raising=False)
    cpu = torch.device("cpu")
    assert _common.want_value_checks(None, cpu)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _common.want_value_checks(None, cpu)
    assert _common.want_value_checks(True, cpu)      # asked for explicitly: kept


COLD = """
import sys, torch
from pixcon import ops
from pixcon.nn import UnreliableBank
from tools import smoke
cpu = torch.device("cpu")
name = sys.argv[1]
if name in ("reco",):
    x = smoke._reco_make(cpu, 0)
    fn, e = (lambda e: ops.reco_loss(e, x["labels"], x["probs"], num_queries=8,
                                     num_negatives=16, seed=5)), x["emb"]
elif name in ("pixel_contrast", "dense"):
    x = smoke._cs_make(cpu, 0)
    fn = ((lambda e: ops.pixel_contrast_loss(e, x["labels"], x["pred"], max_samples=40,
                                             max_views=6, seed=3)) if name == "pixel_contrast"
          else (lambda e: ops.dense_contrast_loss(e, x["labels"])))
    e = x["emb"]
elif name == "pixel_anchor":
    x = smoke._contextrast_make(cpu, 0)
    fn, e = (lambda e: ops.pixel_anchor_loss([e, x["embs"][1]], x["labels"], x["logits"],
                                             layer_weights=(0.3, 1.0))), x["embs"][0]
elif name == "cac":
    x = smoke._cac_make(cpu, 0)
    fn, e = (lambda e: ops.directional_contrast_loss(e, x["f2"], x["l1"], x["l2"], x["bank"],
                                                     x["lab"])), x["f1"]
else:
    x = smoke._u2pl_make(cpu, 0)
    bank, twin = UnreliableBank(5, 8, size=12), UnreliableBank(5, 8, size=12)
    def fn(e, b=None):
        return ops.u2pl_loss(e, x["labels"], x["probs"], x["temb"], b or bank, num_labeled=2,
                             reliable=x["rel"], unreliable=x["unrel"], num_queries=6,
                             num_negatives=4, seed=0)
    e = x["emb"]
e = e.detach().clone().requires_grad_()
import contextlib
scope, compiler, launches = contextlib.nullcontext(), "inductor", [0]
if sys.argv[2] == "triton":      # the Triton kernels under the interpreter, counted
    import triton.runtime.interpreter as interp
    from pixcon.ops._library import triton_on_cpu
    run = interp.InterpretedFunction.run

    def counted(self, *a, **k):
        launches[0] += 1
        return run(self, *a, **k)
    interp.InterpretedFunction.run = counted
    scope, compiler = triton_on_cpu(), "aot_eager"   # Inductor cannot wrap interpreted kernels
with scope:
    got = torch.compile(fn, fullgraph=True, backend=compiler)(e)   # cold: no eager call before
    g_got, = torch.autograd.grad(got, e)
    compiled_launches = launches[0]
    want = fn(e, twin) if name == "u2pl" else fn(e)
    g_want, = torch.autograd.grad(want, e)
assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (float(got), float(want))
assert torch.allclose(g_got, g_want, rtol=1e-4, atol=1e-6)
assert sys.argv[2] != "triton" or compiled_launches > 0, "no Triton kernel ran compiled"
print("ok", float(got), compiled_launches)
"""


# not marked "interpret": the subprocess sets TRITON_INTERPRET itself, and the CI stages that
# rerun the Triton tests in other program orders have nothing to add to a compile check
@pytest.mark.parametrize("kernels", ["native", "triton"])
@pytest.mark.parametrize("loss", ["reco", "pixel_contrast", "dense", "pixel_anchor", "cac",
                                  "u2pl"])
def test_every_loss_compiles_from_a_cold_process(loss, kernels, tmp_path):
    """Each public loss under torch.compile(fullgraph=True) in a fresh process, before any eager
    call (the fakes and ops are registered at import): on the CPU default (Inductor) and on the
    Triton kernels under the interpreter (inside an outer triton_on_cpu(), which a compiled
    graph dispatches through; aot_eager, and the interpreted launches counted): value and
    gradient equal to eager. (The reference backend follows the official code's data-dependent
    loops and is not compiled fullgraph.)"""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "cold.py"
    script.write_text(COLD)
    env = {**os.environ, "PYTHONPATH": root, "PIXCON_BACKEND": kernels}
    env.pop("TRITON_INTERPRET", None)
    if kernels == "triton":
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, str(script), loss, kernels], capture_output=True,
                       text=True, env=env, cwd=root, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_torch_func_grad(backend):
    """torch.func.grad on each loss: the reference's value equals torch.autograd's; the fused
    ops' registered autograd is not transformed by functorch in torch 2.13 (README)."""
    from pixcon import ops
    from tools import smoke
    cpu = torch.device("cpu")
    r, cs, cac = smoke._reco_make(cpu, 0), smoke._cs_make(cpu, 0), smoke._cac_make(cpu, 0)
    cases = [(lambda e: ops.reco_loss(e, r["labels"], r["probs"], num_queries=8,
                                      num_negatives=16, seed=5, backend=backend), r["emb"]),
             (lambda e: ops.dense_contrast_loss(e, cs["labels"], backend=backend), cs["emb"]),
             (lambda e: ops.directional_contrast_loss(e, cac["f2"], cac["l1"], cac["l2"],
                                                      cac["bank"], cac["lab"],
                                                      backend=backend), cac["f1"])]
    for fn, x in cases:
        if backend == "native":
            with pytest.raises(RuntimeError, match="setup_context"):
                torch.func.grad(fn)(x)
            continue
        e = x.clone().requires_grad_()
        want, = torch.autograd.grad(fn(e), e)
        assert torch.equal(torch.func.grad(fn)(x), want)
