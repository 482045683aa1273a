"""Installing into an environment that has its own torch (issue 31 item 7): pip is never asked
for a torch, an install without the compiled kernels (pip's isolated build, no compiler) still
works and says so, and ``python -m pixcon.build`` compiles them later against the installed
torch."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _py(code, *, env=None, cwd=ROOT, timeout=600):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_the_build_never_asks_pip_for_a_torch():
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in build if r.split("=")[0].split(">")[0].strip() == "torch"], build


def _setup(args, tmp_path, pre="pass", env=None):
    code = (f"import sys; {pre}; sys.argv = ['setup.py', *{args!r}]; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), "
            "{'__file__': 'setup.py', '__name__': '__main__'})")
    return _py(code, env=env)


def test_an_isolated_build_without_torch_installs_the_sources_and_says_so(tmp_path):
    """pip's isolated build environment has no torch: setup.py builds no extension, says how to
    get the kernels, and ships csrc/ as pixcon/_csrc for python -m pixcon.build."""
    out = tmp_path / "lib"
    r = _setup(["-q", "build_py", "--build-lib", str(out)], tmp_path,
               pre="sys.modules['torch'] = None")        # import torch raises ImportError
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch is not importable here" in r.stderr and "python -m pixcon.build" in r.stderr
    assert (out / "pixcon" / "_csrc" / "pixcon.cpp").is_file()
    assert (out / "pixcon" / "_csrc" / "cpu" / "tiled.cpp").is_file()
    assert not list(out.rglob("_C*.so"))


def test_a_failed_compile_installs_without_the_kernels(tmp_path):
    """No working C++ compiler (CC/CXX that fail): the build says so and succeeds."""
    r = _setup(["-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
                str(tmp_path / "tmp")], tmp_path, env={"CC": "/bin/false", "CXX": "/bin/false"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "did not compile" in r.stderr and "python -m pixcon.build" in r.stderr, r.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so"))


def test_without_the_kernels_auto_runs_the_reference_and_warns_once():
    code = """
import warnings, torch
import pixcon
from pixcon import ops
from pixcon.synthetic import reco_batch
assert not pixcon.HAS_C
pixcon.ops._common._WARNED_NO_KERNELS[0] = False
import os; os.environ.pop("PIXCON_EXTENSION")
emb, labels, probs = reco_batch(2, 8, 9, 7, num_classes=4, present=3, seed=0)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    a = ops.reco_loss(emb, labels, probs, seed=1, num_queries=8, num_negatives=8)
    b = ops.reco_loss(emb, labels, probs, seed=1, num_queries=8, num_negatives=8)
msgs = [str(x.message) for x in w if issubclass(x.category, pixcon.ExtensionWarning)]
assert len(msgs) == 1 and "python -m pixcon.build" in msgs[0], msgs
ref = ops.reco_loss(emb, labels, probs, seed=1, num_queries=8, num_negatives=8,
                    backend="reference")
assert torch.equal(a, ref) and torch.equal(a, b)
try:
    ops.reco_loss(emb, labels, probs, backend="native")
except RuntimeError as e:
    assert "python -m pixcon.build" in str(e), e
else:
    raise AssertionError("native ran without the kernels")
print("ok")
"""
    r = _py(code, env={"PIXCON_EXTENSION": "off"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_pixcon_build_compiles_against_the_installed_torch_and_loads(tmp_path):
    """python -m pixcon.build's builder on one of the sources (the whole set takes about a
    minute on 2 cores): a library in the cache folder of this torch and these sources, loaded,
    its kernel registered (philox's CPU kernel)."""
    code = f"""
import torch, pixcon
from pixcon import _build
from pixcon.ops import _library  # noqa: F401  (the python op definitions)
assert not pixcon.HAS_C
root = _build.source_dir()
files = [root / "cpu" / "philox.cpp"]
lib = _build.build(verbose=False, files=files)
assert lib.parent == _build.cache_dir(files) and str(lib).startswith({str(tmp_path)!r}), lib
assert torch.__version__ in lib.parent.name
assert torch._C._dispatch_has_kernel_for_dispatch_key("pixcon::philox", "CPU")
x = torch.arange(5)
from pixcon.reference.rng import philox4x32
assert torch.equal(torch.ops.pixcon.philox(x, 3, 1), philox4x32(x, 3, 1)), "philox"
print("ok")
"""
    r = _py(code, env={"PIXCON_EXTENSION": "off", "PIXCON_CACHE": str(tmp_path),
                       "MAX_JOBS": "2"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
