"""ReCo's pairwise class relation graph and its hierarchical clustering, written as PNG.

The relation of classes i and j is the cosine similarity of their mean representations over
the validation set (ground-truth pixels, labels nearest-downsampled to the representation), the
quantity ReCo's negative sampler turns into P(j | i). The dendrogram is SciPy's average-linkage
clustering of the distances 1 - cos. Drawing uses matplotlib (the ``viz`` extra).

    python -m pixcon.viz runs/semi-reco/checkpoint.pt --out runs/semi-reco/viz
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .ops import class_means
from .train.loop import same_size_batches
from .train.semisup import normalize_images


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("pixcon.viz draws with matplotlib: pip install 'pixcon[viz]' "
                          "(./dev setup installs it)") from e
    return plt


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


def relation_png(sim, names, path, *, title: str = "class relation"):
    """Heat map of the relation matrix: cosine of class means, values written in the cells,
    a colour bar, class names on both axes (columns rotated); absent classes grey."""
    plt = _plt()
    sim = np.asarray(sim, dtype=np.float64)
    C = len(names)
    size = 2.5 + 0.45 * C
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=100)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#a0a0a0")
    im = ax.imshow(np.ma.masked_invalid(sim), cmap=cmap, vmin=-1, vmax=1)
    ax.set_xticks(range(C), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(C), names, fontsize=8)
    for i in range(C):
        for j in range(C):
            if np.isfinite(sim[i, j]):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(sim[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cos(class mean i, class mean j)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def dendrogram_png(sim, names, path, *, title: str = "class hierarchy"):
    """Average-linkage dendrogram (SciPy, drawn into matplotlib) of the distances 1 - cos
    between class means; absent classes (NaN) are left out."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform
    plt = _plt()
    sim = np.asarray(sim, dtype=np.float64)
    keep = [i for i in range(len(names)) if np.isfinite(sim[i, i])]
    if len(keep) < 2:
        raise ValueError("a dendrogram needs at least two classes present")
    dist = np.clip(1.0 - sim[np.ix_(keep, keep)], 0.0, None)
    np.fill_diagonal(dist, 0.0)
    Z = linkage(squareform((dist + dist.T) / 2, checks=False), method="average")
    fig, ax = plt.subplots(figsize=(max(6.4, 0.4 * len(keep) + 2), 4.2), dpi=100)
    dendrogram(Z, labels=[names[i] for i in keep], ax=ax, leaf_rotation=60,
               leaf_font_size=8, color_threshold=0)
    ax.set_ylabel("1 - cos (average linkage)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None):
    from ._cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="python -m pixcon.viz", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint.pt written by pixcon.train")
    ap.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    ap.add_argument("--model", choices=["teacher", "student"], default="teacher",
                    help="which network of a semi-supervised checkpoint")
    ap.add_argument("--device", default="cpu", help="where the network runs")
    a = ap.parse_args(argv)
    try:
        _plt()
    except ImportError as e:
        print(f"pixcon.viz: {e}", file=sys.stderr)
        return 2
    from .train.loop import Config, load_dataset
    from .train.model import DeepLabV3Plus
    try:
        state = torch.load(a.checkpoint, map_location=a.device, weights_only=False)
        cfg = Config(**state["config"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        print(f"pixcon.viz: {a.checkpoint} is not a checkpoint written by pixcon.train "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
              file=sys.stderr)
        return 2
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
    which = f"{a.model if state['teacher'] else 'student'} of {a.checkpoint} (step "
    which += f"{state['step']}), {cfg.dataset} validation split"
    relation_png(sim, names, out / "relation.png", title=f"class relation: {which}")
    dendrogram_png(sim, names, out / "dendrogram.png", title=f"class hierarchy: {which}")
    (out / "relation.json").write_text(json.dumps(
        {"classes": names, "pixels": counts.tolist(),
         "cosine": [[None if not np.isfinite(v) else v for v in row] for row in sim.tolist()]},
        indent=1))
    print(f"wrote {out / 'relation.png'}, {out / 'dendrogram.png'}, {out / 'relation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
