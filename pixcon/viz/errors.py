"""Contextrast's motivation analysis (its Figure 5, specs/contextrast.md §5): how similar are
misclassified pixels to the class anchors, as a function of their distance to the boundary of
their error region?

For each layer i of a model (its backbone stages, or the projected embeddings of a trained
``ContextrastLoss``'s heads), over a dataset:

- anchors A_i^n: the mean of the unit embeddings of every ground-truth pixel of class n (labels
  nearest-downsampled to layer i), re-normalised: the dataset-level version of the loss's
  mini-batch anchors;
- error pixels: ground truth n valid, prediction (argmax of the logits, nearest-downsampled to
  layer i) not n; their regions are BANE's maps B_i^n (eq. 13), and a pixel's distance is the
  exact Euclidean distance to the nearest pixel outside its own region (pixcon's
  ``distance_transform`` with labels, as BANE computes it; a region without an outside pixel
  has no boundary and is left out);
- per distance bin (1 = on the boundary, (1, 2], ..., (K-1, K], beyond K), the mean cosine
  similarity of the error pixels to the anchor of their true class and to the anchor of the
  class they were predicted as.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import class_means, distance_transform
from ..workbench.data import normalize_images, same_size_batches
from .common import evaluating, features_of, labels_at, logits_of, plt


def distance_bins(max_distance: int = 8) -> list[str]:
    """Names of the bins ``error_distance_stats`` fills: "1", "(1,2]", ..., "> K"."""
    return ["1"] + [f"({k - 1},{k}]" for k in range(2, max_distance + 1)] + [f"> {max_distance}"]


def error_distance_stats(emb, labels, pred, anchors, max_distance: int = 8):
    """One layer of one batch. emb (B, D, h, w); labels, pred (B, h, w) with -1 = ignored;
    anchors (C, D) unit rows (NaN for classes without pixels). Returns (sums, counts): sums
    (2, K+1) float64 of the cosine of each error pixel to its true class's anchor (row 0) and
    to its predicted class's anchor (row 1), counts (K+1,) int64, per distance bin (see
    ``distance_bins``). Error pixels whose anchor is missing are not counted."""
    err = torch.where((labels >= 0) & (pred >= 0) & (pred != labels), labels, -1)
    dist = distance_transform(err, labels=True, background=-1)
    unit = F.normalize(emb.float(), dim=1).permute(0, 2, 3, 1)          # (B, h, w, D)
    pick = (err >= 0) & torch.isfinite(dist)
    true, guess, z = labels[pick], pred[pick], unit[pick]
    ok = torch.isfinite(anchors[true]).all(1) & torch.isfinite(anchors[guess]).all(1)
    true, guess, z, d = true[ok], guess[ok], z[ok], dist[pick][ok]
    cos = torch.stack([(z * anchors[true]).sum(1), (z * anchors[guess]).sum(1)]).double()
    edges = torch.arange(1, max_distance + 1, dtype=d.dtype, device=d.device)
    b = torch.bucketize(d, edges)                                     # (k-1, k] -> k-1
    sums = torch.zeros(2, max_distance + 1, dtype=torch.float64, device=emb.device)
    sums.index_add_(1, b, cos)
    counts = torch.bincount(b, minlength=max_distance + 1)
    return sums, counts


def _layers(model, x, heads):
    out = model(normalize_images(x))
    feats = features_of(out)
    feats = feats if heads is None else [h(f) for h, f in zip(heads.heads, feats)]
    return logits_of(out).argmax(1), feats


def _anchors(model, dataset, heads, device, batch):
    """Per layer (C, D): the re-normalised mean unit embedding of each class's ground-truth
    pixels over the dataset, NaN rows for classes without pixels at that layer."""
    C, sums, counts = dataset.num_classes, [], []
    for x, y in same_size_batches(dataset, batch):
        _, feats = _layers(model, x.to(device), heads)
        for i, f in enumerate(feats):
            lab = labels_at(y.to(device), f.shape[-2:], C).reshape(-1)
            s, n, _ = class_means(F.normalize(f.float(), dim=1), lab, C)
            if i == len(sums):
                sums.append(s)
                counts.append(n)
            else:
                sums[i], counts[i] = sums[i] + s, counts[i] + n
    nan = float("nan")
    return [torch.where((n > 0)[:, None], F.normalize(s, dim=1), nan)
            for s, n in zip(sums, counts)]


@torch.no_grad()
def error_distance_curve(model, dataset, *, heads=None, max_distance: int = 8, device="cpu",
                         batch: int = 50) -> dict:
    """The curve's data for ``model`` (a ``pixcon.train.DeepLabV3Plus`` or anything whose
    output has ``logits`` and ``features``) over ``dataset``. ``heads``: a trained
    ``pixcon.nn.ContextrastLoss`` whose projection heads map the features to the embeddings the
    loss saw (default: the raw backbone stages). Two passes over the data (anchors, then
    errors). Returns {"bins", "layers": [{"shape", "true", "pred", "count"}], "classes"}: per
    layer the mean cosine per bin (None where a bin is empty) and the pixel counts."""
    C = dataset.num_classes
    with evaluating(model, heads):
        anchors = _anchors(model, dataset, heads, device, batch)
        acc, shapes = [None] * len(anchors), [None] * len(anchors)
        for x, y in same_size_batches(dataset, batch):
            pred, feats = _layers(model, x.to(device), heads)
            for i, f in enumerate(feats):
                size = f.shape[-2:]
                lab, p = labels_at(y.to(device), size, C), labels_at(pred, size, C)
                s, n = error_distance_stats(f, lab, p, anchors[i], max_distance)
                acc[i] = (s, n) if acc[i] is None else (acc[i][0] + s, acc[i][1] + n)
                shapes[i] = list(size)
    layers = []
    for (s, n), shape in zip(acc, shapes):
        mean = (s / n.clamp(min=1)).tolist()
        empty = (n == 0).tolist()
        layers.append({"shape": shape, "count": n.tolist(),
                       "true": [None if e else v for v, e in zip(mean[0], empty)],
                       "pred": [None if e else v for v, e in zip(mean[1], empty)]})
    return {"bins": distance_bins(max_distance), "layers": layers,
            "classes": list(dataset.class_names)}


def error_distance_png(curve: dict, path, *, title: str = "error pixels vs class anchors"):
    """One panel per layer: mean cosine of the error pixels to their true class's anchor and
    to their predicted class's anchor against the distance bin, pixel counts as bars behind."""
    p = plt()
    L = len(curve["layers"])
    fig, axes = p.subplots(1, L, figsize=(3.2 * L + 0.6, 3.4), dpi=100, squeeze=False)
    x = list(range(len(curve["bins"])))
    for i, (ax, lay) in enumerate(zip(axes[0], curve["layers"])):
        bars = ax.twinx()
        bars.bar(x, lay["count"], color="#d9d9d9", width=0.8)
        bars.set_yscale("symlog")
        bars.tick_params(labelsize=6)
        if i == L - 1:
            bars.set_ylabel("error pixels", fontsize=7)
        ax.set_zorder(bars.get_zorder() + 1)
        ax.patch.set_visible(False)
        for key, colour, label in (("true", "tab:green", "true class anchor"),
                                   ("pred", "tab:red", "predicted class anchor")):
            pts = [(k, v) for k, v in zip(x, lay[key]) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colour, label=label)
        ax.set_xticks(x, curve["bins"], rotation=60, fontsize=6)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_xlabel("distance to the error boundary (px)", fontsize=7)
        ax.set_title(f"layer {i + 1} ({lay['shape'][0]}x{lay['shape'][1]})", fontsize=8)
        if i == 0:
            ax.set_ylabel("mean cosine similarity", fontsize=7)
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    p.close(fig)
    return path
