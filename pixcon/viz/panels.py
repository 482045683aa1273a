"""Qualitative panels: image, ground truth and several models' predictions side by side.

Palettes (``palette(name, num_classes)``), each a (256, 3) uint8 table indexed by label value:

- ``"voc"``: Pascal VOC's colour map (class k's colour is the bits of k spread over R, G, B,
  high bits first); defined for any k < 256, so it also serves datasets without their own.
- ``"cityscapes"``: the 19 train ids' colours of the Cityscapes benchmark.
- ``"sun"``: SUN RGB-D's 37 classes have no colour map of their own in the dataset; pixcon uses
  37 hues spread by the golden angle at two lightness levels (distinct neighbours, fixed).
- ``"distinct"``: the same construction for every label 0..254 (hues by the golden angle,
  lightness cycling over three levels): neighbouring classes always differ, also at ADE20K's
  150 or COCO-Stuff's 171. The default for the embedded scenes and any dataset without a map of
  its own; VOC's own map (``"voc"``) draws classes 1 and 8 in two dark reds, as the dataset does.

The ignore label (255 unless told otherwise) is drawn in VOC's boundary cream (224, 224, 192)
and named "ignore" in the legend.
"""
from __future__ import annotations

import colorsys
import textwrap

import numpy as np
import torch

from .common import plt, predict

IGNORE_COLOUR = (224, 224, 192)
CITYSCAPES = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
              (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
              (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
              (0, 80, 100), (0, 0, 230), (119, 11, 32))
PALETTES = ("voc", "cityscapes", "sun", "distinct")


def _voc() -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    for k in range(256):
        c, rgb = k, [0, 0, 0]
        for shift in range(7, -1, -1):          # bit j of k's groups of three -> bit 7-j of R/G/B
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << shift
            c >>= 3
        table[k] = rgb
    return table


def _golden(n: int, levels=(0.62, 0.45)) -> np.ndarray:
    """Labels 0..n-1: hues spread by the golden angle, lightness cycling over ``levels``."""
    table = _voc()
    for k in range(n):
        h = (k * 0.618033988749895) % 1.0
        r, g, b = colorsys.hls_to_rgb(h, levels[k % len(levels)], 0.75)
        table[k] = (round(255 * r), round(255 * g), round(255 * b))
    return table


def palette(name: str = "voc", *, ignore_index: int = 255) -> np.ndarray:
    """(256, 3) uint8 colour table ``name`` ("voc", "cityscapes", "sun", "distinct"), the
    ignore label's entry set to the ignore colour."""
    if name == "voc":
        table = _voc()
    elif name == "cityscapes":
        table = _voc()
        table[:len(CITYSCAPES)] = CITYSCAPES
    elif name == "sun":
        table = _golden(37)
    elif name == "distinct":
        table = _golden(255, (0.5, 0.7, 0.35))
    else:
        raise ValueError(f"palette: name must be one of {PALETTES}, got {name!r}")
    if 0 <= ignore_index < 256:
        table[ignore_index] = IGNORE_COLOUR
    return table


def colorize(labels, table: np.ndarray, *, ignore_index: int = 255) -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8 through the colour table; values outside
    0..255 are drawn as ignored."""
    lab = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    lab = np.where((lab < 0) | (lab > 255), ignore_index % 256, lab)
    return table[lab]


def _image(x) -> np.ndarray:
    """(3, H, W) float in [0, 1] or uint8 -> (H, W, 3) uint8."""
    x = torch.as_tensor(x).detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def panel_predictions(predictions: dict, images, device="cpu") -> dict:
    """Each value of ``predictions`` as (N, H, W) labels: a tensor of labels is kept, a model is
    run on ``images`` (argmax of its logits at the image size, see ``common.predict``)."""
    out = {}
    for name, p in predictions.items():
        if isinstance(p, torch.nn.Module):
            p = predict(p, images, device)
        p = torch.as_tensor(p)
        if p.dim() == 2:
            p = p[None]
        if p.shape[0] != len(images) or p.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"prediction_panels: predictions[{name!r}] has shape "
                             f"{tuple(p.shape)}, expected ({len(images)}, "
                             f"{images.shape[-2]}, {images.shape[-1]})")
        out[name] = p.cpu()
    return out


LEGEND_PT = 7


def _legend_handles(labels, preds, table, class_names, ignore_index):
    """One patch per class that occurs in the grid (ground truth or any prediction), in label
    order, then the ignore label if present."""
    from matplotlib.patches import Patch
    shown = torch.cat([labels.reshape(-1)] + [v.reshape(-1) for v in preds.values()]).unique()
    handles = [Patch(color=table[v] / 255, label=f"{v} {class_names[v]}")
               for v in shown.tolist() if 0 <= v < len(class_names)]
    if (shown == ignore_index).any() or ((shown < 0) | (shown > 255)).any():
        handles.append(Patch(color=np.array(IGNORE_COLOUR) / 255,
                             label=f"ignore ({ignore_index})"))
    return handles


def _legend_layout(handles, fig_h):
    """(columns, width in inches) of a legend that fits the figure's height: as many entries a
    column as LEGEND_PT text lines fit (150 classes of ADE20K in 3 columns beside 4 rows of
    panels), each column as wide as the longest label."""
    per_col = max(4, int((fig_h * 72 - 24) / (LEGEND_PT * 1.7)))
    ncol = max(1, -(-len(handles) // per_col))
    chars = max((len(h.get_label()) for h in handles), default=8)
    col_w = (1.2 + 0.8) * LEGEND_PT / 72 + 0.62 * LEGEND_PT / 72 * chars   # patch, gap, text
    return ncol, ncol * col_w + 0.3


def prediction_panels(images, labels, predictions: dict, path, *, class_names,
                      palette_name: str = "distinct", ignore_index: int = 255, device="cpu",
                      title: str | None = None):
    """Write a PNG grid: one row per image; columns image, ground truth, then each entry of
    ``predictions`` (name -> model or (N, H, W) labels) in order. A legend lists the classes
    that occur in the grid (ground truth or any prediction) and the ignore label if present.

    images (N, 3, H, W) float in [0, 1] (or uint8), labels (N, H, W). Returns ``path``."""
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images, labels = images[None], torch.as_tensor(labels)[None]
    labels = torch.as_tensor(labels)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"prediction_panels: images must be (N, 3, H, W), got "
                         f"{tuple(images.shape)}")
    if labels.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(f"prediction_panels: labels must be (N, H, W) = "
                         f"{(images.shape[0], *images.shape[2:])}, got {tuple(labels.shape)}")
    preds = panel_predictions(predictions, images, device)
    table = palette(palette_name, ignore_index=ignore_index)
    columns = ["image", "ground truth", *preds]
    n, H, W = labels.shape
    p = plt()
    handles = _legend_handles(labels, preds, table, class_names, ignore_index)
    cw, ch = 2.2 * W / max(H, W), 2.2 * H / max(H, W)      # inches per cell
    grid_w, fig_h = cw * len(columns), ch * n + 0.6
    ncol, legend_w = _legend_layout(handles, fig_h)
    fig, axes = p.subplots(n, len(columns), squeeze=False, dpi=100,
                           figsize=(grid_w + legend_w, fig_h))
    for i in range(n):
        cells = [_image(images[i]), colorize(labels[i], table, ignore_index=ignore_index)]
        cells += [colorize(v[i], table, ignore_index=ignore_index) for v in preds.values()]
        for j, (ax, cell) in enumerate(zip(axes[i], cells)):
            ax.imshow(cell, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
    split = grid_w / (grid_w + legend_w)          # the panels left of it, the legend beside them
    if title:                                     # wrapped to the figure's width
        width = int((grid_w + legend_w) * 72 / (9 * 0.6))
        fig.suptitle("\n".join(textwrap.wrap(title, width)), fontsize=9)
    fig.tight_layout(rect=(0, 0, split, 1))
    fig.canvas.draw()                             # the panels' drawn edge (square cells)
    edge = max(ax.get_position().x1 for ax in fig.axes) + 0.08 / fig.get_figwidth()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(edge, 0.5), ncol=ncol,
               fontsize=LEGEND_PT, frameon=False, handlelength=1.2, columnspacing=0.8,
               borderaxespad=0.2)
    fig.savefig(path)
    p.close(fig)
    return path

