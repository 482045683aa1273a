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


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak device memory allocated during fn() above what was allocated before it (CUDA only;
    None on CPU, where the allocator keeps no such statistic)."""
    if device.type != "cuda":
        return None
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
