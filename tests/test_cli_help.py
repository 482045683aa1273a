"""Every command line's --help shows every default: each option either prints its default
("(default: ...)", added by pixcon._cli.HelpFormatter) or, where the default is None or False
or the option is a flag, says in its help what happens when it is left out."""
import argparse
import importlib
import sys

import pytest

from pixcon._cli import HelpFormatter

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

COMMANDS = ["pixcon.train.cli", "pixcon.demo", "pixcon.viz", "benchmarks.suite",
            "benchmarks.bench_reco", "benchmarks.bench_cac", "benchmarks.bench_contrastiveseg",
            "benchmarks.bench_contextrast", "benchmarks.bench_edt", "benchmarks.bench_threads",
            "benchmarks.grid", "tools.mutmut_pass"]


class _Stop(Exception):
    pass


def _parsers(module, monkeypatch):
    """The parser(s) a command's main() builds, caught at parse_args (nothing runs)."""
    seen = []

    def catch(self, *a, **k):
        seen.append(self)
        raise _Stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Stop):
        importlib.import_module(module).main([])
    out = []
    todo = list(seen)
    while todo:
        p = todo.pop()
        out.append(p)
        for act in p._actions:
            if isinstance(act, argparse._SubParsersAction):
                todo.extend(act.choices.values())
    return out


@pytest.mark.parametrize("module", COMMANDS)
def test_help_shows_every_default(module, monkeypatch):
    parsers = _parsers(module, monkeypatch)
    checked = 0
    for p in parsers:
        assert p.formatter_class is HelpFormatter, f"{module}: {p.prog} uses another formatter"
        text = p.format_help()
        for act in p._actions:
            if not act.option_strings or act.default is argparse.SUPPRESS or act.dest == "help":
                continue
            assert act.help, f"{module} {p.prog}: {act.option_strings[0]} has no help"
            flag = isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if flag:                # a flag's default is its absence: no "(default: True)"
                assert "%(default)" not in HelpFormatter(p.prog)._get_help_string(act)
            elif act.default not in (None, False):
                shown = HelpFormatter(p.prog)._get_help_string(act)
                assert "(default: %(default)s)" in shown, act.option_strings[0]
                assert f"(default: {act.default}" in " ".join(text.split()), act.option_strings[0]
            checked += 1
    assert checked >= 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("argv", [["-m", "pixcon.train", "run", "--device", "cuda"],
                                  ["-m", "pixcon.demo", "--device", "cuda"],
                                  ["-m", "pixcon.viz", "missing.pt", "--device", "cuda"],
                                  ["-m", "benchmarks", "--device", "cuda:1"],
                                  ["-m", "pixcon.demo", "--device", "gpu0"]])
def test_an_unavailable_device_is_one_line(argv):
    """A device this machine lacks: exit status 1 and one line on stderr saying what is
    missing, no traceback (the device is checked before anything loads)."""
    import subprocess
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=root,
                       timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "--device" in lines[0]
    assert ("CPU-only" in lines[0]) or ("not a device name" in lines[0])
