"""The README's pictures (docs/images/): two short runs on the embedded scenes (supervised
cross-entropy, and cross-entropy + ReCo), then pixcon.viz on their checkpoints.

    python tools/readme_figures.py                 # about 10 minutes on 2 CPU cores
    python tools/readme_figures.py --steps 50      # a quick look (the pictures will be poor)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixcon import viz  # noqa: E402
from pixcon._cli import HelpFormatter  # noqa: E402
from pixcon.train.loop import Config, load_dataset, train  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python tools/readme_figures.py", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--steps", type=int, default=500, help="training steps per run")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "readme"), help="checkpoints")
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"), help="where the PNGs go")
    a = ap.parse_args(argv)
    rows = {"CE": "none", "CE + ReCo": "reco"}
    models = {}
    for name, loss in rows.items():
        run = os.path.join(a.runs, f"sup-{loss}")
        ckpt = Path(run, "checkpoint.pt")
        if not ckpt.is_file():
            print(f"training {name} for {a.steps} steps -> {run}", file=sys.stderr)
            train(Config(mode="sup", loss=loss, steps=a.steps, eval_every=a.steps, out=run,
                         figures=False))
        models[name], _, cfg, _ = viz.load_checkpoint(ckpt)
    ds = load_dataset(cfg, "val")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images = ds.images[:4]
    labels = ds.labels[:4]
    names = list(ds.class_names)
    from pixcon.viz.cli import palette_of
    viz.prediction_panels(images, labels, models, out / "panels.png", class_names=names,
                          ignore_index=ds.ignore_index, palette_name=palette_of(cfg),
                          title=f"embedded scenes, validation images 0-3, {a.steps} steps")
    sim, _ = viz.class_relation(models["CE + ReCo"], ds)
    viz.dendrogram_png(sim, names, out / "dendrogram.png",
                       title="class hierarchy of the CE + ReCo model (its representation head)")
    viz.embedding_tsne(models, ds, out / "tsne.png", per_class=150, palette_name=palette_of(cfg),
                       title="pixel embeddings (t-SNE, 150 pixels per class): the CE model's "
                             "logits, the ReCo model's representation")
    curve = viz.error_distance_curve(models["CE + ReCo"], ds, max_distance=6)
    viz.error_distance_png(curve, out / "errors.png",
                           title="error pixels of the CE + ReCo model vs class anchors, per "
                                 "backbone stage")
    files = ("panels.png", "dendrogram.png", "tsne.png", "errors.png")
    print("wrote " + ", ".join(str(out / f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
