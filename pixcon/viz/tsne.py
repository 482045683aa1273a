"""ContrastiveSeg's picture of what a contrastive loss does to the embedding space: a
class-balanced sample of pixel embeddings, projected to 2-D with t-SNE and coloured by class,
one panel per model (e.g. cross-entropy only next to cross-entropy + contrast).

The sample is pixcon's: every labelled pixel at the embedding's resolution (labels
nearest-downsampled) draws a uniform random key from a generator seeded by ``seed``; each class
keeps its ``per_class`` smallest keys over the whole dataset, i.e. a uniform sample without
replacement of each class's pixels (all of them when a class has fewer). Models whose
embeddings share a resolution therefore get the same pixels. The projection is scikit-learn's
``TSNE`` (the ``tsne`` extra); it is not reimplemented here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..workbench.data import normalize_images, same_size_batches
from .common import evaluating, labels_at, plt, representation
from .panels import palette


def keep_smallest_keys(keys, labels, per_class: int):
    """Indices of the ``per_class`` smallest keys of each label value (label order, then key
    order); labels are non-negative."""
    by_key = torch.argsort(keys)
    idx = by_key[torch.argsort(labels[by_key], stable=True)]
    lab = labels[idx]
    rank = torch.arange(len(lab)) - torch.searchsorted(lab, lab)
    return idx[rank < per_class]


@torch.no_grad()
def sample_embeddings(model, dataset, *, per_class: int = 200, seed: int = 0, device="cpu",
                      batch: int = 50, embed=None):
    """(z (n, D) float32 unit rows, labels (n,) int64): the class-balanced sample described
    above. ``embed(model, images)`` -> (B, D, h, w) chooses the embedding (default: the
    representation head, the logits for a model without one)."""
    if per_class < 1:
        raise ValueError(f"sample_embeddings: per_class must be positive, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    C = dataset.num_classes
    z_all = torch.zeros(0, 0)
    y_all = torch.zeros(0, dtype=torch.int64)
    k_all = torch.zeros(0)
    with evaluating(model):
        for x, y in same_size_batches(dataset, batch):
            x = normalize_images(x.to(device))
            e = representation(model(x)) if embed is None else embed(model, x)
            lab = labels_at(y.to(device), e.shape[-2:], C).reshape(-1).cpu()
            z = F.normalize(e.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, e.shape[1]).cpu()
            keys = torch.rand(len(lab), generator=g)
            ok = lab >= 0
            z_all = torch.cat([z_all.reshape(-1, z.shape[1]), z[ok]])
            y_all, k_all = torch.cat([y_all, lab[ok]]), torch.cat([k_all, keys[ok]])
            keep = keep_smallest_keys(k_all, y_all, per_class)
            z_all, y_all, k_all = z_all[keep], y_all[keep], k_all[keep]
    return z_all, y_all


def _tsne():
    try:
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise ImportError("pixcon.viz.embedding_tsne projects with scikit-learn's t-SNE: "
                          "pip install 'pixcon[tsne]' (./dev setup installs it)") from e
    return TSNE


def embedding_tsne(models, dataset, path=None, *, per_class: int = 200, perplexity: float = 30.0,
                   seed: int = 0, device="cpu", batch: int = 50, embed=None,
                   palette_name: str = "distinct", title: str | None = None) -> dict:
    """t-SNE of each model's class-balanced pixel sample. ``models``: a model or a dict
    name -> model (one panel each, in order). Writes a PNG to ``path`` when given.
    Returns {name: {"xy": (n, 2) array, "labels": (n,) array}}. The perplexity is capped at
    (n - 1) / 3 for small samples (scikit-learn requires it below n)."""
    TSNE = _tsne()
    if isinstance(models, torch.nn.Module):
        models = {"model": models}
    out = {}
    for name, model in models.items():
        z, y = sample_embeddings(model, dataset, per_class=per_class, seed=seed, device=device,
                                 batch=batch, embed=embed)
        if len(y) < 4:
            raise ValueError(f"embedding_tsne: {name!r} has {len(y)} labelled pixels; t-SNE "
                             f"needs at least 4")
        tsne = TSNE(n_components=2, perplexity=min(perplexity, (len(y) - 1) / 3), init="pca",
                    random_state=seed)
        out[name] = {"xy": tsne.fit_transform(z.double().numpy()), "labels": y.numpy()}
    if path is not None:
        tsne_png(out, list(dataset.class_names), path, palette_name=palette_name, title=title)
    return out


def tsne_png(projections: dict, class_names, path, *, palette_name: str = "distinct",
             title: str | None = None):
    """Scatter plots of ``embedding_tsne``'s result side by side, one colour per class (the
    palette's), a shared legend of the classes that occur."""
    p = plt()
    table = palette(palette_name) / 255.0
    n = len(projections)
    fig, axes = p.subplots(1, n, figsize=(3.6 * n + 1.8, 3.8), dpi=100, squeeze=False)
    present = sorted({int(v) for r in projections.values() for v in np.unique(r["labels"])})
    for ax, (name, r) in zip(axes[0], projections.items()):
        for c in present:
            m = r["labels"] == c
            ax.scatter(r["xy"][m, 0], r["xy"][m, 1], s=4, color=table[c], alpha=0.8,
                       label=f"{c} {class_names[c]}", linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name} ({len(r['labels'])} pixels)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False, markerscale=2.5)
    fig.suptitle(title or "pixel embeddings (t-SNE, class-balanced sample)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    fig.savefig(path)
    p.close(fig)
    return path
