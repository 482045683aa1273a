"""ReCo's pairwise class relation graph and its hierarchical clustering, written as PNG.

The relation of classes i and j is the cosine similarity of their mean representations over
the validation set (ground-truth pixels, labels nearest-downsampled to the representation), the
quantity ReCo's negative sampler turns into P(j | i). The dendrogram is SciPy's average-linkage
clustering of the distances 1 - cos. Drawing uses Pillow (``pip install pillow``), no plotting
library.

    python -m pixcon.viz runs/semi-reco/checkpoint.pt --out runs/semi-reco/viz
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .ops import class_means
from .train.loop import same_size_batches
from .train.semisup import normalize_images


def _pil():
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:
        raise ImportError("pixcon.viz draws with Pillow: pip install pillow") from e
    return Image, ImageDraw


@torch.no_grad()
def class_relation(model, dataset, device="cpu", batch: int = 50):
    """(C, C) cosine similarity of the class-mean representations of ``model`` (its ``rep``
    output; its logits when it has no representation head, as when trained without ReCo) over
    ``dataset``, and the (C,) pixel counts. A class absent from the dataset has a
    zero mean and NaN similarities."""
    model.eval()
    C = dataset.num_classes
    sums = counts = None
    for x, y in same_size_batches(dataset, batch):
        x, y = x.to(device), y.to(device)
        out = model(normalize_images(x))
        rep = out.rep if out.rep is not None else out.logits
        y = F.interpolate(y[:, None].float(), size=rep.shape[-2:], mode="nearest")[:, 0].long()
        lab = torch.where((y >= 0) & (y < C), y, -1).reshape(-1)
        s, n, _ = class_means(rep, lab, C)
        sums = s if sums is None else sums + s
        counts = n if counts is None else counts + n
    means = sums / counts.clamp(min=1)[:, None]
    unit = means / means.norm(dim=1, keepdim=True).clamp(min=1e-8)
    sim = unit @ unit.T
    absent = counts == 0
    sim[absent] = float("nan")
    sim[:, absent] = float("nan")
    return sim.cpu(), counts.cpu()


def _colour(v):
    """Blue (-1) - white (0) - red (+1); grey for NaN."""
    if not np.isfinite(v):
        return (160, 160, 160)
    v = float(np.clip(v, -1, 1))
    if v >= 0:
        return (255, int(255 * (1 - v)), int(255 * (1 - v)))
    return (int(255 * (1 + v)), int(255 * (1 + v)), 255)


def relation_png(sim, names, path, cell: int = 36):
    """Heat map of the relation matrix with class names and values."""
    Image, ImageDraw = _pil()
    sim = np.asarray(sim, dtype=np.float64)
    C = len(names)
    longest = max(len(n) for n in names)
    margin, top = 8 + 7 * longest, 8 + 10 * longest
    img = Image.new("RGB", (margin + C * cell + 10, top + C * cell + 10), "white")
    d = ImageDraw.Draw(img)
    for i in range(C):
        d.text((4, top + i * cell + cell // 2 - 5), names[i], fill="black")
        for k, ch in enumerate(names[i]):                            # column names, vertical
            d.text((margin + i * cell + cell // 2 - 3, 4 + 10 * k), ch, fill="black")
        for j in range(C):
            x0, y0 = margin + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_colour(sim[i, j]),
                        outline=(220, 220, 220))
            if np.isfinite(sim[i, j]):
                d.text((x0 + 4, y0 + cell // 2 - 5), f"{sim[i, j]:.2f}", fill="black")
    img.save(path)
    return path


def dendrogram_png(sim, names, path, width: int = 640, height: int = 360):
    """Average-linkage dendrogram (SciPy) of the distances 1 - cos between class means; absent
    classes (NaN) are left out."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform
    Image, ImageDraw = _pil()
    sim = np.asarray(sim, dtype=np.float64)
    keep = [i for i in range(len(names)) if np.isfinite(sim[i, i])]
    if len(keep) < 2:
        raise ValueError("a dendrogram needs at least two classes present")
    dist = np.clip(1.0 - sim[np.ix_(keep, keep)], 0.0, None)
    np.fill_diagonal(dist, 0.0)
    Z = linkage(squareform((dist + dist.T) / 2, checks=False), method="average")
    dn = dendrogram(Z, labels=[names[i] for i in keep], no_plot=True)
    ic, dc = np.asarray(dn["icoord"]), np.asarray(dn["dcoord"])
    left, bottom, top = 40, 110, 20
    xmax, ymax = 10 * len(keep), max(float(dc.max()), 1e-6)

    def px(x, y):
        return (left + (width - left - 20) * x / xmax,
                height - bottom - (height - bottom - top) * y / ymax)

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for xs, ys in zip(ic, dc):
        d.line([px(x, y) for x, y in zip(xs, ys)], fill=(30, 60, 150), width=2)
    for k in range(5):                                               # distance axis
        y = ymax * k / 4
        d.text((2, px(0, y)[1] - 5), f"{y:.2f}", fill="black")
    for k, name in enumerate(dn["ivl"]):                             # leaf names, vertical
        x, y = px(5 + 10 * k, 0)
        for m, ch in enumerate(name[:10]):
            d.text((x - 3, y + 6 + 10 * m), ch, fill="black")
    d.text((left, 2), "average linkage of 1 - cos(class means)", fill="black")
    img.save(path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pixcon.viz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint.pt written by pixcon.train")
    ap.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    ap.add_argument("--model", choices=["teacher", "student"], default="teacher",
                    help="which network of a semi-supervised checkpoint (default teacher)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    from .train.loop import Config, load_dataset
    from .train.model import DeepLabV3Plus
    state = torch.load(a.checkpoint, map_location=a.device, weights_only=False)
    cfg = Config(**state["config"])
    ds = load_dataset(cfg, "val")
    weights = state["teacher"]["model"] if (a.model == "teacher" and state["teacher"]) \
        else state["student"]
    has_rep = any(k.startswith("representation.") for k in weights)
    model = DeepLabV3Plus(ds.num_classes, backbone=cfg.backbone, rep_dim=cfg.rep_dim,
                          representation=has_rep).to(a.device)
    model.load_state_dict(weights)
    sim, counts = class_relation(model, ds, a.device)
    out = Path(a.out or Path(a.checkpoint).parent / "viz")
    out.mkdir(parents=True, exist_ok=True)
    names = list(ds.class_names)
    relation_png(sim, names, out / "relation.png")
    dendrogram_png(sim, names, out / "dendrogram.png")
    (out / "relation.json").write_text(json.dumps(
        {"classes": names, "pixels": counts.tolist(),
         "cosine": [[None if not np.isfinite(v) else v for v in row] for row in sim.tolist()]},
        indent=1))
    print(f"wrote {out / 'relation.png'}, {out / 'dendrogram.png'}, {out / 'relation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
