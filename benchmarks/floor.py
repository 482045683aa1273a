"""The floor of each benchmark case: the bytes that must move and the FLOPs that must run, over a
GPU's peaks. Until a GPU runs the suite these are estimates from an H100 SXM's nominal peaks
(not measured); with a GPU the suite fills in the fused time as a multiple of them.

What "must" means here (fp32 inputs, as the benchmarks use):
- every input read once, the embedding's gradient written once (a loss must produce it);
- keys that are gathered per query (ReCo's negatives) read once per use: no reuse through the
  cache is assumed, which is what makes ReCo's floor a range in issue 12 (0.3-0.9 ms at VOC);
- the FLOPs of the logits in forward (tiled contrast: see _gemms) and the gradient GEMMs in backward, at the rate of the
  units the kernels use: fp32 FMA for ReCo (a gather with dot products), tensor cores through
  3xTF32 (a third of the TF32 rate) for Contextrast and the tiled contrast (ContrastiveSeg,
  CAC).
The per-kernel model of the same settings (bytes as written, A100 too) is
pixcon_kernels/cost.py, in pixcon_kernels/RESOURCES.md; the peaks are its.
"""
from __future__ import annotations

import math

from pixcon_kernels.cost import GPUS

H100 = {"name": "H100 SXM (nominal)", "bytes_per_s": GPUS["H100"]["bw"],
        "fp32_flops": GPUS["H100"]["fma"], "tf32x3_flops": GPUS["H100"]["tf32"] / 3}
F32 = 4


def _bank_keys(bank: str, default: int) -> int:
    if not bank or bank == "none":
        return default
    a, b = bank.split("x")
    return int(a) * int(b)


def _gemms(C: int) -> float:
    """Anchors x keys GEMMs of the tiled contrast: forward, the negatives' pass and the
    positives' pass (about 1/C of the tiles hold a positive); backward, the recomputed logits and
    two gradient GEMMs."""
    return 1 + 1 / C + 3


def cost(row: dict) -> tuple[float, float, str] | None:
    """(bytes, flops, which FLOP rate) of one case, or None for an op without a model."""
    op = row["op"]
    if op == "reco_loss":
        B, D, h, w = row["shape"]
        P, C, K = B * h * w, row["num_classes"], row["present_classes"]
        Q, N = row["num_queries"], row["num_negatives"]
        gathered = K * Q * (N + 1) * D * F32
        return (2 * P * D * F32 + P * C * F32 + P * 8 + gathered,
                4.0 * K * Q * (N + 1) * D, "fp32_flops")
    if op == "pixel_contrast_loss":
        B, D, h, w = row["shape"]
        P, M, C = B * h * w, row["max_samples"], row["num_classes"]
        keys = _bank_keys(row.get("bank", "none"), M)
        return (2 * P * D * F32 + (M + keys) * D * F32, _gemms(C) * 2.0 * M * keys * D,
                "tf32x3_flops")
    if op == "dense_contrast_loss":
        n, D, C = row["valid_pixels"], row["dim"], row["num_classes"]
        return 2 * n * D * F32, _gemms(C) * 2.0 * n * n * D, "tf32x3_flops"
    if op == "directional_contrast_loss":
        n, N, D = row["anchors"], row["negatives"], row["dim"]
        return (4 * n * D * F32 + 2 * N * D * F32, 2 * 3 * 2.0 * n * N * D, "tf32x3_flops")
    if op == "pixel_anchor_loss":
        B, D, C = row["batch"], row["dim"], row["classes"]
        P = sum(B * h * w for h, w in row["layers"])
        return 2 * P * D * F32, 3 * 2.0 * P * C * D, "tf32x3_flops"
    if op == "distance_transform":
        return 8.0 * math.prod(row["shape"]), 0.0, "fp32_flops"
    return None


def estimate(row: dict, gpu: dict = H100) -> dict:
    """Columns for a row: MB moved, GFLOP, the floor in ms on ``gpu`` and what bounds it."""
    c = cost(row)
    if c is None:
        return {}
    nbytes, flops, rate = c
    t_mem, t_flop = nbytes / gpu["bytes_per_s"], flops / gpu[rate]
    return {"floor_mb": round(nbytes / 1e6, 1), "floor_gflop": round(flops / 1e9, 2),
            "floor_ms_est": round(1e3 * max(t_mem, t_flop), 4),
            "floor_bound": "memory" if t_mem >= t_flop else "compute",
            "floor_gpu": gpu["name"]}


def _case(r: dict) -> str:
    if "present_classes" in r:
        return f"K={r['present_classes']}"
    if "bank" in r:
        return f"bank {r['bank']}"
    if r["op"] == "distance_transform":
        return "x".join(map(str, r["shape"]))
    return "-"


def markdown(rows) -> str:
    """One line per case (providers share it): the floor, and the fused GPU time over it when a
    GPU row exists."""
    cases = {}
    for r in rows:
        if "floor_ms_est" not in r:
            continue
        key = (r["op"], r["size"], _case(r))
        c = cases.setdefault(key, {"row": r, "fused": None})
        if r["provider"] in ("fused", "pixcon triton") and r.get("device", "").startswith("NVIDIA"):
            c["fused"] = r.get("time_ms")
    if not cases:
        return ""
    lines = ["Floor per case (estimates from an H100 SXM's nominal peaks, 3.35 TB/s, 67 TFLOPS "
             "fp32, 165 TFLOPS 3xTF32: not measured; benchmarks/floor.py says what is counted):",
             "", "| op | size | case | MB moved | GFLOP | bound | floor ms (est.) | fused ms (GPU) | "
             "fused / floor |", "|---|---|---|---|---|---|---|---|---|"]
    for (op, size, case), c in cases.items():
        r = c["row"]
        fused = "-" if c["fused"] is None else f"{c['fused']:.3f}"
        ratio = "-" if c["fused"] is None else f"{c['fused'] / r['floor_ms_est']:.1f}x"
        lines.append(f"| {op} | {size} | {case} | {r['floor_mb']} | {r['floor_gflop']} | "
                     f"{r['floor_bound']} | {r['floor_ms_est']:.4f} | {fused} | {ratio} |")
    return "\n".join(lines) + "\n"


def paper_cases() -> list[dict]:
    """Rows (the fields cost() reads) for the papers' settings of every module: the floor can be
    estimated without running them."""
    import bench_cac
    import bench_contextrast
    import bench_contrastiveseg
    import bench_edt
    import bench_reco
    rows = []
    B, D, h, w, C, presents, Q, N = bench_reco.SIZES["voc"]
    rows += [{"op": "reco_loss", "size": "voc", "shape": [B, D, h, w], "num_classes": C,
              "present_classes": K, "num_queries": Q, "num_negatives": N} for K in presents]
    B, D, h, w, C, M, _, R = bench_contrastiveseg.SIZES["cityscapes"]
    rows += [{"op": "pixel_contrast_loss", "size": "cityscapes", "shape": [B, D, h, w],
              "num_classes": C, "max_samples": M, "bank": bank}
             for bank in ("none", f"{C}x{2 * R}")]     # a segment and a pixel queue per class
    rows.append({"op": "dense_contrast_loss", "size": "N=131072", "valid_pixels": 131072,
                 "dim": 256, "num_classes": 19})
    n, N, D, C = bench_cac.SIZES["cityscapes"]
    rows.append({"op": "directional_contrast_loss", "size": "cityscapes", "anchors": n,
                 "negatives": N, "dim": D})
    B, D, layers, C = bench_contextrast.SIZES["hrnet"]
    rows.append({"op": "pixel_anchor_loss", "size": "hrnet", "batch": B, "dim": D,
                 "layers": layers, "classes": C})
    for size in ("pyramid", "large"):
        for B, H, W, _ in bench_edt.SIZES[size]:
            rows.append({"op": "distance_transform", "size": size, "shape": [B, H, W]})
    for r in rows:
        r.update(estimate(r), provider="-")
    return rows


if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(markdown(paper_cases()))
