"""Thread study: the CPU default ("native") of every op at 1 and at 2 threads, interleaved.

    python benchmarks/bench_threads.py               # the CPU settings, 3 rounds
    python benchmarks/bench_threads.py --rounds 5 --threads 1 2 4

pixcon's compiled kernels parallelise with ATen's intra-op pool (at::parallel_for; the tiled
contrast claims work items inside one region per pass): ``torch.set_num_threads(n)`` (or
OMP_NUM_THREADS) caps them and torch's own ops. On a shared 2-core machine a second thread can cost more than it gives (wake-up stalls on
short parallel regions), so this measures every case at each count, alternating the order per
round, and reports the median per count and the ratio to one thread. Writes
<out>/<date>-<device>-threads.{json,md}.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchkit, baselines
import benchkit as pb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# module, size, rows' fields that tell its cases apart
CASES = [("reco", "cpu", ("present_classes",)), ("reco", "voc", ("present_classes",)),
         ("contrastiveseg", "cpu", ("bank",)), ("cac", "cpu", ()),
         ("contextrast", "cpu", ()), ("edt", "bane", ("shape", "classes"))]


def _load(name):
    import importlib
    return importlib.import_module(f"bench_{name}")


def _rows(name, size, reps):
    mod = _load(name)
    if name == "edt":           # its own 1-thread / all-threads providers: keep the latter
        rows = mod.run(size, reps=reps, verbose=False, threads=torch.get_num_threads())
        return [r for r in rows if r["provider"] == "pixcon C++ (all threads)"]
    return mod.run(size, providers=["native"], reps=reps, verbose=False)


def run(cases=CASES, threads=(1, 2), rounds=3, reps=3, out=None):
    old = torch.get_num_threads()
    times = {}
    try:
        for k in range(rounds):
            order = threads if k % 2 == 0 else tuple(reversed(threads))
            for n in order:
                torch.set_num_threads(n)
                for name, size, fields in cases:
                    for r in _rows(name, size, reps):
                        key = (r["op"], size, json.dumps({f: r.get(f) for f in fields}))
                        ms = r.get("fwd_bwd_ms", r.get("ms"))
                        times.setdefault(key, {}).setdefault(n, []).append(ms)
    finally:
        torch.set_num_threads(old)
    meta = pb.metadata(torch.device("cpu"))
    rows = []
    for (op, size, case), per in times.items():
        med = {n: statistics.median(v) for n, v in per.items()}
        rows.append({"op": op, "size": size, "case": json.loads(case), "provider": "native",
                     "ms": {str(n): round(m, 3) for n, m in med.items()},
                     "ratio_to_1": {str(n): round(m / med[threads[0]], 3)
                                    for n, m in med.items()},
                     "rounds": rounds, "reps": reps, **meta})
    if out:
        pb.write_results(rows, out, "threads", markdown(rows))
    return rows


def markdown(rows) -> str:
    counts = list(rows[0]["ms"])
    m = rows[0]
    lines = [pb.title("thread study (native)", m), "",
             "| op | size | case | " + " | ".join(f"{n} thread(s) ms" for n in counts) + " | "
             + " | ".join(f"{n} vs {counts[0]}" for n in counts[1:]) + " |",
             "|---|---|---|" + "---|" * (2 * len(counts) - 1)]
    for r in rows:
        case = ", ".join(f"{k}={v}" for k, v in r["case"].items()) or "-"
        lines.append(f"| {r['op']} | {r['size']} | {case} | "
                     + " | ".join(f"{r['ms'][n]:.2f}" for n in counts) + " | "
                     + " | ".join(f"{r['ratio_to_1'][n]:.2f}x" for n in counts[1:]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = pb.parser(__doc__, None, "", reps=3)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                    help="thread counts to compare (the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per count")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes only (seconds; the tests)")
    a = ap.parse_args(argv)
    cases = [(n, "tiny", f) for n, _, f in CASES if n != "reco" or _ == "cpu"] if a.tiny \
        else CASES
    print(markdown(run(cases, tuple(a.threads), a.rounds, a.reps, a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
