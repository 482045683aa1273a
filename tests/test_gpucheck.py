"""The prepared GPU command (./dev gpu, tools.gpucheck), rehearsed on a CPU so that it cannot rot
before a GPU appears: the dry run end to end (the launch script under the interpreter, the
report writer on the recorded sample, the output folder's limits), the budget's drop order, the
parsers on recorded tool output, and the one-line stop without CUDA."""
import json
import os
import subprocess
import sys

import pytest

from tools import gpucheck as gc

from .conftest import HAS_CUDA, INTERPRET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.interpret
@pytest.mark.skipif(not INTERPRET, reason="the dry run's launch script needs the interpreter")
def test_dry_run_writes_the_report_within_the_limits(tmp_path):
    out = tmp_path / "out"
    code = gc.Runner(str(out), gc.BUDGET, dry_run=True).go()
    files = sorted(os.listdir(out))
    assert files == sorted(gc.FILES)                     # nothing left behind (.bench etc.)
    assert len(files) <= gc.MAX_FILES
    report = json.loads((out / "report.json").read_text())
    assert set(report["phases"]) == set(gc.NAMES) and report["dropped"] == {}
    # the launch script ran for real under the interpreter: every Triton kernel launched once
    mem = report["phases"]["memcheck"]
    with open(gc.SAMPLE) as f:
        sample = json.load(f)
    assert sorted(mem["kernels"]) == sorted(sample["kernels"])
    assert all(v == "clean" for v in mem["kernels"].values()) and mem["ok"]
    # the sample's racecheck hazard reaches the summary, named by kernel, and fails the run
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# pixcon on a GPU") and "DRY RUN" in summary
    assert "| _tiled_lse_kernel | Error: Race reported" in summary
    assert "ERR_NVGPUCTRPERM" in summary and "| racecheck | 70 |" in summary
    assert "| dense_contrast_loss | _tiled_bwd_da_kernel + _tiled_bwd_dk_kernel |" in summary
    assert code == 1


def test_budget_drops_phases_in_the_stated_order():
    keep, dropped = gc.plan(gc.BUDGET)
    assert [p.name for p in keep] == list(gc.NAMES) and not dropped
    assert sum(p.seconds for p in keep) <= gc.BUDGET
    assert gc.DROP_ORDER == ("ncu", "racecheck", "kernels", "bench", "memcheck", "build")
    keep, dropped = gc.plan(gc.BUDGET - 1)
    assert list(dropped) == ["ncu"]
    keep, dropped = gc.plan(300)            # ncu, racecheck, kernels, bench out; kernels fits back
    assert [p.name for p in keep] == ["env", "build", "parity", "memcheck", "kernels"]
    assert sum(p.seconds for p in keep) <= 300
    keep, _ = gc.plan(10)
    assert [p.name for p in keep] == ["env", "parity"]          # never dropped
    keep, dropped = gc.plan(gc.BUDGET, skip=("build",))
    assert "build" not in [p.name for p in keep] and dropped == {"build": "skipped (--skip)"}


def test_parsers_on_recorded_output():
    res = gc.parse_pytest("..F.\nFAILED tests/test_gpu.py::test_x - AssertionError\n"
                          "1 failed, 3 passed, 2 skipped in 4.0s\n")
    assert res["counts"] == {"failed": 1, "passed": 3, "skipped": 2} and not res["ok"]
    assert res["failed"] == ["tests/test_gpu.py::test_x - AssertionError"]
    assert gc.parse_pytest("24 passed in 9s")["ok"] and not gc.parse_pytest("boom")["ok"]
    text = ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
            "=========     at _edt_rows_kernel+0x1b0\n"
            "=========     by thread (3,0,0) in block (0,0,0)\n"
            "========= ERROR SUMMARY: 1 error\n")
    res = gc.parse_sanitizer(text, ["_edt_rows_kernel", "_edt_cols_kernel"])
    assert res["errors"] == 1 and not res["ok"]
    assert res["kernels"] == {"_edt_rows_kernel": "Invalid __global__ read of size 4 bytes",
                              "_edt_cols_kernel": "clean"}
    assert gc.parse_sanitizer("crashed", ["k"])["errors"] is None
    assert gc.smoke_kernels("smoke: x\nsmoke: kernels: _a_kernel, _b_kernel\n") == [
        "_a_kernel", "_b_kernel"]
    ncu = gc.parse_ncu("  Achieved Occupancy   %   41.2\n  DRAM Throughput  %  80.1\n"
                       "  Stall Long Scoreboard  12.0\n")
    assert ncu["ok"] and len(ncu["metrics"]) == 2 and ncu["stalls"]
    assert not gc.parse_ncu("no sections")["ok"]


def test_output_limits_are_enforced(tmp_path):
    for i in range(gc.MAX_FILES + 1):
        (tmp_path / f"f{i}").write_text("x")
    with pytest.raises(RuntimeError, match="at most 8"):
        gc.check_limits(str(tmp_path))
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="deeper"):
        gc.check_limits(str(tmp_path))


@pytest.mark.skipif(HAS_CUDA, reason="the stop without CUDA")
def test_without_cuda_it_stops_with_one_line(tmp_path):
    p = subprocess.run([os.path.join(ROOT, "dev"), "gpu", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--dry-run" in lines[0]
    assert not (tmp_path / "o").exists()


def test_kernel_table_matches_profiler_names_to_the_model():
    sys.path.insert(0, ROOT)
    from benchmarks import kernels as K
    from tools import cost
    cac = next(op for op in cost.ops() if op.name == "directional_contrast_loss")
    events = [("_tiled_lse_kernel", 1e-3, 2), ("_tiled_pos_kernel", 1e-3, 2),
              ("_tiled_bwd_da_kernel", 2e-3, 1), ("_tiled_bwd_dk_kernel", 1e-3, 1),
              ("void at::native::vectorized_elementwise_kernel<4>", 5e-4, 7)]
    rows = {r["group"]: r for r in K.compare(events, cac)}
    model = K.model_groups(cac)
    fwd = rows["_tiled_lse_kernel + _tiled_pos_kernel"]
    assert fwd["launches"] == 4 and fwd["measured_ms"] == 2.0
    assert fwd["ratio"] == round(2e-3 / model["_tiled_lse_kernel + _tiled_pos_kernel"], 2)
    assert rows["_tiled_bwd_da_kernel + _tiled_bwd_dk_kernel"]["measured_ms"] == 3.0
    assert rows[K.TORCH]["launches"] == 7 and rows[K.TORCH]["model_ms"] is None
