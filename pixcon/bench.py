"""Measurement helpers shared by ``python -m pixcon.demo`` and ``benchmarks/``: forward+backward
time, peak extra device memory, bytes autograd saves for backward, and run metadata."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time

import torch


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup: int = 1, reps: int = 3) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class _LiveTensorBytes:
    """Counts the bytes of the tensor storages created while active and still alive: a
    TorchDispatchMode sees every ATen op (forward and the autograd engine's backward on this
    thread) and its outputs; a storage counts once, from the op that created it (outputs that
    share storage with an input are views or in-place results) until it is freed. Temporaries
    inside one compiled op (pixcon._C, BLAS workspaces) are not seen."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        counter = self
        self.live, self.current, self.peak = {}, 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                seen = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor)}
                for key in [k for k, (ref, _) in counter.live.items() if ref.expired()]:
                    counter.current -= counter.live.pop(key)[1]
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        st = t.untyped_storage()
                        if st._cdata not in seen and st._cdata not in counter.live:
                            counter.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
                            counter.current += st.nbytes()
                counter.peak = max(counter.peak, counter.current)
                return out

        self.mode = Mode()


_LAST_RSS: list = [None]
_COUNTER_WARM: list = [False]


def _warm_counter():
    """The dispatch mode's first use in a process imports and allocates (about 70 MiB of
    resident set): done once on a trivial op, so it never lands in a measurement."""
    if not _COUNTER_WARM[0]:
        c = _LiveTensorBytes()
        with c.mode:
            torch.ones(2) + 1
        _COUNTER_WARM[0] = True


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_extra_bytes(fn) -> int | None:
    """The process's resident-set high-water mark during fn() above its resident size before
    (Linux: VmHWM is reset through /proc/self/clear_refs, then read back). Counts everything:
    tensors, the C++ kernels' own buffers, allocator caches, libraries loaded on first use.
    None where the kernel does not offer it; fn() runs either way."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                       # reset the peak RSS to the current RSS
    except OSError:
        fn()
        return None
    before = _status_kib("VmRSS")
    fn()
    after = _status_kib("VmHWM")
    return None if before is None or after is None else max(after - before, 0) * 1024


def last_rss_mib() -> float | None:
    """The resident-set rise the last CPU peak_extra_bytes() call saw, in MiB (None on CUDA or
    where /proc does not offer it). Run in a process of its own (``python -m benchmarks
    --fresh``) to have it mean the provider's own peak."""
    v = _LAST_RSS[0]
    return None if v is None else round(v / 2**20, 2)


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory during fn() above what was in use before it.

    CUDA: the caching allocator's peak of allocated bytes. CPU: the peak of live tensor bytes
    created during fn() (every ATen op's new storages, until freed), counted exactly rather than
    read from the process's resident size, whose untouched zero pages and allocator caches make
    it unreliable at the MiB scale. The resident-set rise of the same call is kept as well
    (``last_rss_mib``; the counter's own bookkeeping is a few bytes per storage)."""
    if device.type != "cuda":
        _warm_counter()
        counter = _LiveTensorBytes()

        def counted():
            with counter.mode:
                fn()
        _LAST_RSS[0] = rss_peak_extra_bytes(counted)     # one run measures both
        return counter.peak
    _LAST_RSS[0] = None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


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


def measure(step, loss_fn, device: torch.device, reps: int, inputs):
    """(median fwd+bwd ms, peak extra bytes, bytes saved for backward beyond ``inputs``, the
    loss as a float). The memory step runs first and is the warm-up of the timed steps, so a
    case costs reps + 1 steps and one forward (at the papers' settings on CPU a step is
    seconds to minutes)."""
    out = []
    peak = peak_extra_bytes(lambda: out.append(step()), device)
    ms = time_ms(step, device, warmup=0, reps=reps)
    return ms, peak, saved_bytes(loss_fn, inputs), float(out[0].detach())


def title(op: str, m: dict) -> str:
    """First line of a results table: op, device, versions, commit, date."""
    return (f"{op} on {m['device']} | torch {m['torch']} | triton {m['triton']} | "
            f"commit {m['commit']} | {m['date']}")


def saved_bytes(fn, inputs) -> int:
    """Bytes autograd saves for backward while fn() builds its graph, not counting tensors that
    share storage with ``inputs`` (saving an input costs nothing)."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        p = t.untyped_storage().data_ptr()
        if p not in ptrs and p not in seen:
            seen.add(p)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def metadata(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "commit": commit or "unknown",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}


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

    from ._cli import HelpFormatter
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
