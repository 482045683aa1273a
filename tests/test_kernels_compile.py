"""The GPU path without a GPU: every Triton kernel the test suite launched (recorded by
conftest.py) and every launch the launchers make at the papers' full sizes in their GPU
configuration (tools.aot.scenarios) is compiled for sm_80 and sm_90 (the tests' interpreter
tiles, compiled for errors only, for sm_90) in a separate process without TRITON_INTERPRET.
A compile error, a register spill or shared memory over the hardware limit fails, naming
kernel, setting, target and the compiler's message. Runs last (conftest.py orders it)."""
import json
import os
import subprocess
import sys

import pytest

from . import conftest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot(*args, timeout=900):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PIXCON_LAUNCH_CONFIG")}
    return subprocess.run([sys.executable, "-m", "tools.aot", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _kernels():
    """Every @triton.jit kernel (name ending in _kernel) defined in pixcon_kernels."""
    import importlib
    import pkgutil

    import pixcon_kernels
    out = set()
    for m in pkgutil.iter_modules(pixcon_kernels.__path__):
        if m.name == "aot":
            continue
        mod = importlib.import_module(f"pixcon_kernels.{m.name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                out.add(f"pixcon_kernels.{m.name}:{name}")
    return out


@pytest.mark.slow
@pytest.mark.interpret
@pytest.mark.compile
def test_every_kernel_compiles_for_sm80_sm90_without_spills(tmp_path):
    launches = conftest.LAUNCHES.launches if conftest.LAUNCHES is not None else []
    rec = tmp_path / "launches.json"
    rec.write_text(json.dumps(launches))
    out = tmp_path / "rows.json"
    r = _aot("--check", "--launches", str(rec), "--json", str(out))
    assert r.returncode == 0, f"compile check failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    compiled = {row["kernel"] for row in rows if "error" not in row}
    missing = _kernels() - compiled
    assert not missing, f"kernels never compiled (add them to aot.scenarios): {sorted(missing)}"
    for cc in (80, 90):
        assert any(row["cc"] == cc for row in rows)
    if launches:   # the suite's own launches were among those compiled
        from_tests = [row for row in rows if any("test" in s for s in row["settings"])]
        assert from_tests, "no compilation came from the test suite's recorded launches"


_BAD = {"kernel": "tests._aot_fixtures:_global_read_kernel", "setting": "fixture",
        "args": [{"tensor": "float32", "aligned": True}, 8],
        "kwargs": {"BLOCK": 16}, "grid": [1]}
_SPILL = {"kernel": "tests._aot_fixtures:_spilling_kernel", "setting": "fixture",
          "args": [{"tensor": "float32", "aligned": True}],
          "kwargs": {"BLOCK": 128, "num_warps": 2}, "grid": [1]}


@pytest.mark.slow
@pytest.mark.interpret
@pytest.mark.compile
def test_check_names_compile_errors_and_spills(tmp_path):
    """The check can fail: a kernel reading a plain module global (what the interpreter accepts
    and the compiler rejects) and a kernel holding a tile far larger than the register file."""
    rec = tmp_path / "bad.json"
    rec.write_text(json.dumps([_BAD, _SPILL]))
    r = _aot("--check", "--no-scenarios", "--launches", str(rec))
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert "compile error: tests._aot_fixtures:_global_read_kernel [fixture] on sm_80" in r.stdout
    assert "SCALE" in r.stdout            # the compiler's message names the global
    assert "spill: tests._aot_fixtures:_spilling_kernel [fixture] on sm_90" in r.stdout
