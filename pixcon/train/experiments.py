"""Experiments over several training runs: ``compare`` (the same data, labels and seed trained
as several modes and losses: the README's table) and ``parity`` (the fused path against the
reference, in lockstep and as two trajectories)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..workbench.config import Config
from ..workbench.data import load_dataset
from .loop import Trainer, _pct, train


# --- comparisons -----------------------------------------------------------------------------
COMPARE_ROWS = (("supervised CE", dict(mode="sup", loss="none")),
                ("semi-supervised CE (Mean Teacher + ClassMix)", dict(mode="semi", loss="none")),
                ("semi-supervised CE + ReCo", dict(mode="semi", loss="reco")))


def compare(cfg: Config, rows=COMPARE_ROWS) -> dict:
    """The README's main job: the same data, labels and seed trained as each row's mode and loss.
    Returns {"rows": [{"name", "final_miou", "best_miou", "seconds"}], "table": markdown}."""
    train_ds, val_ds = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    out = []
    for name, over in rows:
        sub = dataclasses.replace(cfg, **over,
                                  out=os.path.join(cfg.out, over["mode"] + "-" + over["loss"])
                                  if cfg.out else None)
        rep = train(sub, train_ds=train_ds, val_ds=val_ds)
        out.append({"name": name, "final_miou": rep["final_miou"], "best_miou": rep["best_miou"],
                    "seconds": rep["seconds"], "num_labelled": rep["num_labelled"]})
    head = (f"{cfg.dataset}, {out[0]['num_labelled']} labelled images, {cfg.steps} steps, seed "
            f"{cfg.seed}")
    lines = [f"| {head} | final mIoU % | best mIoU % | time s |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {_pct(r['final_miou'])} | {_pct(r['best_miou'])} | "
              f"{r['seconds']:.0f} |" for r in out]
    result = {"rows": out, "table": "\n".join(lines), "config": dataclasses.asdict(cfg)}
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        Path(cfg.out, "compare.json").write_text(json.dumps(result, indent=1))
        Path(cfg.out, "compare.md").write_text(result["table"] + "\n")
    return result


def parity(cfg: Config, backends=("triton", "reference")) -> dict:
    """The fused path against the reference, two ways.

    - lockstep: one run trained with ``backends[0]``; at every step the contrastive loss is also
      computed by ``backends[1]`` on the identical inputs (weights, batch, sampling seed). Its
      largest difference is the parity measure: both paths draw the same samples, so it is
      fp32 rounding (~1e-6).
    - trajectories: a second, independent run trained with ``backends[1]``; both final mIoUs and
      the largest per-step difference between the runs are reported. The runs drift apart
      (rounding moves a pixel across the hard-query threshold or the confidence mask, which
      changes discrete samples), so this is information, not a tolerance.
    """
    if cfg.loss not in ("reco", "contextrast"):
        raise ValueError("parity needs loss='reco' or 'contextrast'")
    train_ds, val_ds = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    reps = {}
    for k, be in enumerate(backends):
        sub = dataclasses.replace(cfg, backend=be, out=os.path.join(cfg.out, be) if cfg.out else None)
        reps[be] = Trainer(sub, train_ds, val_ds,
                           shadow_backend=backends[1] if k == 0 else None).run()
    a, b = (reps[be]["history"] for be in backends)
    res = {"backends": list(backends),
           "miou": {be: reps[be]["final_miou"] for be in backends},
           "lockstep_max_contrast_diff": max(abs(x["contrast"] - x["shadow_contrast"]) for x in a),
           "trajectory_max_contrast_diff": max(abs(x["contrast"] - y["contrast"])
                                               for x, y in zip(a, b)),
           "trajectory_max_loss_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)),
           "steps": len(a), "config": dataclasses.asdict(cfg)}
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        Path(cfg.out, "parity.json").write_text(json.dumps(res, indent=1))
    return res
