"""ReCo's pairwise class relation graph and its hierarchical clustering, written as PNG.

The relation of classes i and j is the cosine similarity of their mean representations over
the validation set (ground-truth pixels, labels nearest-downsampled to the representation), the
quantity ReCo's negative sampler turns into P(j | i). The dendrogram is SciPy's average-linkage
clustering of the distances 1 - cos. Drawing uses matplotlib (the ``viz`` extra).
"""
from __future__ import annotations

import numpy as np
import torch

from ..ops import class_means
from ..workbench.data import normalize_images, same_size_batches
from .common import evaluating, labels_at, plt as _plt, representation


@torch.no_grad()
def class_relation(model, dataset, device="cpu", batch: int = 50):
    """(C, C) cosine similarity of the class-mean representations of ``model`` (its ``rep``
    output; its logits when it has no representation head, as when trained without ReCo) over
    ``dataset``, and the (C,) pixel counts. A class absent from the dataset has a
    zero mean and NaN similarities."""
    C = dataset.num_classes
    sums = counts = None
    with evaluating(model):
        for x, y in same_size_batches(dataset, batch):
            x, y = x.to(device), y.to(device)
            rep = representation(model(normalize_images(x)))
            lab = labels_at(y, rep.shape[-2:], C).reshape(-1)
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


NUMBERS_UP_TO = 30       # classes whose cosines are written in the cells (beyond: colour only)


def relation_png(sim, names, path, *, title: str = "class relation"):
    """Heat map of the relation matrix: cosine of class means, a colour bar, class names on both
    axes (columns rotated); absent classes grey. Up to NUMBERS_UP_TO classes the values are
    written in the cells at a readable size (cells 0.6 in, 8 pt); more classes (ADE20K's 150)
    get small cells and colour only, the title pointing to relation.json for the numbers."""
    plt = _plt()
    sim = np.asarray(sim, dtype=np.float64)
    C = len(names)
    numbers = C <= NUMBERS_UP_TO
    cell = 0.6 if numbers else max(0.12, 9.0 / C)
    tick = 8 if numbers else max(4, min(8, int(cell * 72 * 0.8)))
    size = 2.5 + cell * C
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=100)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#a0a0a0")
    im = ax.imshow(np.ma.masked_invalid(sim), cmap=cmap, vmin=-1, vmax=1)
    ax.set_xticks(range(C), names, rotation=60, ha="right", fontsize=tick)
    ax.set_yticks(range(C), names, fontsize=tick)
    if numbers:
        for i in range(C):
            for j in range(C):
                if np.isfinite(sim[i, j]):
                    ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(sim[i, j]) > 0.6 else "black")
    else:
        title += f" ({C} classes: values in relation.json)"
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
