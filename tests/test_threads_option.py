"""--threads on the trainer, the demo and the benchmarks (issue 32 item 4): a number sets torch's
and pixcon's thread counts; 'auto' (the default) is the free cores, one on a loaded 2-core
machine; a bad value is one line naming the flag."""
import subprocess
import sys

import pytest
import torch

import pixcon
from pixcon import _cli


@pytest.mark.parametrize("cores,load,ranks,want", [(2, 0.05, 1, 2), (2, 1.1, 1, 1), (2, 3.0, 1, 1),
                                                   (16, 2.2, 1, 14), (16, 0.0, 4, 4),
                                                   (2, 0.0, 4, 1)])
def test_auto_threads_is_the_free_cores_shared_by_local_ranks(monkeypatch, cores, load, ranks,
                                                              want):
    import os
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert _cli.auto_threads() == want


def test_apply_threads_sets_torch_and_pixcon():
    before, before_px = torch.get_num_threads(), pixcon.get_num_threads()
    try:
        assert _cli.apply_threads("x", "1") == 1
        assert torch.get_num_threads() == 1 and pixcon.get_num_threads() in (1, None)
        with pytest.raises(SystemExit, match="x: --threads must be a positive integer or 'auto'"):
            _cli.apply_threads("x", "0")
        with pytest.raises(SystemExit, match="got 'two'"):
            _cli.apply_threads("x", "two")
    finally:
        torch.set_num_threads(before)
        pixcon.set_num_threads(before_px)


@pytest.mark.parametrize("argv", [["-m", "pixcon.train", "run", "--threads", "zero"],
                                  ["-m", "pixcon.demo", "--threads", "-2"],
                                  ["-m", "benchmarks", "--threads", "x"]])
def test_every_cli_takes_threads_and_names_a_bad_value(argv):
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "--threads must be a positive integer or 'auto'" in r.stderr, r.stderr[-800:]
    assert "Traceback" not in r.stderr



@pytest.mark.parametrize("argv,loaded,env,want", [
    (["python", "-m", "pixcon.train", "--steps", "3"], False, None, True),
    (["python", "-m", "benchmarks", "--mode", "cpu"], False, None, True),
    (["python", "-m", "benchmarks.grid"], False, None, True),
    (["python", "-m", "pixcon.train"], True, None, False),          # torch already loaded OpenMP
    (["python", "-m", "pixcon.train"], False, "ACTIVE", False),     # the user's own choice
    (["python", "-m", "pytest", "tests"], False, None, False),      # someone else's program
    (["python", "train.py", "-m"], False, None, False),
    (["python", "-c", "import pixcon"], False, None, False),
    ([], False, None, False),
])
def test_passive_waiting_only_for_pixcons_own_programs(monkeypatch, argv, loaded, env, want):
    if env is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", env)
    assert pixcon._passive_wait_default(argv, loaded) is want


def test_a_benchmark_program_starts_with_passive_waiting():
    """python -m benchmarks.roofline (a program of ours): OMP_WAIT_POLICY is PASSIVE in it, as
    recorded in its output, unless the caller set it; python -c is someone else's program."""
    import json
    import os
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, benchmarks; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "None", out.stderr
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        e = env if given is None else {**env, "OMP_WAIT_POLICY": given}
        probe = subprocess.run([sys.executable, "-m", "benchmarks.roofline", "--size", "small"],
                               capture_output=True, text=True, env=e)
        assert probe.returncode == 0, probe.stderr
        got = json.loads(probe.stdout)
        assert got["omp_wait_policy"] == want and got["sgemm_gflops"] > 0
