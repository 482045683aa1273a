"""Command line of pixcon.train (also the ``pixcon`` console script).

    python -m pixcon.train                          # compare: sup CE / semi CE / semi CE + ReCo
    python -m pixcon.train run --mode semi --loss reco --num-labels 20   # into runs/semi-reco/
    python -m pixcon.train run --mode semi --loss reco --resume  # continue from its checkpoint
    python -m pixcon.train parity --loss reco --tiny            # reference vs fused backend
    python -m pixcon.train run --dataset voc:/data/VOC2012 --backbone resnet101 --crop 321
    torchrun --nproc_per_node 2 -m pixcon.train run ...         # DDP: gloo on CPU, NCCL on GPUs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton kernels on CPU run only under the interpreter, which must be chosen before triton
    # is imported (the parity mode's fused backend needs it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .. import distributed as pdist  # noqa: E402
from .._cli import THREADS_HELP, HelpFormatter, apply_threads, check_device  # noqa: E402
from ..workbench.config import LOSSES, Config  # noqa: E402
from .experiments import compare, parity  # noqa: E402
from .loop import train  # noqa: E402

# a tiny configuration: a few seconds a step even for the fused path under the Triton interpreter
TINY = dict(scene_size=32, train_length=32, val_length=16, batch_size=2, crop=32, steps=30,
            eval_every=10, num_labels=8, num_queries=8, num_negatives=16)


def _add_config_args(p):
    d = Config()
    p.add_argument("--dataset", default=d.dataset,
                   help="scenes (embedded, default), voc:ROOT, cityscapes:ROOT or sun:ROOT")
    p.add_argument("--num-labels", type=int, default=d.num_labels,
                   help="labelled images, picked class-balanced (0 = all)")
    p.add_argument("--partial", choices=["p0", "p1", "p5", "p25"], default=None,
                   help="sparse labels on every image instead of a few labelled images "
                   "(default: dense labels)")
    p.add_argument("--min-classes", type=int, default=d.min_classes,
                   help="the fewest classes a labelled image must show (class-balanced pick)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per step (labelled; as many unlabelled in semi mode)")
    p.add_argument("--crop", type=int, default=d.crop, help="training crop size in pixels")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (SGD, poly decay)")
    p.add_argument("--loss-weight", type=float, default=None,
                   help="weight of the contrastive loss (default: 1 for reco, 0.1 for "
                   "contextrast and cac)")
    p.add_argument("--num-queries", type=int, default=d.num_queries,
                   help="ReCo queries per class")
    p.add_argument("--num-negatives", type=int, default=d.num_negatives,
                   help="ReCo negatives per query")
    p.add_argument("--backbone", default=d.backbone, help="small, resnet50, resnet101")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between evaluations (each saves a checkpoint)")
    p.add_argument("--seed", type=int, default=d.seed, help="data, weights and sampling seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--threads", default="auto", help=THREADS_HELP)
    p.add_argument("--out", default=None,
                   help="folder for checkpoints and reports (default: runs/compare, runs/MODE-LOSS "
                   "or runs/parity-LOSS)")
    p.add_argument("--no-save", action="store_true", help="keep no checkpoint or report")
    p.add_argument("--tiny", action="store_true", help="a tiny configuration (tests, interpreter)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip the end-of-run figures (OUT/figures: prediction panels, class "
                   "relation, dendrogram)")


def default_out(a) -> str | None:
    """Where a command keeps its checkpoints and reports unless told otherwise: runs/compare,
    runs/<mode>-<loss> or runs/parity-<loss> (relative to the working directory)."""
    if a.no_save:
        return None
    if a.out:
        return a.out
    if a.cmd == "compare":
        return os.path.join("runs", "compare")
    if a.cmd == "parity":
        return os.path.join("runs", f"parity-{a.loss}")
    return os.path.join("runs", f"{a.mode}-{a.loss}")


def _config(a, **over) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    kw = {k: v for k, v in vars(a).items() if k in fields}
    kw["out"] = default_out(a)
    cfg = Config(**kw, progress=not a.quiet, **over)
    if a.tiny:
        # explicit flags that differ from the defaults win over the tiny preset
        d = Config()
        cfg = dataclasses.replace(cfg, **{k: v for k, v in TINY.items()
                                          if getattr(cfg, k) == getattr(d, k)})
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pixcon", description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    p_cmp = sub.add_parser("compare", help="sup CE / semi CE / semi CE + ReCo, mIoU per row "
                           "(the default)", formatter_class=HelpFormatter)
    _add_config_args(p_cmp)
    p_run = sub.add_parser("run", help="train one configuration", formatter_class=HelpFormatter)
    _add_config_args(p_run)
    p_run.add_argument("--mode", choices=["sup", "semi"], default="semi",
                       help="supervised only, or Mean Teacher + ClassMix on unlabelled images")
    p_run.add_argument("--loss", choices=LOSSES, default="none", help="the contrastive loss added")
    p_run.add_argument("--backend", default="auto",
                       help="the loss's backend: auto, reference, native (CPU), triton")
    p_run.add_argument("--cac-ablation", default="VIII",
                       choices=["I", "II", "III", "IV", "V", "VI", "VII", "VIII"],
                       help="CAC: a row of the paper's ablation table (VIII: the full method)")
    p_run.add_argument("--cac-step-save", type=int, default=1,
                       help="CAC: earlier steps kept in the negative bank")
    p_run.add_argument("--image-level", action="store_true",
                       help="CAC: add the image-level branch (labels from the masks)")
    p_run.add_argument("--image-level-weight", type=float, default=1.0,
                       help="CAC: lambda_w of the image-level loss")
    p_run.add_argument("--memory-size", type=int, default=500,
                       help="ContrastiveSeg: queue length per class of its memory bank "
                            "(official 5000; 0: no bank, the in-batch contrast)")
    p_run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p_run.add_argument("--stop-at", type=int, default=None,
                       help="stop after this step, leaving a checkpoint (default: run all steps)")
    p_par = sub.add_parser("parity", help="the same run with the reference and fused backends",
                           formatter_class=HelpFormatter)
    _add_config_args(p_par)
    p_par.add_argument("--mode", choices=["sup", "semi"], default="semi",
                       help="supervised only, or Mean Teacher + ClassMix")
    p_par.add_argument("--loss", choices=["reco", "contextrast"], default="reco",
                       help="the loss compared")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("compare", "run", "parity", "-h", "--help"):
        argv = ["compare"] + argv
    a = ap.parse_args(argv)
    check_device("pixcon.train", getattr(a, "device", None))
    if getattr(a, "threads", None) is not None:
        apply_threads("pixcon.train", a.threads)

    cfg = _config(a)
    if cfg.out and int(os.environ.get("RANK", "0")) == 0:     # before torchrun's group exists
        print(f"checkpoints and reports: {cfg.out}/ (--out DIR elsewhere, --no-save for none)",
              file=sys.stderr)
    if a.cmd == "compare":
        res = compare(cfg)
        print("\n" + res["table"])
        if cfg.out:
            print(f"table: {os.path.join(cfg.out, 'compare.md')}")
    elif a.cmd == "run":
        rep = train(cfg)
        rank = pdist.rank()
        pdist.shutdown()                      # under torchrun: rank 0 reports
        if rank != 0:
            return 0
        best = rep["best_miou"]
        print(f"\n{rep['config']['mode']} + {rep['config']['loss']}: final mIoU "
              f"{100 * rep['final_miou']:.2f}%, best {100 * best:.2f}% at step {rep['best_step']}"
              if best is not None else "\nno evaluation ran")
        if cfg.out:
            print(f"report: {os.path.join(cfg.out, 'report.md')}, checkpoint: "
                  f"{os.path.join(cfg.out, 'checkpoint.pt')}")
    else:
        res = parity(cfg)
        print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        pdist.exit_now(rc)   # under torchrun: no interpreter teardown for gloo's threads
    sys.exit(rc)
