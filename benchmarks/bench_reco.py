"""reco_loss benchmark: official-style vs reference vs native (compiled CPU kernels) vs fused
(Triton), forward+backward time and memory.

    python benchmarks/bench_reco.py                 # GPU: the VOC setting; CPU: a reduced one
    python benchmarks/bench_reco.py --size voc --providers fused reference
    python benchmarks/bench_reco.py --size tiny     # seconds; what CI runs (tests/test_bench.py)
    python benchmarks/bench_reco.py --official reco=~/src/reco   # + the real official code

Setting "voc" is specs/reco.md §6: emb 20x256x81x81 fp32, 21 classes with 10 and 21 present,
256 queries, 512 negatives. Writes <out>/<date>-<device>-reco.{json,md}.

Metrics: fwd_bwd_ms (median, CUDA events on GPU); peak_extra_mib (CUDA: peak allocated during
forward+backward minus what was allocated before; includes the gradient of emb, which any loss
must produce, reported separately as grad_mib); saved_mib (what autograd keeps for backward
beyond the inputs, measured on every device).
"""
from __future__ import annotations

import os
import sys

import torch


import pixcon
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchkit, baselines
import benchkit as pb  # noqa: E402
from pixcon.ops import reco_loss
from pixcon.synthetic import reco_batch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import load_official, reco_official_style  # noqa: E402

SIZES = {  # B, D, h, w, C, present list, Q, N
    "voc": (20, 256, 81, 81, 21, (10, 21), 256, 512),
    "cpu": (4, 64, 41, 41, 21, (10,), 64, 128),
    "tiny": (2, 8, 9, 9, 5, (4,), 4, 8),
}
PROVIDERS = ("official-style", "reference", "native", "fused")


def make_step(provider, emb, labels, probs, Q, N, seed=0, official=None):
    """official: the official loss loaded from the user's checkout (provider "official")."""
    if provider in ("official-style", "official"):
        fn = reco_official_style if provider == "official-style" else official

        def loss_fn():
            return fn(emb, labels, probs, num_queries=Q, num_negatives=N)
    else:
        backend = {"fused": "triton", "native": "native"}.get(provider, "reference")

        def loss_fn():
            return reco_loss(emb, labels, probs, num_queries=Q, num_negatives=N, seed=seed,
                             backend=backend, check_values=False)

    def step():
        emb.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    return loss_fn, step


def run(size="cpu", providers=PROVIDERS, device=None, reps=3, out=None, verbose=True,
        official=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    B, D, h, w, C, presents, Q, N = SIZES[size]
    meta = pb.metadata(device)
    rows = []
    providers = list(providers) + (["official"] if official is not None else [])
    for present in presents:
        emb, labels, probs = reco_batch(B, D, h, w, num_classes=C, present=present,
                                        device=device, seed=present)
        emb.requires_grad_()
        for provider in providers:
            if provider == "fused" and device.type == "cpu" and not meta["triton_interpret"]:
                continue   # Triton on CPU needs the interpreter
            if provider == "native" and (device.type != "cpu" or not pixcon.HAS_C):
                continue   # the compiled CPU kernels: CPU tensors, extension built
            if verbose:
                print(f"[{size} K={present}] {provider} ...", file=sys.stderr, flush=True)
            loss_fn, step = make_step(provider, emb, labels, probs, Q, N, official=official)
            ms, peak, saved, loss = pb.measure(step, loss_fn, device, reps,
                                               [emb, labels, probs])
            rows.append({
                "op": "reco_loss", "provider": provider, "size": size, "present_classes": present,
                "shape": [B, D, h, w], "num_classes": C, "num_queries": Q, "num_negatives": N,
                "loss": loss, "fwd_bwd_ms": round(ms, 3),
                "peak_extra_mib": None if peak is None else round(peak / 2**20, 2),
                "peak_rss_mib": pb.last_rss_mib(),
                "grad_mib": round(emb.numel() * emb.element_size() / 2**20, 2),
                "saved_mib": round(saved / 2**20, 3), **meta})
    if out:
        write(rows, out)
    return rows


def markdown(rows) -> str:
    if not rows:
        return "(no rows)\n"
    m = rows[0]
    lines = [pb.title("reco_loss", m), "",
             "| size | K present | provider | fwd+bwd ms | speed-up vs official | peak extra MiB "
             "(incl. grad) | grad MiB | saved for bwd MiB | loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((x["fwd_bwd_ms"] for x in rows if x["provider"] == "official-style"
                     and x["present_classes"] == r["present_classes"]), None)
        sp = f"{base / r['fwd_bwd_ms']:.1f}x" if base else "-"
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        lines.append(f"| {r['size']} {tuple(r['shape'])} | {r['present_classes']} | "
                     f"{r['provider']} | {r['fwd_bwd_ms']:.2f} | {sp} | {peak} | "
                     f"{r['grad_mib']:.1f} | {r['saved_mib']:.2f} | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def write(rows, out):
    return pb.write_results(rows, out, f"reco-{rows[0]['size']}", markdown(rows))


def main(argv=None):
    ap = pb.parser(__doc__, SIZES, "voc (GPU default), cpu (CPU default) or tiny",
                   providers=PROVIDERS)
    ap.add_argument("--official", default=None, metavar="reco=PATH",
                    help="also run the official compute_reco_loss from your checkout of "
                         "github.com/lorenmt/reco (loaded at run time, provider 'official')")
    a = ap.parse_args(argv)
    size = a.size or ("voc" if torch.cuda.is_available() else "cpu")
    official = load_official(a.official)[1] if a.official else None
    rows = run(size, a.providers, reps=a.reps, out=a.out, official=official)
    print(markdown(rows))


if __name__ == "__main__":
    main()
