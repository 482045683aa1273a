"""This CPU's own roofline, measured in the benchmark's process at its thread count, and each CPU
row's floor on it (issue 32): how far an op is from what this machine can do at all.

Three rates, each the best of a few repetitions (the machine's capability, not its average):
- sgemm: ``torch.mm`` of two square fp32 matrices (2 n^3 FLOP), the rate every contraction of
  the floor is charged at;
- copy: ``Tensor.copy_`` of a buffer far larger than the caches (bytes read + written), the rate
  every byte of the floor is charged at;
- gather: ``index_select`` of random 1-KB rows (256 fp32) out of such a buffer (bytes gathered
  + written), shown beside the others;
- random-row reads: the same rows gathered 4,096 at a time into one 4-MB buffer that stays in
  cache (bytes gathered): the rate at which this CPU reads random rows out of memory at all.

A row's floor is the per-kernel accounting of benchmarks/floor.py (tools/cost.py: the bytes each
step must move and the FLOPs it must do, the same counts as the GPU floors) over these rates:
max(bytes / copy, FLOP / sgemm). The op's measured time over it is the "x floor" column.

Where an op's contractions have a class-sized side (Contextrast: pixels x classes x D with C = 19),
square-matrix sgemm is a rate BLAS does not reach: ``torch.mm`` of (C x 256) @ (256 x N) ran at a
quarter to a third of it here. For those rows a second floor charges the FLOPs at that measured
class-sized rate ("x BLAS floor"): the best a pass of BLAS can do on this CPU, the bar of issue
32 item 2 where the first floor is out of a CPU's reach.

Likewise where a step's bytes are random rows (ReCo's and U2PL's negatives: the model's
``gathered`` bytes, a row read once per use), the first floor charges them at the streaming
rate, which random 1-KB rows do not reach on a CPU (a third of it here): a second floor charges
them at the measured random-row read rate and the rest at the copy rate ("x gather floor").
"""
from __future__ import annotations

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:        # floor.py, a sibling script
    sys.path.insert(0, HERE)

SIZES = {"small": dict(n=512, mib=64, rows=16384), "full": dict(n=1536, mib=512, rows=262144)}


def _best(fn, reps):
    fn()                                          # warm: first-touch pages, BLAS threads
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _mm_gflops(m, k, n, g, reps):
    """GFLOP/s of torch.mm of an (m x k) and a (k x n) fp32 matrix (2 m k n FLOP)."""
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    return round(2 * m * k * n / _best(lambda: torch.mm(a, b), reps) / 1e9, 1)


# ops whose contractions have a class-sized side, and the row field that gives it
CLASS_SIDE = {"pixel_anchor_loss": "classes"}


def class_sgemm(C: int, size: str = "full", reps: int = 5) -> float:
    """GFLOP/s of torch.mm (C x 256) @ (256 x N), N = 65536 (full) or 8192 (small)."""
    n = 65536 if size == "full" else 8192
    return _mm_gflops(C, 256, n, torch.Generator().manual_seed(1), reps)


def measure(size: str = "full", reps: int = 5) -> dict:
    """{"threads", "sgemm_gflops", "copy_gbs", "gather_gbs", "row_read_gbs", "size"} of this
    process now."""
    s = SIZES[size]
    g = torch.Generator().manual_seed(0)
    n = s["n"]
    sgemm = _mm_gflops(n, n, n, g, reps)
    numel = s["mib"] * 2**20 // 4
    src = torch.ones(numel)
    dst = torch.empty_like(src)
    t_copy = _best(lambda: dst.copy_(src), reps)
    table = src.view(-1, 256)
    idx = torch.randint(0, table.shape[0], (s["rows"],), generator=g)
    out = torch.empty(s["rows"], 256)
    t_gather = _best(lambda: torch.index_select(table, 0, idx, out=out), reps)
    chunk = 4096
    buf = torch.empty(chunk, 256)

    def read_rows():
        for part in idx.split(chunk):
            torch.index_select(table, 0, part, out=buf[:len(part)])

    t_read = _best(read_rows, reps)
    return {"threads": torch.get_num_threads(), "size": size,
            "sgemm_gflops": sgemm,
            "copy_gbs": round(2 * numel * 4 / t_copy / 1e9, 2),
            "gather_gbs": round(2 * s["rows"] * 1024 / t_gather / 1e9, 2),
            "row_read_gbs": round(s["rows"] * 1024 / t_read / 1e9, 2)}


def main(argv=None):
    """python -m benchmarks.roofline [--size small|full]: this machine's rates as JSON, with the
    threads and OpenMP wait policy they were measured under."""
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__)
    ap.add_argument("--size", choices=list(SIZES), default="full")
    a = ap.parse_args(argv)
    print(json.dumps({**measure(a.size),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}))
    return 0


def machine(rates: dict) -> dict:
    """The rates as a machine of tools/cost.py: every float unit at the sgemm rate (a CPU has no
    tensor cores: tf32x3 costs one fp32 product, hence tf32 = 3 x sgemm), fp64 at half."""
    f = rates["sgemm_gflops"] * 1e9
    return dict(name=f"this CPU, {rates['threads']} thread(s)", bw=rates["copy_gbs"] * 1e9,
                fma=f, tf32=3 * f, bf16=f, fp64=f / 2, int=f)


def floor(row: dict, rates: dict) -> dict:
    """The CPU floor columns of a row measured on this CPU (empty for a row without a model);
    for an op of CLASS_SIDE also the floor at the class-sized sgemm rate (measured at the row's
    class count on first use, kept in rates["class_sgemm"])."""
    import floor as gpu_floor
    m = gpu_floor.model(row)
    if m is None or row.get("time_ms") is None:
        return {}
    cpu = machine(rates)
    t = m.floor(cpu)                                       # the GPU floors' own arithmetic
    t_mem = sum(k.must for k in m.kernels) / cpu["bw"]
    ms = float(f"{1e3 * t:.4g}")                            # 4 significant digits, kept as is
    out = {"cpu_floor_ms": ms, "cpu_floor_bound": "memory" if t_mem >= t else "compute",
           "x_cpu_floor": round(row["time_ms"] / ms, 1) if ms > 0 else None}
    side = CLASS_SIDE.get(row.get("op"))
    if side is not None and row.get(side):
        C = int(row[side])
        table = rates.setdefault("class_sgemm", {})
        if str(C) not in table:
            table[str(C)] = class_sgemm(C, rates.get("size", "full"))
        blas = float(f"{1e3 * m.floor(machine({**rates, 'sgemm_gflops': table[str(C)]})):.4g}")
        out.update(cpu_blas_floor_ms=blas, cpu_blas_gflops=table[str(C)],
                   x_cpu_blas_floor=round(row["time_ms"] / blas, 1) if blas > 0 else None)
    gathered = m.gathered()
    if gathered > 0 and rates.get("row_read_gbs"):
        must = sum(k.must for k in m.kernels)
        t_bytes = (must - gathered) / cpu["bw"] + gathered / (rates["row_read_gbs"] * 1e9)
        g = float(f"{1e3 * max(t_bytes, t):.4g}")
        out.update(cpu_gather_floor_ms=g, gathered_mb=round(gathered / 1e6, 1),
                   x_cpu_gather_floor=round(row["time_ms"] / g, 1) if g > 0 else None)
    return out


def markdown(rows) -> str:
    """One line per CPU row with a floor: its time, the floor on this CPU and the multiple."""
    rs = [r for r in rows if r.get("cpu_floor_ms") is not None]
    if not rs:
        return ""
    rates = rs[0]["cpu_roofline"]
    lines = [f"This CPU's roofline at {rates['threads']} thread(s), measured in this run: sgemm "
             f"{rates['sgemm_gflops']} GFLOP/s, copy {rates['copy_gbs']} GB/s, random 1-KB "
             f"rows {rates['gather_gbs']} GB/s (gathered + written), random-row reads "
             f"{rates.get('row_read_gbs', '-')} GB/s. Floor = max(bytes that must move / copy, "
             "FLOP that must run / sgemm), the same per-kernel counts as the GPU floors:", "",
             "| op | size | case | provider | ms | MB moved | GFLOP | bound | CPU floor ms | "
             "x floor | x BLAS floor | x gather floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    import floor as gpu_floor
    for r in rs:
        lines.append(f"| {r['op']} | {r['size']} | {gpu_floor._case(r)} | {r['provider']} | "
                     f"{r['time_ms']:.2f} | {r.get('floor_mb', '-')} | "
                     f"{r.get('floor_gflop', '-')} | {r['cpu_floor_bound']} | "
                     f"{r['cpu_floor_ms']:.4g} | {r['x_cpu_floor']}x | " +
                     (f"{r['x_cpu_blas_floor']}x (at {r['cpu_blas_gflops']} GFLOP/s) |"
                      if r.get("x_cpu_blas_floor") is not None else "- |") +
                     (f" {r['x_cpu_gather_floor']}x ({r['gathered_mb']} MB of random rows) |"
                      if r.get("x_cpu_gather_floor") is not None else " - |"))
    if any(r.get("x_cpu_blas_floor") is not None for r in rs):
        lines += ["", "x BLAS floor: the FLOPs charged at the rate torch.mm reaches on this CPU "
                  "for (classes x 256) @ (256 x 65536), the contraction shape of those ops."]
    if any(r.get("x_cpu_gather_floor") is not None for r in rs):
        lines += ["", "x gather floor: the random rows the step must read (each gathered row "
                  "once per use) charged at the random-row read rate, the other bytes at the "
                  "copy rate."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
