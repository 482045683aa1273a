"""directional_contrast_loss (CAC) benchmark: official-style (8000-column chunks under
gradient checkpointing) vs reference vs the CPU default (native: the compiled tiled contrast) vs fused (Triton),
forward+backward time, peak extra memory, bytes saved for backward.

    python benchmarks/bench_cac.py                  # GPU: Cityscapes and VOC; CPU: reduced
    python benchmarks/bench_cac.py --size tiny      # seconds; what CI runs

Settings (specs/cac.md §4, §11): "cityscapes" 8100 overlap anchors x 129,600 bank negatives,
"voc" 4300 x 76,800, D = 128, 19 / 21 classes; "cpu" 2000 x 32,400. Features unit norm, logits
with about half the pixels above the 0.75 threshold. Writes <out>/<date>-<device>-cac-<size>.*
"""
from __future__ import annotations

import os
import sys

import torch

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchkit, baselines
import benchkit as pb  # noqa: E402
from pixcon.ops import directional_contrast_loss
from pixcon.reference.contrastiveseg import DENSE_LIMIT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import cac_official_style  # noqa: E402

SIZES = {"cityscapes": (8100, 129600, 128, 19), "voc": (4300, 76800, 128, 21),
         "cpu": (2000, 32400, 128, 19), "tiny": (50, 900, 8, 4)}
PROVIDERS = ("official-style", "reference", "native", "fused")
BACKEND = {"reference": "reference", "native": "native", "fused": "triton"}


def inputs(size, device, seed=0):
    n, N, D, C = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    f1 = F.normalize(torch.randn(n, D, generator=g), dim=1).to(device).requires_grad_()
    f2 = F.normalize(torch.randn(n, D, generator=g), dim=1).to(device).requires_grad_()
    l1 = (4 * torch.randn(n, C, generator=g)).to(device)
    l2 = (4 * torch.randn(n, C, generator=g)).to(device)
    bank = F.normalize(torch.randn(N, D, generator=g), dim=1).to(device)
    labels = torch.randint(0, C, (N,), generator=g).to(device)
    return f1, f2, l1, l2, bank, labels


def run(size="cpu", providers=PROVIDERS, device=None, reps=3, out=None, verbose=True):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = pb.metadata(device)
    f1, f2, l1, l2, bank, labels = inputs(size, device)
    n, N, D, C = SIZES[size]
    rows = []
    for provider in providers:
        if provider == "fused" and not (device.type == "cuda" or meta["triton_interpret"]):
            continue
        if provider == "native" and device.type != "cpu":
            continue
        if provider == "reference" and n * N > DENSE_LIMIT:
            if verbose:   # n x N logits, several copies through backward: tens of GB
                print(f"[{size}] reference: skipped ({n} x {N} logits)", file=sys.stderr,
                      flush=True)
            continue
        if verbose:
            print(f"[{size}] {provider} ...", file=sys.stderr, flush=True)

        def loss_fn():
            if provider == "official-style":
                return cac_official_style(f1, f2, l1, l2, bank, labels)
            return directional_contrast_loss(f1, f2, l1, l2, bank, labels,
                                             backend=BACKEND[provider])

        step = pb.fwd_bwd_step((f1, f2), loss_fn)
        ms, peak, saved, loss = pb.measure(step, loss_fn, device, reps,
                                     [f1, f2, l1, l2, bank, labels])
        rows.append({"op": "directional_contrast_loss", "provider": provider, "size": size,
                     "anchors": n, "negatives": N, "dim": D, "num_classes": C,
                     **pb.step_metrics(ms, peak, saved, loss), **meta})
    if out:
        pb.write_results(rows, out, f"cac-{size}", markdown(rows))
    return rows


def markdown(rows) -> str:
    if not rows:
        return "(no rows)\n"
    lines = [pb.title("directional_contrast_loss", rows[0]), "",
             "| size | anchors x negatives | provider | fwd+bwd ms | speed-up vs official | "
             "peak extra MiB | saved for bwd MiB | loss |", "|---|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["provider"] == "official-style"), None)
    for r in rows:
        sp = f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x" if base else "-"
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        lines.append(f"| {r['size']} | {r['anchors']} x {r['negatives']} | {r['provider']} | "
                     f"{r['fwd_bwd_ms']:.1f} | {sp} | {peak} | {r['saved_mib']:.2f} | "
                     f"{r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = pb.parser(__doc__, SIZES, "one setting (default: the papers' on a GPU, cpu otherwise)",
                   providers=PROVIDERS)
    a = ap.parse_args(argv)
    sizes = [a.size] if a.size else (["cityscapes", "voc"] if torch.cuda.is_available()
                                     else ["cpu"])
    for size in sizes:
        print(markdown(run(size, a.providers, reps=a.reps, out=a.out)))


if __name__ == "__main__":
    main()
