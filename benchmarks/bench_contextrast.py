"""pixel_anchor_loss (Contextrast L_PA with BANE) benchmark: reference vs native (the CPU default)
vs fused (Triton), forward+backward.

    python benchmarks/bench_contextrast.py              # GPU: HRNet/Cityscapes; CPU: reduced
    python benchmarks/bench_contextrast.py --size tiny  # what CI runs

"hrnet": B = 8, D = 256, layers 128x256, 64x128, 32x64, 16x32, 19 classes (specs/contextrast.md
§8). Metrics as bench_reco (fwd_bwd_ms, peak_extra_mib, saved_mib).
"""
from __future__ import annotations

import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchkit, baselines
import benchkit as pb  # noqa: E402
from pixcon.ops import pixel_anchor_loss

SIZES = {  # B, D, layer sizes (deep last), C
    "hrnet": (8, 256, [(128, 256), (64, 128), (32, 64), (16, 32)], 19),
    "cpu": (2, 64, [(64, 128), (32, 64), (16, 32), (8, 16)], 19),
    # the CPU grid's other settings (benchmarks/grid.py): wider features, ADE20K's 150 classes,
    # one image at the HRNet sizes
    "cpu-d256": (2, 256, [(64, 128), (32, 64), (16, 32), (8, 16)], 19),
    "cpu-ade": (2, 64, [(64, 64), (32, 32), (16, 16), (8, 8)], 150),
    "hrnet-1": (1, 256, [(128, 256), (64, 128), (32, 64), (16, 32)], 19),
    "tiny": (2, 8, [(8, 16), (4, 8)], 5),
}


def make_inputs(B, D, layers, C, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = layers[0][0] * 4, layers[0][1] * 4
    coarse = torch.randint(0, C, (B, 1, max(H // 64, 2), max(W // 64, 2)), generator=g).float()
    labels = torch.nn.functional.interpolate(coarse, size=(H, W)).long()[:, 0]
    noise = torch.randint(0, C, (B, H, W), generator=g)
    pred = torch.where(torch.rand(B, H, W, generator=g) < 0.2, noise, labels)
    logits = torch.nn.functional.one_hot(pred, C).permute(0, 3, 1, 2).float()
    embs = [torch.randn(B, D, h, w, generator=g).to(device).requires_grad_() for h, w in layers]
    return embs, labels.to(device), logits.to(device)


PROVIDERS = ("reference", "native", "fused")


def run(size="cpu", providers=PROVIDERS, device=None, reps=3, out=None, verbose=True):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = pb.metadata(device)
    B, D, layers, C = SIZES[size]
    embs, labels, logits = make_inputs(B, D, layers, C, device)
    rows = []
    for provider in providers:
        if not pb.can_run(provider, device, meta):
            continue
        backend = {"fused": "triton"}.get(provider, provider)
        if verbose:
            print(f"[{size}] {provider} ...", file=sys.stderr, flush=True)

        def loss_fn():
            return pixel_anchor_loss(embs, labels, logits, backend=backend,
                                     layer_weights=(0.1, 0.3, 0.7, 1.0)[-len(embs):],
                                     check_values=False)

        step = pb.fwd_bwd_step(embs, loss_fn)

        ms, peak, saved, loss = pb.measure(step, loss_fn, device, reps,
                                           embs + [labels, logits])
        rows.append({"op": "pixel_anchor_loss", "provider": provider, "size": size,
                     "batch": B, "dim": D, "layers": layers, "classes": C,
                     **pb.step_metrics(ms, peak, saved, loss), **meta})
    if out:
        pb.write_results(rows, out, f"contextrast-{size}", markdown(rows))
    return rows


def markdown(rows) -> str:
    m = rows[0]
    lines = [f"pixel_anchor_loss on {m['device']} | torch {m['torch']} | triton {m['triton']} | "
             f"commit {m['commit']} | {m['date']}", "",
             "| size | provider | fwd+bwd ms | peak extra MiB | saved for bwd MiB | loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        lines.append(f"| {r['size']} B={r['batch']} D={r['dim']} | {r['provider']} | "
                     f"{r['fwd_bwd_ms']:.2f} | {peak} | {r['saved_mib']:.2f} | {r['loss']:.5f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    pb.single_size_main(__doc__, SIZES, PROVIDERS, "hrnet", run, markdown, argv)


if __name__ == "__main__":
    main()
