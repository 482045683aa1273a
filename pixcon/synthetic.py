"""Synthetic segmentation batches for demos, benchmarks and tests (no download).

Labels are Voronoi regions (spatially coherent classes), embeddings are a class centroid plus
noise (so class means and the relation graph are not trivial), probabilities are a noisy softmax
in which a fraction of pixels is below ReCo's 0.97 threshold."""
from __future__ import annotations

import torch


def reco_batch(batch=4, dim=64, height=33, width=33, num_classes=21, present=10, *,
               label_scale=1, ignore_fraction=0.05, dtype=torch.float32, device="cpu", seed=0):
    """Returns (emb (B, D, h, w), labels (B, h*s, w*s) int64 with 255 = ignore, probs (B, C, h, w)).

    ``present`` classes (chosen at random among ``num_classes``) appear in the batch; labels come
    at ``label_scale`` times the feature resolution."""
    g = torch.Generator().manual_seed(seed)
    B, D, h, w, C = batch, dim, height, width, num_classes
    classes = torch.randperm(C, generator=g)[:present]
    H, W = h * label_scale, w * label_scale
    cells = max(present, 6)
    centers = torch.rand(B, cells, 2, generator=g) * torch.tensor([H, W])
    cell_cls = classes[torch.arange(cells) % present][torch.randperm(cells, generator=g)]
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    grid = torch.stack([yy, xx], -1).float().reshape(1, -1, 1, 2)
    nearest = ((grid - centers[:, None]) ** 2).sum(-1).argmin(-1)           # (B, H*W)
    labels = cell_cls[nearest].reshape(B, H, W)
    labels[torch.rand(B, H, W, generator=g) < ignore_fraction] = 255

    lab_small = labels[:, ::label_scale, ::label_scale][:, :h, :w].clamp(max=C - 1)
    centroids = torch.randn(C, D, generator=g)
    emb = centroids[lab_small].permute(0, 3, 1, 2) + 1.5 * torch.randn(B, D, h, w, generator=g)
    logits = 6.0 * torch.nn.functional.one_hot(lab_small, C).permute(0, 3, 1, 2) \
        + 1.5 * torch.randn(B, C, h, w, generator=g)
    probs = torch.softmax(logits, dim=1)
    return (emb.to(device=device, dtype=dtype), labels.to(device),
            probs.to(device=device, dtype=dtype))
