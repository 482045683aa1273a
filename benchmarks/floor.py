"""The floor of each benchmark case and the estimate of the fused op as written, from the
per-kernel cost model (tools/cost.py, whose docstring says what "must" counts) at an
H100 SXM's nominal peaks. Until a GPU runs the suite these are estimates (not measured); with a
GPU the suite puts the fused time beside them, as a multiple of the floor.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):  # the sibling bench_* modules paper_cases() reads and
    if _p not in sys.path:                # tools/ at the root, however this file is loaded
        sys.path.insert(0, _p)

from tools.cost import GPUS, rate  # noqa: E402

H100 = GPUS["H100"]


def _bank_keys(bank: str, default: int) -> int:
    if not bank or bank == "none":
        return default
    a, b = bank.split("x")
    return int(a) * int(b)


def model(row: dict):
    """The per-kernel cost model of the fused op as written (tools/cost.py) for a
    case, or None."""
    from tools import cost as cm
    op = row["op"]
    if op == "reco_loss":
        B, D, h, w = row["shape"]
        return cm.reco(B, D, h, w, row["num_classes"], row["present_classes"],
                       row["num_queries"], row["num_negatives"])
    if op == "pixel_contrast_loss":
        B, D, h, w = row["shape"]
        keys = _bank_keys(row.get("bank", "none"), 0)
        ops = cm.contrastiveseg(B, D, h, w, row["num_classes"], row["max_samples"],
                                keys or row["max_samples"])
        return ops[1] if keys else ops[0]
    if op == "dense_contrast_loss":
        return cm.dense(row["valid_pixels"], row["dim"], row["num_classes"])
    if op == "directional_contrast_loss":
        return cm.cac(row["anchors"], row["negatives"], row["dim"])
    if op == "pixel_anchor_loss":
        return cm.contextrast(row["batch"], row["dim"], row["layers"], row["classes"])
    if op == "distance_transform":         # bench_edt's maps: C = 0 binary (bool), else labels
        C = row.get("classes", 19)
        return cm.edt(*row["shape"], C=C, elt=8 if C else 1)
    if op == "u2pl_loss":
        B, D, h, w = row["shape"]
        # the pairs the run pushed (bench_u2pl.pushed_rows), else the rule of thumb (20 % of the
        # unlabelled pixels x 17 classes of rank 3..19; the VOC run pushes 186,524, not 113,152)
        pushed = row.get("pushed") or int(0.2 * (B - row["num_labeled"]) * h * w) * 17
        return cm.u2pl(B, D, h, w, row["num_classes"], row["num_queries"], row["num_negatives"],
                       pushed)
    return None


def estimate(row: dict, gpu: dict = H100) -> dict:
    """Columns for a row: the MB that must move, the GFLOP that must run, the floor in ms on
    ``gpu`` and what bounds it, and the model's estimate of the fused op as written."""
    m = model(row)
    if m is None:
        return {}
    nbytes = sum(k.must for k in m.kernels)
    flops = sum(k.needed_flops() for k in m.kernels if k.unit != "int")
    t_mem, t_flop = nbytes / gpu["bw"], flops / rate(gpu, m.must_flops_unit)
    return {"floor_mb": round(nbytes / 1e6, 1), "floor_gflop": round(flops / 1e9, 2),
            "floor_ms_est": round(1e3 * m.floor(gpu), 4),
            "floor_bound": "memory" if t_mem >= t_flop else "compute",
            "floor_gpu": gpu["name"], "model_ms_est": round(1e3 * m.estimate(gpu), 4)}


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
             "fp32, 165 TFLOPS 3xTF32: not measured; tools/cost.py says what is "
             "counted):",
             "", "| op | size | case | MB moved | GFLOP | bound | floor ms (est.) | "
             "as written ms (est., cost.py) | fused ms (GPU) | fused / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, size, case), c in cases.items():
        r = c["row"]
        fused = "-" if c["fused"] is None else f"{c['fused']:.3f}"
        ratio = "-" if c["fused"] is None else f"{c['fused'] / r['floor_ms_est']:.1f}x"
        mod = "-" if r.get("model_ms_est") is None else f"{r['model_ms_est']:.4f}"
        lines.append(f"| {op} | {size} | {case} | {r['floor_mb']} | {r['floor_gflop']} | "
                     f"{r['floor_bound']} | {r['floor_ms_est']:.4f} | {mod} | {fused} | "
                     f"{ratio} |")
    return "\n".join(lines) + "\n"


def paper_cases() -> list[dict]:
    """Rows (the fields model() reads) for the papers' settings of every module: the floor can be
    estimated without running them."""
    import bench_cac
    import bench_contextrast
    import bench_contrastiveseg
    import bench_edt
    import bench_reco
    import bench_u2pl
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
        for B, H, W, C in bench_edt.SIZES[size]:
            rows.append({"op": "distance_transform", "size": size, "shape": [B, H, W],
                         "classes": C})
    B, L, D, h, w, C, _, Q, N = bench_u2pl.SIZES["voc"]
    from tools.cost import U2PL_VOC               # its pushed rows, counted at the VOC inputs
    rows.append({"op": "u2pl_loss", "size": "voc", "shape": [B, D, h, w], "num_classes": C,
                 "num_labeled": L, "num_queries": Q, "num_negatives": N,
                 "pushed": U2PL_VOC["pushed"]})
    for r in rows:
        r.update(estimate(r), provider="-")
    return rows


if __name__ == "__main__":
    print(markdown(paper_cases()))
