"""The prepared GPU command: everything a first, short GPU window must check and time, in one go.

    ./dev gpu [--out DIR] [--budget SECONDS] [--skip PHASE ...]   # python -m tools.gpucheck
    ./dev gpu --dry-run                                           # the rehearsal, on a CPU

Made for a machine with one H100 or H200, its own Python with torch and Triton installed, nvcc,
compute-sanitizer and ncu, no network, and only one output folder coming back (at most 8 files
of 16 MiB, two folder levels). It uses that machine's Python and packages (no download) and
writes into --out:

    summary.md    first (the plan), rewritten after every phase: what ran, passed, took
    report.json   every phase's result and timing
    logs.txt      the tail of every phase's output
    bench.md      the benchmark suite in paper mode (fused vs official-style vs floor/model)
    bench.json    its rows
    kernels.md    per kernel: profiler time against the cost model's estimate
    ncu.txt       Nsight Compute on the slowest kernel (or the line saying why not)

The phases, in the order they run, with the seconds they are planned at on an H100 (estimates:
the Triton compile of each kernel specialisation, 1-2 s on that machine's CPU, dominates the
first phases; the benchmarks are the suite's paper mode, whose fused steps the cost model puts
at milliseconds, plus the official-style baselines at about a second each):

    env        5 s   devices, versions, whether the profiler counters can be read
    build     75 s   pip install --no-build-isolation --no-deps -e . (the C++ CPU kernels, 16
                     jobs); a failed or slow build is reported and the Triton phases still run
    parity   100 s   tests/test_gpu.py: every public op, Triton against the reference on CUDA
                     tensors, small shapes and the papers' settings; repeats bitwise equal
    memcheck  50 s   compute-sanitizer --tool memcheck on python -m tools.smoke (every kernel
                     launched once, small)
    racecheck 70 s   the same under --tool racecheck (shared-memory hazards)
    bench     90 s   python -m benchmarks --mode paper --device cuda
    kernels   40 s   python -m benchmarks.kernels: profiler time per kernel against the model
    ncu       50 s   ncu on the slowest kernel of that table: occupancy, DRAM throughput, stalls

480 s in all: the default --budget. When the budget is short, phases are dropped in this order
(the first listed goes first): ncu, racecheck, kernels, bench, memcheck, build; env and parity
always run. A phase that overruns is stopped at its planned time x 2 or at the budget's end, and
the plan is made again for what is left.

Without a CUDA device it stops at once with one line. ``--dry-run`` rehearses on a CPU what
does not need CUDA: the plan and budget logic, the file layout and size limits, the launch
script under the Triton interpreter (every kernel must launch), and the report writer fed with
the recorded sample numbers in tools/gpucheck_sample.json (marked as such in the summary).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpucheck_sample.json")
MAX_FILES, MAX_BYTES, LOG_TAIL = 8, 16 << 20, 200_000
BUDGET = 480
SLACK = 15          # seconds a run may lag its plan before later phases are dropped


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: int          # planned on an H100 (see the module docstring)
    drop: int             # drop rank: the lowest is dropped first; 99 = never dropped
    what: str


PHASES = (
    Phase("env", 5, 99, "devices, versions, profiler counters"),
    Phase("build", 75, 6, "pip install --no-build-isolation --no-deps -e ."),
    Phase("parity", 100, 99, "tests/test_gpu.py on CUDA tensors"),
    Phase("memcheck", 50, 5, "compute-sanitizer memcheck, every kernel once"),
    Phase("racecheck", 70, 2, "compute-sanitizer racecheck, every kernel once"),
    Phase("bench", 90, 4, "benchmark suite, paper mode"),
    Phase("kernels", 40, 3, "profiler time per kernel vs the cost model"),
    Phase("ncu", 50, 1, "Nsight Compute on the slowest kernel"),
)
NAMES = tuple(p.name for p in PHASES)
DROP_ORDER = tuple(p.name for p in sorted(PHASES, key=lambda p: p.drop) if p.drop < 99)
FILES = ("summary.md", "report.json", "logs.txt", "bench.md", "bench.json", "kernels.md",
         "ncu.txt")


def plan(budget: float, skip=()) -> tuple[list[Phase], dict[str, str]]:
    """(phases to run in order, {dropped phase: why}): skipped ones out, then the lowest drop
    ranks out until the planned seconds fit the budget."""
    dropped = {p.name: "skipped (--skip)" for p in PHASES if p.name in skip}
    keep = [p for p in PHASES if p.name not in dropped]
    for name in DROP_ORDER:
        if sum(p.seconds for p in keep) <= budget:
            break
        if any(p.name == name for p in keep):
            keep = [p for p in keep if p.name != name]
            dropped[name] = f"dropped: the budget of {budget:.0f} s"
    for name in reversed(DROP_ORDER):          # a later drop may leave room for an earlier one
        p = next(p for p in PHASES if p.name == name)
        if name in dropped and "budget" in dropped[name] and \
                sum(q.seconds for q in keep) + p.seconds <= budget:
            keep.append(p)
            del dropped[name]
    keep.sort(key=PHASES.index)
    return keep, dropped


# --- output parsers (tested on recorded text) -------------------------------------------------
def parse_pytest(text: str) -> dict:
    """Counts from pytest's last summary line and the FAILED lines."""
    import re
    counts = {}
    for line in reversed(text.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", line)
        if found:
            counts = {k.rstrip("s") if k == "errors" else k: int(n) for n, k in found}
            break
    failed = [ln[7:].strip() for ln in text.splitlines() if ln.startswith("FAILED ")]
    return {"counts": counts, "failed": failed,
            "ok": bool(counts) and not counts.get("failed") and not counts.get("error")}


def parse_sanitizer(text: str, kernels: list[str]) -> dict:
    """compute-sanitizer's verdict and, per kernel launched, 'clean' or the first error line
    naming it (errors print '=========     at KERNEL+0x...' under their description)."""
    import re
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    errors = int(m.group(1)) if m else None
    per = {k: "clean" for k in kernels}
    lines = [ln.replace("=========", "").strip() for ln in text.splitlines()]
    for i, ln in enumerate(lines):
        for k in kernels:
            if per[k] == "clean" and re.search(rf"\bat {re.escape(k)}\b", ln):
                j = i            # the description is the nearest line above the 'at'/'by' ones
                while j > 0 and lines[j].startswith(("at ", "by ", "and ")):
                    j -= 1
                per[k] = lines[j]
    return {"errors": errors, "kernels": per, "ok": errors == 0}


def smoke_kernels(text: str) -> list[str]:
    for ln in text.splitlines():
        if ln.startswith("smoke: kernels: "):
            return [k for k in ln[len("smoke: kernels: "):].split(", ") if k]
    return []


def parse_ncu(text: str) -> dict:
    if "ERR_NVGPUCTRPERM" in text:
        return {"ok": False, "line": "ncu: the GPU performance counters cannot be read here "
                                     "(ERR_NVGPUCTRPERM: needs admin or the driver's "
                                     "RmProfilingAdminOnly=0); no ncu figures"}
    keys = ("Achieved Occupancy", "DRAM Throughput", "Memory Throughput", "Compute (SM) "
            "Throughput", "Duration", "Registers Per Thread", "Theoretical Occupancy")
    found = [ln.strip() for ln in text.splitlines() if any(k in ln for k in keys)]
    stalls = [ln.strip() for ln in text.splitlines() if "stall" in ln.lower()][:12]
    if not found:
        return {"ok": False, "line": "ncu: no metrics in its output (see ncu.txt)"}
    return {"ok": True, "metrics": found, "stalls": stalls}


# --- the phases -------------------------------------------------------------------------------
def _run(cmd, timeout, env=None):
    """(returncode or 'timeout', output text, seconds)."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return p.returncode, p.stdout, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return "timeout", out, time.monotonic() - t0
    except FileNotFoundError as e:
        return "missing", f"{cmd[0]}: not found ({e})", time.monotonic() - t0


def _env(extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env.update(extra or {})
    return env


class Runner:
    def __init__(self, out, budget, skip=(), dry_run=False, python=sys.executable):
        self.out, self.budget, self.skip, self.dry_run = out, budget, tuple(skip), dry_run
        self.py = python
        self.t0 = time.monotonic()
        self.report = {"dry_run": dry_run, "budget_s": budget, "phases": {}, "plan": {},
                       "dropped": {}}
        self.logs: list[str] = []

    def left(self):
        return self.budget - (time.monotonic() - self.t0)

    # each returns a result dict (ok, summary line, details)
    def env(self, timeout):
        code = ("import json, torch, triton, sys; d = torch.cuda.is_available(); print(json.dumps("
                "{'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': "
                "torch.version.cuda, 'triton': triton.__version__, 'device': "
                "torch.cuda.get_device_name() if d else None, 'sms': "
                "torch.cuda.get_device_properties(0).multi_processor_count if d else None}))")
        rc, text, _ = _run([self.py, "-c", code], timeout, _env())
        info = json.loads(text.strip().splitlines()[-1]) if rc == 0 else {"error": text[-500:]}
        for tool in ("nvcc", "compute-sanitizer", "ncu", "nvidia-smi"):
            info[tool] = shutil.which(tool) or "not found"
        mods = ("pytest", "numpy", "scipy", "matplotlib", "setuptools", "ninja")
        rc2, missing, _ = _run([self.py, "-c", "import importlib.util as u; print(' '.join(m for m"
                                f" in {mods!r} if u.find_spec(m) is None))"], timeout, _env())
        info["missing modules"] = missing.strip() if rc2 == 0 else "?"
        return {"ok": rc == 0, "info": info,
                "line": f"{info.get('device')}, torch {info.get('torch')} (CUDA "
                        f"{info.get('cuda')}), triton {info.get('triton')}"}, text

    def build(self, timeout):
        cmd = [self.py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
               "--no-index", "-e", "."]
        rc, text, secs = _run(cmd, timeout, _env({"MAX_JOBS": str(os.cpu_count() or 8)}))
        ok = rc == 0
        line = (f"built and installed in {secs:.0f} s" if ok else
                f"the C++ build did not finish ({rc}) in {secs:.0f} s: the CPU kernels are "
                "unavailable, the Triton phases run anyway")
        return {"ok": ok, "line": line}, text

    def parity(self, timeout):
        has_pytest = _run([self.py, "-c", "import pytest"], 60, _env())[0] == 0
        if has_pytest:
            # addopts cleared: the project's --benchmark-disable needs pytest-benchmark
            cmd = [self.py, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                   "tests/test_gpu.py"]
        else:                 # the small-shape parity of every op, without pytest
            cmd = [self.py, "-m", "tools.smoke", "--device", "cuda", "--parity"]
        rc, text, _ = _run(cmd, timeout, _env())
        res = parse_pytest(text)
        c = res["counts"]
        res["line"] = (", ".join(f"{n} {k}" for k, n in c.items()) or f"no result ({rc})") + (
            "" if has_pytest else " (no pytest here: tools.smoke --parity, small shapes only)")
        return res, text

    def _sanitize(self, tool, timeout):
        rc, text, _ = _run(["compute-sanitizer", "--tool", tool, "--print-limit", "20",
                            self.py, "-m", "tools.smoke", "--device", "cuda"], timeout, _env())
        res = parse_sanitizer(text, smoke_kernels(text))
        bad = [k for k, v in res["kernels"].items() if v != "clean"]
        res["line"] = (f"{res['errors']} errors; {len(res['kernels'])} kernels, "
                       f"{len(bad)} not clean" + (f" ({', '.join(bad)})" if bad else "")
                       if res["errors"] is not None else f"no verdict ({rc})")
        return res, text

    def memcheck(self, timeout):
        return self._sanitize("memcheck", timeout)

    def racecheck(self, timeout):
        return self._sanitize("racecheck", timeout)

    def bench(self, timeout):
        tmp = os.path.join(self.out, ".bench")
        rc, text, _ = _run([self.py, "-m", "benchmarks", "--mode", "paper", "--device", "cuda",
                            "--quiet", "--out", tmp], timeout, _env())
        md = sorted(f for f in os.listdir(tmp) if f.endswith(".md")) if os.path.isdir(tmp) else []
        for f in md:
            shutil.copy(os.path.join(tmp, f), os.path.join(self.out, "bench.md"))
            shutil.copy(os.path.join(tmp, f[:-3] + ".json"), os.path.join(self.out,
                                                                          "bench.json"))
        shutil.rmtree(tmp, ignore_errors=True)
        return {"ok": rc == 0 and bool(md), "line": "bench.md, bench.json" if md else
                f"no results ({rc})"}, text

    def kernels(self, timeout):
        path = os.path.join(self.out, ".kernels.json")
        rc, text, _ = _run([self.py, "-m", "benchmarks.kernels", "--device", "cuda", "--out",
                            path], timeout, _env())
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = json.load(f)
            os.remove(path)
        return self._kernel_rows(rows, rc), text

    def _kernel_rows(self, rows, rc=0):
        sys.path.insert(0, ROOT)
        from benchmarks.kernels import TORCH, markdown
        with open(os.path.join(self.out, "kernels.md"), "w") as f:
            f.write(markdown(rows))
        timed = [r for r in rows if r["group"] != TORCH and r["measured_ms"]]
        slow = max(timed, key=lambda r: r["measured_ms"], default=None)
        self.report["slowest"] = slow
        return {"ok": bool(rows), "rows": rows, "line": (
            f"{len(rows)} rows; slowest {slow['group']} ({slow['op']}) {slow['measured_ms']} ms,"
            f" model {slow['model_ms']} ms" if slow else f"no rows ({rc})")}

    def ncu(self, timeout):
        slow = self.report.get("slowest")
        if not slow:
            return {"ok": False, "line": "ncu: no kernel table to pick the slowest from"}, ""
        name = slow["group"].split(" + ")[0]
        rc, text, _ = _run(["ncu", "--kernel-name", f"regex:^{name}", "--launch-count", "1",
                            "--section", "SpeedOfLight", "--section", "Occupancy",
                            "--section", "WarpStateStats", "--section", "LaunchStats",
                            self.py, "-m", "benchmarks.kernels", "--device", "cuda", "--only",
                            slow["op"]], timeout, _env())
        with open(os.path.join(self.out, "ncu.txt"), "w") as f:
            f.write(text[-MAX_BYTES // 2:])
        res = parse_ncu(text)
        res.setdefault("line", f"ncu on {name}: {len(res.get('metrics', []))} metrics")
        return res, text

    # --- the dry run: what a CPU can rehearse --------------------------------------------------
    def dry(self, phase, timeout):
        """Recorded sample numbers for every phase, except the launch script, which runs for
        real under the interpreter (memcheck's slot)."""
        with open(SAMPLE) as f:
            sample = json.load(f)
        if phase.name == "env":
            return self.env(timeout)
        if phase.name == "memcheck":
            rc, text, _ = _run([self.py, "-m", "tools.smoke", "--device", "cpu"], timeout,
                               _env({"TRITON_INTERPRET": "1"}))
            kernels = smoke_kernels(text)
            res = parse_sanitizer(sample["memcheck"], kernels)
            res["line"] = (f"the launch script under the interpreter: {len(kernels)} kernels "
                           f"launched ({rc}); sanitizer verdict from the sample")
            res["ok"] = rc == 0 and res["ok"]
            return res, text
        if phase.name == "racecheck":       # the sample holds one hazard: the error path
            res = parse_sanitizer(sample["racecheck"], sample["kernels"])
            return res | {"line": f"recorded sample: {res['errors']} error"}, sample["racecheck"]
        if phase.name == "parity":
            res = parse_pytest(sample["parity"])
            return res | {"line": f"recorded sample: {res['counts']}"}, sample["parity"]
        if phase.name == "kernels":
            return self._kernel_rows(sample["kernel_rows"]), ""
        if phase.name == "ncu":
            with open(os.path.join(self.out, "ncu.txt"), "w") as f:
                f.write(sample["ncu"])
            return parse_ncu(sample["ncu"]), sample["ncu"]
        if phase.name == "bench":
            for name in ("bench.md", "bench.json"):
                with open(os.path.join(self.out, name), "w") as f:
                    f.write(sample[name])
            return {"ok": True, "line": "recorded sample"}, ""
        return {"ok": True, "line": f"not run in a dry run ({phase.what})"}, ""

    # --- driver --------------------------------------------------------------------------------
    def go(self):
        os.makedirs(self.out, exist_ok=True)
        keep, dropped = plan(self.budget, self.skip)
        self.report["plan"] = {p.name: p.seconds for p in keep}
        self.report["dropped"] = dropped
        self.write()
        while keep:
            phase, keep = keep[0], keep[1:]
            # re-plan what is left after an overrun: drop in the stated order until it fits
            while keep and sum(p.seconds for p in keep) + phase.seconds > self.left() + SLACK:
                victim = next((n for n in DROP_ORDER if n in {p.name for p in keep}), None)
                if victim is None:
                    break
                keep = [p for p in keep if p.name != victim]
                self.report["dropped"][victim] = "dropped: an earlier phase overran"
            timeout = max(10, min(2 * phase.seconds, self.left()))
            t = time.monotonic()
            print(f"gpucheck: {phase.name} ({phase.what}), planned {phase.seconds} s ...",
                  flush=True)
            try:
                res, text = (self.dry(phase, timeout) if self.dry_run else
                             getattr(self, phase.name)(timeout))
            except Exception as e:               # a phase's own failure must not stop the rest
                res, text = {"ok": False, "line": f"{type(e).__name__}: {e}"}, repr(e)
            res["seconds"] = round(time.monotonic() - t, 1)
            self.report["phases"][phase.name] = res
            self.logs.append(f"===== {phase.name} ({res['seconds']} s)\n{text[-LOG_TAIL:]}\n")
            print(f"gpucheck: {phase.name}: {'ok' if res.get('ok') else 'NOT OK'}: "
                  f"{res.get('line', '')} ({res['seconds']} s)", flush=True)
            self.write()
        self.report["total_s"] = round(time.monotonic() - self.t0, 1)
        self.write()
        return 0 if all(r.get("ok") for r in self.report["phases"].values()) else 1

    def write(self):
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(summary(self.report))
        with open(os.path.join(self.out, "report.json"), "w") as f:
            json.dump(self.report, f, indent=1, default=str)
        with open(os.path.join(self.out, "logs.txt"), "w") as f:
            f.write("".join(self.logs)[-MAX_BYTES // 2:])
        check_limits(self.out)


def summary(report) -> str:
    lines = ["# pixcon on a GPU: ./dev gpu", ""]
    if report["dry_run"]:
        lines += ["**DRY RUN on a CPU: every number below but the launch script's is the "
                  "recorded sample in tools/gpucheck_sample.json, not a measurement.**",
                  ""]
    env = report["phases"].get("env", {}).get("info")
    if env:
        lines += [f"Machine: {env.get('device')} ({env.get('sms')} SMs), Python "
                  f"{env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
                  f"Triton {env.get('triton')}; ncu {env.get('ncu')}, compute-sanitizer "
                  f"{env.get('compute-sanitizer')}; modules missing: "
                  f"{env.get('missing modules') or 'none'}.", ""]
    lines += [f"Budget {report['budget_s']:.0f} s; total "
              f"{report.get('total_s', 'running')} s.", "",
              "| phase | planned s | took s | result |", "|---|---|---|---|"]
    for p in PHASES:
        res = report["phases"].get(p.name)
        if res is not None:
            verdict = "ok" if res.get("ok") else "**NOT OK**"
            lines.append(f"| {p.name} | {p.seconds} | {res['seconds']} | {verdict}: "
                         f"{res.get('line', '')} |")
        elif p.name in report["dropped"]:
            lines.append(f"| {p.name} | {p.seconds} | - | {report['dropped'][p.name]} |")
        elif p.name in report["plan"]:
            lines.append(f"| {p.name} | {p.seconds} | - | not reached |")
    for name in ("memcheck", "racecheck"):
        res = report["phases"].get(name)
        if res and res.get("kernels"):
            lines += ["", f"## {name}, per kernel", "", "| kernel | verdict |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(res["kernels"].items())]
    failed = report["phases"].get("parity", {}).get("failed")
    if failed:
        lines += ["", "## parity failures", ""] + [f"- {f}" for f in failed]
    rows = report["phases"].get("kernels", {}).get("rows")
    if rows:
        sys.path.insert(0, ROOT)
        from benchmarks.kernels import markdown
        lines += ["", "## per kernel: profiler against the cost model (H100)", "",
                  markdown(rows)]
    ncu = report["phases"].get("ncu")
    if ncu:
        lines += ["", "## ncu", ""] + ([ncu["line"]] if not ncu.get("ok") else
                                      [f"- {m}" for m in ncu["metrics"] + ncu["stalls"]])
    return "\n".join(lines) + "\n"


def check_limits(out):
    """The output folder fits what comes back: at most MAX_FILES files of MAX_BYTES, two folder
    levels; raises otherwise (a file that would not come back is a silent loss)."""
    files = []
    for root, dirs, names in os.walk(out):
        depth = os.path.relpath(root, out).count(os.sep) + (root != out)
        if depth > 2:
            raise RuntimeError(f"gpucheck: {root} is deeper than two folder levels")
        files += [os.path.join(root, n) for n in names if not n.startswith(".")]
    if len(files) > MAX_FILES:
        raise RuntimeError(f"gpucheck: {len(files)} files in {out}, at most {MAX_FILES} return")
    for f in files:
        if os.path.getsize(f) > MAX_BYTES:
            raise RuntimeError(f"gpucheck: {f} is over {MAX_BYTES >> 20} MiB")
    return files


def main(argv=None):
    from pixcon._cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="./dev gpu (python -m tools.gpucheck)",
                                 description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpucheck-out",
                    help="the output folder (default: $OUT, else ./gpucheck-out)")
    ap.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole run")
    ap.add_argument("--skip", nargs="+", default=(), choices=NAMES, metavar="PHASE",
                    help=f"phases not to run: {', '.join(NAMES)}")
    ap.add_argument("--dry-run", action="store_true",
                    help="rehearse on a CPU (see above); no CUDA needed")
    ap.add_argument("--plan", action="store_true", help="print the plan for --budget and stop")
    args = ap.parse_args(argv)
    keep, dropped = plan(args.budget, args.skip)
    if args.plan:
        for p in keep:
            print(f"{p.name:10s} {p.seconds:4d} s  {p.what}")
        for n, why in dropped.items():
            print(f"{n:10s}    - {why}")
        return 0
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            sys.exit("./dev gpu: no CUDA device on this machine (torch "
                     f"{torch.__version__}, CUDA {torch.version.cuda}); --dry-run rehearses "
                     "the command on a CPU")
    return Runner(args.out, args.budget, args.skip, args.dry_run).go()


if __name__ == "__main__":
    sys.exit(main())
