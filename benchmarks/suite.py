"""The benchmark suite: every op's module at the sizes of a mode, one table, one JSON, plots.

    python -m benchmarks                    # mode "cpu" on a CPU, "paper" on a GPU
    python -m benchmarks --mode ci          # seconds: every module at its tiny size (CI runs it)
    python -m benchmarks --mode paper       # the papers' settings
    python -m benchmarks --only reco cac --official reco=~/src/reco
    python -m benchmarks --mode cpu --grid none   # the suite without the settings grid
    pytest benchmarks/ --benchmark-enable   # the same cases through pytest-benchmark

Writes under --out (benchmarks/results): <date>-<device>-suite-<mode>.json (every row, tagged
with device, threads, torch, triton, commit and date), .md (each module's table) and one PNG per
op and metric (time and peak extra memory against problem size, a line per provider).
On a CPU every row also gets its floor on this CPU's own roofline (benchmarks/roofline.py: sgemm,
copy and gather rates measured in the run) and its time as a multiple of it. On a CPU the suite
is followed by the settings grid (benchmarks/grid.py: every contrastive loss
over a grid of settings at 1 and 2 threads, idle and loaded; "small" in --mode cpu).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import torch

from pixcon._cli import THREADS_HELP, HelpFormatter, apply_threads, check_device

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:        # the bench modules import their siblings (baselines, plot)
    sys.path.insert(0, HERE)
MODES = ("ci", "cpu", "paper")


def _pixels(r):
    s = r["shape"]
    return s[0] * s[-2] * s[-1]


# module: (sizes per mode, what the x axis counts, x of a row)
SUITE = {
    "reco": ({"ci": ["tiny"], "cpu": ["tiny", "cpu"], "paper": ["voc"]}, "pixels", _pixels),
    "contrastiveseg": ({"ci": ["tiny"], "cpu": ["tiny", "cpu"], "paper": ["cityscapes"]},
                       "pixels", _pixels),
    "cac": ({"ci": ["tiny"], "cpu": ["tiny", "cpu"], "paper": ["cityscapes"]},
            "anchors x negatives", lambda r: r["anchors"] * r["negatives"]),
    "contextrast": ({"ci": ["tiny"], "cpu": ["tiny", "cpu"], "paper": ["hrnet"]},
                    "pixels of the first layer",
                    lambda r: r["batch"] * r["layers"][0][0] * r["layers"][0][1]),
    "edt": ({"ci": ["tiny"], "cpu": ["tiny", "bane"], "paper": ["pyramid", "large", "512"]},
            "pixels", lambda r: math.prod(r["shape"])),
    "u2pl": ({"ci": ["tiny"], "cpu": ["tiny", "cpu"], "paper": ["voc"]}, "pixels", _pixels),
}
PRIMITIVES = ("edt",)          # benchmarks of a shared primitive, beside the methods'


def _check_covers_methods():
    """Every method of the table (pixcon.methods) has its benchmark here."""
    from pixcon.methods import NAMES
    missing = [n for n in NAMES if n not in SUITE]
    if missing or set(SUITE) - set(NAMES) - set(PRIMITIVES):
        raise KeyError(f"benchmarks/suite.py: SUITE must hold every method of pixcon.methods "
                       f"and the primitives {PRIMITIVES}; missing {missing}")


_check_covers_methods()


def load(name: str):
    """benchmarks/bench_<name>.py as a module (benchmarks/ is a folder of scripts)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(HERE, f"bench_{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_module(name: str, size: str, *, device, reps: int, official=None, providers=None):
    """One module at one size: its rows, each with the common columns added."""
    sizes, xlabel, x_of = SUITE[name]
    mod = load(name)
    kw = dict(device=device, reps=reps, verbose=False)
    if providers is not None:
        kw["providers"] = providers
    if name == "reco" and official is not None:
        kw["official"] = official
    rows = mod.run(size, **kw)
    import floor
    for r in rows:
        r.update(module=name, x=x_of(r), x_label=xlabel, threads=torch.get_num_threads(),
                 time_ms=r.get("fwd_bwd_ms", r.get("ms")))
        r.update(floor.estimate(r))
    return rows


# glibc keeps freed blocks resident once its mmap threshold has grown past them, so a process's
# resident size would remember an earlier provider's peak; a fixed threshold returns every
# large block to the system on free (what a fresh process per measurement would see)
FRESH_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_module_fresh(name: str, size: str, *, device, reps: int, official_spec=None):
    """run_module with every provider in a process of its own (fixed malloc thresholds,
    FRESH_ENV; modules without a provider choice, the EDT's, run whole): each row's
    peak_rss_mib is then the resident-set rise of that provider's step in a fresh process."""
    import json
    import subprocess
    providers = getattr(load(name), "PROVIDERS", None)
    groups = [[p] for p in providers] if providers else [None]
    if providers and official_spec and name == "reco":
        groups.append([])                 # the official provider alone (added by run())
    rows = []
    for group in groups:
        code = (
            "import json, sys, torch\n"
            f"sys.path.insert(0, {HERE!r})\n"
            "import suite\n"
            f"spec = {official_spec!r} if {group!r} in (None, []) else None\n"
            "official = None if spec is None else "
            "__import__('baselines').load_official(spec)[1]\n"
            f"rows = suite.run_module({name!r}, {size!r}, device={str(device)!r}, reps={reps}, "
            f"official=official, providers={group!r})\n"
            "print('ROWS' + json.dumps(rows))\n")
        env = {**os.environ, **FRESH_ENV}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"benchmark {name} {size} {group} failed in its own process:\n"
                               + r.stderr[-2000:])
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ROWS"))
        rows += json.loads(line[4:])
    for row in rows:
        row["fresh_process"] = True
    return rows


def run_suite(mode: str, *, device=None, reps=None, only=None, official=None, progress=True,
              fresh=False, official_spec=None):
    from pixcon.progress import Progress
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if reps is None:
        reps = 1 if mode == "ci" or (mode == "paper" and device.type == "cpu") else 3
    names = [n for n in SUITE if only is None or n in only]
    jobs = [(n, s) for n in names for s in SUITE[n][0][mode]]
    bar = Progress(len(jobs), f"benchmarks ({mode}, {device.type})", progress)
    rows = []
    for i, (name, size) in enumerate(jobs):
        bar.update(i, f"{name} {size}")
        if fresh:
            rows += run_module_fresh(name, size, device=device, reps=reps,
                                     official_spec=official_spec)
        else:
            rows += run_module(name, size, device=device, reps=reps, official=official)
    bar.update(len(jobs), "done")
    bar.close()
    if device.type == "cpu":                 # this CPU's roofline, at this run's thread count
        import roofline
        rates = roofline.measure("small" if mode == "ci" else "full")
        for r in rows:
            r["cpu_roofline"] = rates
            r.update(roofline.floor(r, rates))
    return rows


def line_name(r: dict) -> str:
    """A provider with a memory bank is another line (plots) or row (tables), not another point."""
    return r["provider"] + (" + bank" if r.get("bank", "none") != "none" else "")


def markdown(rows) -> str:
    """Each module's own table per size, under one heading."""
    parts = []
    groups = {}
    for r in rows:
        groups.setdefault((r["module"], r["size"]), []).append(r)
    for (name, size), rs in groups.items():
        parts.append(load(name).markdown(rs))
        if any(r.get("loss") is not None for r in rs) and \
                {r["provider"] for r in rs} & {"official-style", "official"}:
            parts.append(LOSS_NOTE)
    import floor
    import roofline
    parts.append(floor.markdown(rows))
    parts.append(roofline.markdown(rows))
    rss = [r for r in rows if r.get("peak_rss_mib") is not None]
    if rss:
        fresh = any(r.get("fresh_process") for r in rss)
        parts.append("Peak resident-set rise during one forward+backward (MiB; everything the "
                     "process touched: tensors, the kernels' own buffers, allocator caches"
                     + ("; each provider in a process of its own" if fresh else
                        "; one process for the whole suite, so read with care") + "):\n")
        parts.append("| op | size | provider | live tensors MiB | resident set MiB |\n"
                     "|---|---|---|---|---|")
        parts += [f"| {r['op']} | {r['size']} | {line_name(r)} | "
                  f"{r.get('peak_extra_mib')} | {r['peak_rss_mib']} |" for r in rss]
        parts.append("")
    return "\n".join(parts)


TITLES = {"time": "forward+backward time", "memory": "peak extra memory (live tensors)",
          "rss": "peak resident-set rise (the whole process)"}
FORWARD_ONLY = {"distance_transform"}       # no backward: its plots say "forward time"


def title(op: str, metric: str) -> str:
    if metric == "time" and op in FORWARD_ONLY:
        return "forward time (no backward: not differentiable)"
    return TITLES[metric]


LOSS_NOTE = ("The loss column differs between official-style and pixcon rows on purpose: the "
             "official-style providers draw their samples with torch's generator (and read labels "
             "as the official code does), pixcon's with its Philox streams, so each row's value is "
             "its own sample's loss. Equal seeds give equal values across pixcon's backends.\n")


def plots(rows, stem: str) -> list[str]:
    """<stem>-<op>-time.png and -memory.png: one line per provider."""
    from plot import line_plot
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        rs = [r for r in rows if r["op"] == op]
        for metric, key, unit in (("time", "time_ms", "ms"), ("memory", "peak_extra_mib", "MiB"),
                                  ("rss", "peak_rss_mib", "MiB")):
            series = {}
            for r in rs:
                series.setdefault(line_name(r), []).append((r["x"], r.get(key)))
            m = rs[0]
            path = line_plot(series, f"{stem}-{op}-{metric}.png",
                             title=f"{op}: {title(op, metric)}"
                                   f"\n{m['device']}, torch {m['torch']}, {m['date']}",
                             xlabel=m["x_label"], ylabel=f"{metric} ({unit})")
            if path:
                out.append(path)
    return out


def write(rows, out: str, mode: str) -> list[str]:
    """JSON, Markdown and PNGs under ``out``; returns the paths written."""
    import benchkit as pb
    stem = pb.write_results(rows, out, f"suite-{mode}", markdown(rows))
    try:
        pngs = plots(rows, stem)
    except ImportError as e:               # matplotlib is an optional extra: the numbers stand
        print(f"no plots: {e}", file=sys.stderr)
        pngs = []
    return [f"{stem}.json", f"{stem}.md"] + pngs


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--mode", choices=MODES, default=None,
                    help="ci (tiny sizes), cpu (tiny + reduced; the CPU default), paper (the "
                         "papers' settings; the GPU default)")
    ap.add_argument("--only", nargs="+", choices=list(SUITE), default=None,
                    help="these ops only (default: all)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--threads", default="auto", help=THREADS_HELP)
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per case (default: the mode's)")
    ap.add_argument("--official", default=None, metavar="reco=PATH",
                    help="add the official code from your checkout as a provider")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--fresh", action="store_true",
                    help="run each provider in a process of its own (fixed malloc "
                         "thresholds), so the resident-set column is that provider's own peak; "
                         "its times are pessimistic, every allocation above 128 KiB being "
                         "mapped afresh (default: one process)")
    ap.add_argument("--grid", choices=("none", "ci", "small", "full"), default=None,
                    help="then the CPU settings grid (benchmarks/grid.py) at this size "
                         "(default: small in --mode cpu, none otherwise)")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="only redraw the plots of a suite JSON written before, next to it")
    a = ap.parse_args(argv)
    check_device("benchmarks", a.device)
    apply_threads("benchmarks", a.threads)
    if a.replot:
        import json
        with open(a.replot) as f:
            paths = plots(json.load(f), a.replot[:-len(".json")])
        print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
        return 0
    mode = a.mode or ("paper" if torch.cuda.is_available() else "cpu")
    official = None
    if a.official:
        from baselines import load_official
        official = load_official(a.official)[1]
    rows = run_suite(mode, device=a.device, reps=a.reps, only=a.only, official=official,
                     progress=not a.quiet, fresh=a.fresh, official_spec=a.official)
    paths = write(rows, a.out, mode)
    print(markdown(rows))
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    grid = a.grid or ("small" if mode == "cpu" else "none")
    if grid != "none":
        import grid as grid_mod
        grid_mod.main(["--grid", grid, "--out", a.out] + (["--quiet"] if a.quiet else []))
    return 0
