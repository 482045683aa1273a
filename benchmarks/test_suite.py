"""The suite's cases through pytest-benchmark: ``pytest benchmarks/ --benchmark-enable``
(``--benchmark-enable`` because the project's pytest options disable timing for the test
suite). Each case is one module at one size of the mode in PIXCON_BENCH_MODE (default "ci");
the module's own rows are checked to be there and finite."""
import math
import os

import pytest

from suite import SUITE, run_module

MODE = os.environ.get("PIXCON_BENCH_MODE", "ci")
CASES = [(name, size) for name, (sizes, _, _) in SUITE.items() for size in sizes[MODE]]


@pytest.mark.parametrize("name,size", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_case(benchmark, name, size):
    rows = benchmark.pedantic(run_module, args=(name, size),
                              kwargs=dict(device="cpu", reps=1), rounds=1, iterations=1)
    assert rows and all(math.isfinite(r["time_ms"]) and r["time_ms"] > 0 for r in rows)
    benchmark.extra_info["providers"] = {r["provider"]: r["time_ms"] for r in rows}
