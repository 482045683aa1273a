"""Per kernel: the time torch.profiler measures on a GPU against the cost model's estimate.

    python -m benchmarks.kernels --device cuda --out kernels.json   # ./dev gpu runs this

Each op of the cost model (tools/cost.py: the papers' settings) runs its fused path
forward + backward once to compile, then once under torch.profiler. The model's entries name
their Triton kernels (``_tiled_lse_kernel + _tiled_pos_kernel``; per-layer entries of one kernel
are added up); every device kernel that is not one of pixcon's Triton kernels is counted as
"torch ops" against the model's glue entries. The table gives measured ms, model ms and their
ratio per group: a ratio far from 1 is where the model or the kernel is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pixcon._cli import HelpFormatter, check_device  # noqa: E402
from tools import cost  # noqa: E402

TRITON_NAME = re.compile(r"_[A-Za-z0-9_]+?_kernel\b")
TORCH = "torch ops"


def model_groups(op: cost.Op, gpu=cost.GPUS["H100"]) -> dict[str, float]:
    """{group: estimated seconds}: a group is the Triton kernels one model entry names (joined
    by ' + '), or TORCH for entries naming none (glue, autograd's additions)."""
    out: dict[str, float] = {}
    for k in op.kernels:
        names = TRITON_NAME.findall(k.name)
        key = " + ".join(dict.fromkeys(names)) if names else TORCH
        out[key] = out.get(key, 0.0) + k.time(gpu)
    return out


def compare(events: list[tuple[str, float, int]], op: cost.Op, gpu=cost.GPUS["H100"]) -> list[dict]:
    """Rows {group, launches, measured_ms, model_ms, ratio} from profiler events (device
    kernel name, total seconds, count): an event belongs to the group naming its kernel (a
    Triton kernel's device name starts with its function's name), else to TORCH."""
    model = model_groups(op, gpu)
    groups = {g: g.split(" + ") for g in model if g != TORCH}
    measured = {g: [0.0, 0] for g in list(model) + [TORCH]}
    for name, secs, count in events:
        key = next((g for g, names in groups.items()
                    if any(name.startswith(n) for n in names)), TORCH)
        measured[key][0] += secs
        measured[key][1] += count
    rows = []
    for g, (secs, count) in measured.items():
        est = model.get(g)
        rows.append({"group": g, "launches": count, "measured_ms": round(1e3 * secs, 4),
                     "model_ms": None if est is None else round(1e3 * est, 4),
                     "ratio": round(secs / est, 2) if est and secs else None})
    return rows


def _bench(name):
    import importlib
    return importlib.import_module(f"bench_{name}")


def steps(device):
    """{(op name, setting): a fused forward+backward step} at the cost model's settings."""
    import torch.nn.functional as F

    import benchkit as pb
    from pixcon.ops import (dense_contrast_loss, directional_contrast_loss, distance_transform,
                            pixel_anchor_loss)
    from pixcon.synthetic import reco_batch
    out = {}
    r = cost.RECO_VOC
    emb, labels, probs = reco_batch(r["B"], r["D"], r["h"], r["w"], num_classes=r["C"],
                                    present=r["K"], device=device)
    emb.requires_grad_()
    out["reco_loss"] = _bench("reco").make_step("fused", emb, labels, probs, r["Q"], r["N"])[1]
    c = cost.CONTEXTRAST_HRNET
    embs, lab, logits = _bench("contextrast").make_inputs(c["B"], c["D"], list(c["layers"]),
                                                          c["C"], device)
    out["pixel_anchor_loss"] = pb.fwd_bwd_step(embs, lambda: pixel_anchor_loss(
        embs, lab, logits, backend="triton", check_values=False))
    cs = _bench("contrastiveseg")
    _, _, _, _, _, M, V, _ = cs.SIZES["cityscapes"]
    e, lab2, pred, queue = cs.inputs("cityscapes", device)
    out["pixel_contrast_loss in-batch"] = cs.make_step("fused", e, lab2, pred, queue, M, V,
                                                       False)[1]
    out["pixel_contrast_loss bank"] = cs.make_step("fused", e, lab2, pred, queue, M, V, True)[1]
    f1, f2, l1, l2, bank, blab = _bench("cac").inputs("cityscapes", device)
    out["directional_contrast_loss"] = pb.fwd_bwd_step([f1, f2], lambda: directional_contrast_loss(
        f1, f2, l1, l2, bank, blab, backend="triton"))
    d = cost.DENSE
    de = F.normalize(torch.randn(8, d["D"], 128, 128, device=device), dim=1).requires_grad_()
    dl = torch.randint(0, d["C"], (8, 128, 128), device=device)
    out["dense_contrast_loss"] = pb.fwd_bwd_step(de, lambda: dense_contrast_loss(
        de, dl, backend="triton", check_values=False))
    x = _bench("edt").make_maps(cost.EDT["B"], cost.EDT["H"], cost.EDT["W"], 19).to(device)
    out["distance_transform"] = lambda: distance_transform(x, labels=True, background=-1,
                                                           backend="triton")
    return out


def _model_op(name: str) -> cost.Op:
    ops = cost.ops()
    by = {"reco_loss": ops[0], "pixel_anchor_loss": ops[2],
          "pixel_contrast_loss in-batch": ops[3], "pixel_contrast_loss bank": ops[4],
          "directional_contrast_loss": ops[5], "dense_contrast_loss": ops[6],
          "distance_transform": ops[7]}
    return by[name]


def profile(step) -> list[tuple[str, float, int]]:
    """(device kernel name, total seconds, launches) of one call of step under the profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    step()                                         # compile, allocate
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    out = []
    for ev in p.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.device_type == torch.autograd.DeviceType.CUDA:
            out.append((ev.key, t * 1e-6, ev.count))
    return out


def run(device="cuda", only=None):
    rows = []
    for name, step in steps(torch.device(device)).items():
        if only and name not in only:
            continue
        op = _model_op(name)
        for r in compare(profile(step), op):
            rows.append({"op": name, "setting": op.setting, **r})
        print(f"kernels: {name} done", file=sys.stderr, flush=True)
    return rows


def markdown(rows) -> str:
    lines = ["| op | kernels | launches | measured ms | model ms (H100) | measured / model |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['group']} | {r['launches']} | {r['measured_ms']} | "
                     f"{'-' if r['model_ms'] is None else r['model_ms']} | "
                     f"{'-' if r['ratio'] is None else r['ratio']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--device", default="cuda", help="a CUDA device (the profiler's kernel "
                    "times)")
    ap.add_argument("--only", nargs="+", help="these ops only (names as in the table)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    check_device("python -m benchmarks.kernels", args.device)
    if torch.device(args.device).type != "cuda":
        sys.exit("python -m benchmarks.kernels: needs a CUDA device (kernel times)")
    rows = run(args.device, args.only)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
