"""What every benchmark here shares beyond the measurements themselves (pixcon.measure, which
the demo uses too): one forward+backward step and its metrics, the command line of a
single-size benchmark, result files, and which providers can run where. Imported as
``import benchkit as pb`` with this folder on sys.path, as ``baselines`` is."""
from __future__ import annotations

import json
import os
import re
import statistics

import torch

from pixcon.measure import (last_rss_mib, metadata, peak_extra_bytes,  # noqa: F401
                            rss_peak_extra_bytes, saved_bytes, sync, time_ms)

__all__ = ["last_rss_mib", "metadata", "peak_extra_bytes", "rss_peak_extra_bytes",
           "saved_bytes", "sync", "time_ms", "fwd_bwd_step", "measure", "title",
           "write_results", "parser", "single_size_main", "step_metrics", "can_run"]


def fwd_bwd_step(params, loss_fn):
    """A step that clears the gradients of params (a tensor or a sequence of them), evaluates
    loss_fn() and backpropagates; returns the loss."""
    params = [params] if torch.is_tensor(params) else list(params)

    def step():
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss
    return step


FAST_REPS = 9     # timed steps, at least, of a step under a second


def measure(step, loss_fn, device: torch.device, reps: int, inputs):
    """(median fwd+bwd ms, peak extra bytes, bytes saved for backward beyond ``inputs``, the
    loss as a float). The memory step runs first and is the warm-up of the timed steps, so a
    case of steps of a second or more costs reps + 1 steps and one forward (at the papers'
    settings on CPU such a step is seconds to minutes); a faster case costs FAST_REPS + 3."""
    out = []
    peak = peak_extra_bytes(lambda: out.append(step()), device)
    # A step under a second gets one more warm-up and at least FAST_REPS timed steps: on a CPU
    # the steps right after the first (and after the memory step's bookkeeping) were 5-15x
    # slower now and then (ContrastiveSeg in-batch: 37 ms steady, 61 ms as a median of 3).
    times = [time_ms(step, device, warmup=0, reps=1)]
    if times[0] < 1000.0:
        step()                                           # one more warm-up
        times = [time_ms(step, device, warmup=0, reps=1) for _ in range(max(reps, FAST_REPS))]
    else:
        times += [time_ms(step, device, warmup=0, reps=1) for _ in range(reps - 1)]
    return statistics.median(times), peak, saved_bytes(loss_fn, inputs), float(out[0].detach())


def title(op: str, m: dict) -> str:
    """First line of a results table: op, device, versions, commit, date."""
    return (f"{op} on {m['device']} | torch {m['torch']} | triton {m['triton']} | "
            f"commit {m['commit']} | {m['date']}")


def write_results(rows, out: str, name: str, markdown: str) -> str:
    """Write rows as <out>/<date>-<device>-<name>.json and the table as .md; returns the stem."""
    os.makedirs(out, exist_ok=True)
    m = rows[0]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", m["device"]).strip("-").lower()[:40]
    stem = os.path.join(out, f"{m['date'][:10]}-{slug}-{name}")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    return stem


def parser(doc: str, sizes, size_help: str, *, providers=None, reps: int = 3, many_sizes=None):
    """The command line every benchmark module shares: --size (one setting, or several when
    ``many_sizes`` is their default list; none when ``sizes`` is None), --providers, --reps and
    --out (benchmarks/results)."""
    import argparse

    from pixcon._cli import HelpFormatter
    ap = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=HelpFormatter)
    if sizes is None:
        pass
    elif many_sizes is None:
        ap.add_argument("--size", choices=sizes, default=None, help=size_help)
    else:
        ap.add_argument("--size", choices=sizes, nargs="+", default=many_sizes, help=size_help)
    if providers is not None:
        ap.add_argument("--providers", nargs="+", choices=providers, default=list(providers),
                        help="which implementations run")
    ap.add_argument("--reps", type=int, default=reps, help="timed repetitions per case")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(here, "benchmarks", "results"),
                    help="results folder")
    return ap


def single_size_main(doc: str, sizes, providers, gpu_size: str, run, markdown, argv=None):
    """``main`` of a benchmark module that runs one setting: --size (default ``gpu_size`` with a
    GPU, "cpu" otherwise), --providers, --reps, --out; prints the module's table."""
    import torch
    ap = parser(doc, sizes, f"one setting (default: {gpu_size} on a GPU, cpu otherwise)",
                providers=providers)
    a = ap.parse_args(argv)
    size = a.size or (gpu_size if torch.cuda.is_available() else "cpu")
    print(markdown(run(size, a.providers, reps=a.reps, out=a.out)))


def step_metrics(ms, peak, saved, loss) -> dict:
    """A benchmark row's measured columns, from :func:`measure`'s result."""
    return {"loss": loss, "fwd_bwd_ms": round(ms, 3),
            "peak_extra_mib": None if peak is None else round(peak / 2**20, 2),
            "peak_rss_mib": last_rss_mib(), "saved_mib": round(saved / 2**20, 3)}


def can_run(provider: str, device, meta: dict) -> bool:
    """Whether a benchmark provider runs here: "fused" needs a GPU or the interpreter,
    "native" a CPU tensor and the built extension."""
    import pixcon
    if provider == "fused":
        return device.type == "cuda" or bool(meta["triton_interpret"])
    if provider == "native":
        return device.type == "cpu" and pixcon.HAS_C
    return True
