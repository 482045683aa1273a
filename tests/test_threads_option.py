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

