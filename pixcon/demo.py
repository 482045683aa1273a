"""The ReCo loss alone on a synthetic batch at a realistic size: forward + backward through every
available backend, with loss, time and memory per backend. (The main job, ``./dev demo``, is the
trainer comparison ``python -m pixcon.train``.)

    python -m pixcon.demo                  # VOC semi-supervised setting, 10 classes present
    python -m pixcon.demo --size small     # a quick look
    python -m pixcon.demo --no-official    # skip the official-style baseline (slow on CPU)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import measure as pb
from ._cli import THREADS_HELP, HelpFormatter, apply_threads, check_device
from .ops import reco_loss
from .ops._common import triton_usable
from .synthetic import reco_batch

SIZES = {"voc": (20, 256, 81, 81), "small": (4, 64, 41, 41)}


def _official_style():
    """benchmarks/baselines.py's official-style ReCo when run from a source checkout."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "baselines.py")
    if not os.path.isfile(path):
        print("  official-style: skipped (benchmarks/baselines.py is in the source tree only)")
        return None
    spec = importlib.util.spec_from_file_location("pixcon_baselines", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reco_official_style


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pixcon.demo", formatter_class=HelpFormatter,
                                 description="ReCo loss demo: every available backend")
    ap.add_argument("--size", choices=SIZES, default="voc",
                    help="voc: 20x256x81x81 (the paper's VOC semi-supervised batch); small")
    ap.add_argument("--present", type=int, default=10, help="classes present (of 21)")
    ap.add_argument("--threads", default="auto", help=THREADS_HELP)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda")
    ap.add_argument("--no-official", action="store_true", help="skip the official-style code")
    ap.add_argument("--queries", type=int, default=256, help="queries per class")
    ap.add_argument("--negatives", type=int, default=512, help="negatives per query")
    a = ap.parse_args(argv)
    check_device("pixcon.demo", a.device)
    apply_threads("pixcon.demo", a.threads)

    device = torch.device(a.device)
    B, D, h, w = SIZES[a.size]
    emb, labels, probs = reco_batch(B, D, h, w, num_classes=21, present=a.present,
                                    device=device, seed=0)
    emb.requires_grad_()
    meta = pb.metadata(device)
    print(f"pixcon ReCo demo on {meta['device']} (torch {meta['torch']}, triton "
          f"{meta['triton']}): emb {tuple(emb.shape)}, {a.present} of 21 classes present, "
          f"{a.queries} queries, {a.negatives} negatives")

    runs = []
    baseline = None if a.no_official else _official_style()
    if baseline is not None:
        runs.append(("official-style", lambda: baseline(
            emb, labels, probs, num_queries=a.queries, num_negatives=a.negatives)))
    kw = dict(num_queries=a.queries, num_negatives=a.negatives, seed=0, check_values=False)
    runs.append(("reference", lambda: reco_loss(emb, labels, probs, backend="reference", **kw)))
    import pixcon
    if device.type == "cpu" and pixcon.HAS_C:
        runs.append(("native (C++)", lambda: reco_loss(emb, labels, probs, backend="native",
                                                       **kw)))
    ok, why = triton_usable(device)
    interp_too_big = device.type == "cpu" and a.size != "small"
    if ok and not interp_too_big:
        runs.append(("fused (triton)", lambda: reco_loss(emb, labels, probs, backend="triton",
                                                         **kw)))
    else:
        reason = why or "the Triton interpreter would take hours at this size; use --size small"
        print(f"  fused (triton): skipped: {reason}")

    print(f"\n{'backend':<16}{'loss':>10}{'fwd+bwd ms':>14}{'peak extra MiB':>16}"
          f"{'saved for bwd MiB':>19}")
    for i, (name, fn) in enumerate(runs, 1):
        if sys.stderr.isatty():   # a status line that the row below replaces (cleared first)
            print(f"  [{i}/{len(runs)}] {name} ...", end="\r", file=sys.stderr, flush=True)

        def step(fn=fn):
            emb.grad = None
            loss = fn()
            loss.backward()
            return loss
        reps = 1 if device.type == "cpu" else 5
        ms = pb.time_ms(step, device, warmup=1 if device.type == "cuda" else 0, reps=reps)
        peak = pb.peak_extra_bytes(step, device)
        saved = pb.saved_bytes(fn, [emb, labels, probs])
        loss = float(fn().detach())
        peak_s = "-" if peak is None else f"{peak / 2**20:.1f}"
        if sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        print(f"{name:<16}{loss:>10.4f}{ms:>14.1f}{peak_s:>16}{saved / 2**20:>19.2f}")
    print("\npeak extra: the peak of live tensor bytes during forward+backward above the inputs "
          "(CUDA allocator on GPU; includes emb's gradient).\nsaved for bwd: what autograd keeps between forward "
          "and backward beyond the inputs. Losses differ across backends only by sampling "
          "(different RNGs; same distribution).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
