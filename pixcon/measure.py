"""Measurements shared by ``python -m pixcon.demo`` and ``benchmarks/`` (benchkit): forward+backward
time, peak extra device memory, bytes autograd saves for backward, and run metadata."""
from __future__ import annotations

import datetime
import os
import platform
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
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            # OpenMP's wait policy as the process started (pixcon/__init__.py: PASSIVE for
            # pixcon's own programs unless set): it decides how 2 threads fare on a loaded core
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}


