"""A systematic mutation pass with an off-the-shelf tool (mutmut 3), beside our own list of
realistic mistakes (tools/mutate.py): every operator, constant, argument and comparison mutmut
knows how to change, in the modules whose arithmetic decides the methods' values.

    ./dev mutmut                     # the modules below, a 40-minute budget, 1 worker
    ./dev mutmut --budget 600 --only 'pixcon.nn.u2pl*'

What it mutates (MODULES): the references (pixcon/reference), the steps they share with the
fused paths (pixcon/core), the three banks (pixcon/nn/memory.py, u2pl.py, cac.py) and the
trainer's semi-supervised rules (pixcon/train/semisup.py). The tests each mutant runs are those
of TESTS that executed the mutated function in a clean run (mutmut's own mapping), without the
slow and interpreter tests. Argument checks and their messages (SKIP) are not mutated: the
error tests pin them, and this pass is about the arithmetic. Only lines the tests execute are
mutated (a line no test runs is reported by coverage, not here). The run happens in a copy of the tree (git-tracked files and the
built extension); mutmut is installed on first use into .mutmut-venv, which sees .venv's
packages. Results: tools/mutmut-last.json (not tracked) and, on stdout, every survivor that
tools/mutmut-notes.md does not account for, with its diff. The notes say, per survivor (its
function and changed line), which test now kills it or why it is equivalent. Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".mutmut-venv"
MUTMUT = "mutmut==3.8.1"
NOTES = ROOT / "tools" / "mutmut-notes.md"
MODULES = ["pixcon/reference/*.py", "pixcon/core/*.py", "pixcon/nn/memory.py",
           "pixcon/nn/u2pl.py", "pixcon/nn/cac.py", "pixcon/train/semisup.py"]
SKIP = [   # statements left alone (regexes over a statement's first line): argument checks and
    # their messages (tests/test_messages.py and each op's error tests pin those), reprs
    r"^\s*raise\b", r"^\s*(chk\.)?check_\w+\(", r"^\s*warnings\.warn\(", r"def extra_repr"]
TESTS = ["tests/test_reco.py", "tests/test_semantics.py", "tests/test_primitives.py",
         "tests/test_contextrast.py", "tests/test_contrastiveseg.py", "tests/test_cac.py",
         "tests/test_cac_ablation.py", "tests/test_u2pl.py", "tests/test_edt.py",
         "tests/test_rng.py", "tests/test_tiled.py", "tests/test_thresholds.py",
         "tests/test_options.py", "tests/test_messages.py", "tests/test_train.py",
         "tests/test_reliability.py", "tests/test_readme_signatures.py"]


def _python():
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], capture_output=True, text=True, check=True)
        project = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig."
                                  "get_paths()['purelib'])"], capture_output=True, text=True,
                                 check=True)
        Path(site.stdout.strip(), "zz_pixcon_venv.pth").write_text(project.stdout.strip() + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", MUTMUT], check=True)
    return str(py)


def _config():
    lines = ["[mutmut]", "source_paths=pixcon", "only_mutate=" + "\n    ".join(MODULES),
             "also_copy=pixcon_kernels\n    README.md\n    tools\n    conftest.py\n    benchmarks",
             "pytest_add_cli_args=-p\n    no:cacheprovider\n    -m\n    not slow and not interpret",
             "pytest_add_cli_args_test_selection=" + "\n    ".join(TESTS),
             "process_isolation=forkserver",
             "mutate_only_covered_lines=true",
             "do_not_mutate_patterns=" + "\n    ".join(SKIP)]
    return "\n".join(lines) + "\n"


def _copy_tree(dst: Path):
    """tools/mutate.py's copy (tracked files and the built extension), with mutmut's config."""
    sys.path.insert(0, str(ROOT))
    from tools.mutate import _copy_tree as copy
    copy(dst)
    (dst / "setup.cfg").write_text(_config())


def _diff(py, tree, name):
    out = subprocess.run([py, "-m", "mutmut", "show", name], cwd=tree, capture_output=True,
                         text=True).stdout
    return [ln for ln in out.splitlines() if re.match(r"^[-+](?![-+])", ln)]


def _key(name, diff):
    """A survivor's key in the notes: its function and its changed line (names shift when a
    function's source changes; the pair does not)."""
    func = re.sub(r"\.x[_ǁ]", ".", re.sub(r"__mutmut_\d+$", "", name)).replace("ǁ", ".")
    new = next((ln[1:].strip() for ln in diff if ln.startswith("+")), "")
    return f"{func} | {new}"


def noted():
    """Keys the notes account for: their table rows `| `function` | `mutated line` | verdict |`
    (code in backticks, a `|` inside it escaped as `\\|`), but for verdicts "open ..." (a
    survivor listed, not yet killed or argued)."""
    keys = set()
    if NOTES.exists():
        for ln in NOTES.read_text().splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip().strip("|"))]
            if len(cells) >= 3 and cells[0].startswith("`") and cells[1].startswith("`") \
                    and not cells[2].startswith("open"):
                func, line = (c.strip("`").replace("\\|", "|") for c in cells[:2])
                keys.add(f"{func} | {line}")
    return keys


def main(argv=None):
    from pixcon._cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="./dev mutmut", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--budget", type=float, default=2400, help="seconds for mutmut run")
    ap.add_argument("--children", type=int, default=1, help="mutants run at once")
    ap.add_argument("--only", nargs="*", default=[], help="mutant name globs (default: all)")
    ap.add_argument("--tree", default=None,
                    help="the copy to work in, kept with mutmut's results so that a later run "
                         "goes on from them (left out: a fresh temporary copy)")
    ap.add_argument("--json", default=str(ROOT / "tools" / "mutmut-last.json"),
                    help="where the counts and the survivors with their diffs go")
    a = ap.parse_args(argv)
    py = _python()
    tree = Path(a.tree) if a.tree else Path(tempfile.mkdtemp(prefix="pixcon-mutmut-"))
    if not (tree / "setup.cfg").exists():
        _copy_tree(tree)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    print(f"mutmut in {tree}, budget {a.budget:.0f} s", flush=True)
    try:
        subprocess.run([py, "-m", "mutmut", "run", "--max-children", str(a.children), *a.only],
                       cwd=tree, env=env, timeout=a.budget, stdout=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print("budget spent: the mutants not reached stay 'not checked'")
    res = subprocess.run([py, "-m", "mutmut", "results", "--all", "true"], cwd=tree, env=env,
                         capture_output=True, text=True).stdout
    status = dict(re.findall(r"^\s*(\S+): (.+)$", res, re.M))
    counts = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    known, rows = noted(), []
    for name, s in sorted(status.items()):
        if s == "survived":
            diff = _diff(py, tree, name)
            rows.append({"name": name, "key": _key(name, diff), "diff": diff})
    fresh = [r for r in rows if r["key"] not in known]
    Path(a.json).write_text(json.dumps({"counts": counts, "survivors": rows}, indent=1))
    print("results:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"{len(rows)} survived, {len(rows) - len(fresh)} of them in {NOTES.name}; "
          f"not accounted for: {len(fresh)}")
    for r in fresh:
        print(f"\n{r['key']}\n  " + "\n  ".join(r["diff"]))
    return 1 if fresh else 0


if __name__ == "__main__":
    sys.exit(main())
