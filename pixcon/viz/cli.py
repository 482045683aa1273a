"""Figures of a trained checkpoint.

    python -m pixcon.viz runs/compare/semi-reco/checkpoint.pt             # panels + relation
    python -m pixcon.viz runs/compare/semi-reco/checkpoint.pt --tsne \\
        --compare runs/compare/semi-none/checkpoint.pt                     # t-SNE side by side
    python -m pixcon.viz runs/semi-contextrast/checkpoint.pt --errors     # error-distance curve

Always: prediction panels of the first validation images (``panels.png``), the class relation
heat map and dendrogram (``relation.png``, ``dendrogram.png``, ``relation.json``). On request:
``tsne.png`` (scikit-learn) and ``errors.png`` / ``errors.json``. Writes next to the checkpoint
(``viz/``) unless told otherwise.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch


def load_checkpoint(path, which: str = "teacher", device="cpu"):
    """(model, heads, config, state) of a checkpoint written by pixcon.train: the teacher of a
    semi-supervised run unless ``which="student"``; ``heads`` the trained ContextrastLoss (its
    projection heads) or None."""
    from ..nn import ContextrastLoss
    from ..workbench.config import Config
    from ..workbench.model import DeepLabV3Plus
    from ..workbench.checkpoint import read_checkpoint
    state = read_checkpoint(path, map_location=device)
    cfg = Config(**state["config"])
    weights = state["teacher"]["model"] if (which == "teacher" and state["teacher"]) \
        else state["student"]
    has_rep = any(k.startswith("representation.") for k in weights)
    last = max((k for k in weights if k.startswith("classifier.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    C = weights[last].shape[0]                 # the classifier's last 1x1 conv: C outputs
    model = DeepLabV3Plus(C, backbone=cfg.backbone, rep_dim=cfg.rep_dim,
                          representation=has_rep).to(device)
    model.load_state_dict(weights)
    heads = None
    if state.get("extra") is not None and cfg.loss == "contextrast":
        heads = ContextrastLoss(in_channels=model.backbone.channels, dim=model.rep_dim).to(device)
        heads.load_state_dict(state["extra"])
    return model, heads, cfg, state


def palette_of(cfg) -> str:
    """The built-in palette of a run's dataset: VOC's, Cityscapes' and SUN RGB-D's own, else
    "distinct" (the scenes, folders of other datasets)."""
    name = cfg.dataset.partition(":")[0]
    return name if name in ("voc", "cityscapes", "sun") else "distinct"


def write_figures(model, ds, out, *, which: str, palette_name: str = "distinct",
                  panels: int = 4, device="cpu", name: str = "prediction",
                  others: dict | None = None,
                  panels_title: str | None = None):
    """The figures every run gets: ``panels.png`` (the first ``panels`` images of ``ds``;
    ``model``'s predictions under ``name``, then those of ``others``, name -> model), ``relation.png``,
    ``dendrogram.png`` (with two classes present or more) and ``relation.json``, all of
    ``model``. ``which`` names ``model`` in the titles; ``panels_title`` (default: ``which``)
    names every network of the panels. Returns the paths written."""
    from .panels import prediction_panels
    from .relation import class_relation, dendrogram_png, relation_png
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(ds.class_names)
    n = min(panels, len(ds))
    items = [ds[i] for i in range(n)]
    shapes = {it[0].shape for it in items}
    if len(shapes) > 1:                      # folder datasets mix sizes: keep the first size
        items = [it for it in items if it[0].shape == items[0][0].shape]
    images = torch.stack([it[0] for it in items])
    labels = torch.stack([it[1] for it in items])
    columns = {name: model, **(others or {})}
    written = [prediction_panels(images, labels, columns, out / "panels.png",
                                 class_names=names, palette_name=palette_name,
                                 ignore_index=ds.ignore_index, device=device,
                                 title=f"predictions: {panels_title or which}")]
    sim, counts = class_relation(model, ds, device)
    written.append(relation_png(sim, names, out / "relation.png",
                                title=f"class relation: {which}"))
    if int((counts > 0).sum()) >= 2:
        written.append(dendrogram_png(sim, names, out / "dendrogram.png",
                                      title=f"class hierarchy: {which}"))
    (out / "relation.json").write_text(json.dumps(
        {"classes": names, "pixels": counts.tolist(),
         "cosine": [[None if not np.isfinite(v) else v for v in row] for row in sim.tolist()]},
        indent=1))
    return written + [out / "relation.json"]


def main(argv=None):
    from .._cli import HelpFormatter, check_device
    from .common import plt
    ap = argparse.ArgumentParser(prog="python -m pixcon.viz", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint.pt written by pixcon.train")
    ap.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    ap.add_argument("--model", choices=["teacher", "student"], default="teacher",
                    help="which network of a semi-supervised checkpoint")
    ap.add_argument("--device", default="cpu", help="where the network runs")
    ap.add_argument("--panels", type=int, default=4, help="validation images in panels.png")
    ap.add_argument("--compare", nargs="*", default=[], metavar="CKPT",
                    help="more checkpoints: their predictions join the panels and the t-SNE")
    ap.add_argument("--tsne", action="store_true",
                    help="also tsne.png: class-balanced pixel embeddings (scikit-learn)")
    ap.add_argument("--per-class", type=int, default=200, help="t-SNE pixels per class")
    ap.add_argument("--errors", action="store_true",
                    help="also errors.png/json: error pixels' cosine to the class anchors by "
                         "distance to the error boundary, per backbone stage")
    a = ap.parse_args(argv)
    check_device("pixcon.viz", a.device)
    try:
        plt()
    except ImportError as e:
        print(f"pixcon.viz: {e}", file=sys.stderr)
        return 2
    from ..workbench.data import load_dataset
    runs = {}
    for path in [a.checkpoint, *a.compare]:
        try:
            runs[path] = load_checkpoint(path, a.model, a.device)
        except (OSError, ValueError) as e:          # missing, foreign or damaged: it says so
            print(f"pixcon.viz: {e}", file=sys.stderr)
            return 2
        except (RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            print(f"pixcon.viz: {path} is not a checkpoint written by pixcon.train "
                  f"({type(e).__name__}: {first})", file=sys.stderr)
            return 2
    model, heads, cfg, state = runs[a.checkpoint]
    ds = load_dataset(cfg, "val")
    out = Path(a.out or Path(a.checkpoint).parent / "viz")
    label = {p: f"{r[2].mode}+{r[2].loss} ({Path(p).parent.name})" for p, r in runs.items()}
    if len(set(label.values())) < len(label):       # two runs of one kind in like-named folders
        label = {p: f"{v} #{i + 1}" for i, (p, v) in enumerate(label.items())}

    def network(path, st):
        return (f"{a.model if st['teacher'] else 'student'} of {path} (step {st['step']})")

    split = f"; {cfg.dataset} validation split"
    which = network(a.checkpoint, state) + split          # the relation figures: this one
    panels_title = "; ".join(f"{label[p]} = {network(p, r[3])}"        # each column named
                             for p, r in runs.items()) + split if a.compare else None
    others = {label[p]: r[0] for p, r in runs.items() if p != a.checkpoint}
    written = write_figures(model, ds, out, which=which, palette_name=palette_of(cfg),
                            panels=a.panels, device=a.device, others=others,
                            panels_title=panels_title,
                            name=label[a.checkpoint] if others else "prediction")
    if a.tsne:
        from .tsne import embedding_tsne
        try:
            embedding_tsne({label[p]: r[0] for p, r in runs.items()}, ds, out / "tsne.png",
                           per_class=a.per_class, seed=cfg.seed, device=a.device,
                           palette_name=palette_of(cfg))
        except ImportError as e:
            print(f"pixcon.viz: {e}", file=sys.stderr)
            return 2
        written.append(out / "tsne.png")
    if a.errors:
        from .errors import error_distance_curve, error_distance_png
        curve = error_distance_curve(model, ds, heads=heads, device=a.device)
        (out / "errors.json").write_text(json.dumps(curve, indent=1))
        stage = "projected embeddings" if heads is not None else "backbone stages"
        written += [error_distance_png(curve, out / "errors.png",
                                       title=f"error pixels vs class anchors ({stage}): {which}"),
                    out / "errors.json"]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
