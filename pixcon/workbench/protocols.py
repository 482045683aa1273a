"""Label-partition protocols of ReCo (specs/reco.md §3), usable on any dataset.

- :func:`partial_dataset`: a few fully labelled images, picked class-balanced (the official
  ``get_pascal_idx`` / ``get_cityscapes_idx`` loop). Unlike the official code, the candidates are
  sorted by id before the seeded shuffle, so the split is a function of (ids, labels, seed) and
  never of file-system (glob) order.
- :func:`partial_labels` / :func:`partial_label_map`: every image, sparse pixels: per class a
  uniformly chosen seed pixel grown by 5x5 dilations until it covers ``percent`` of the class
  (``"p1"``, ``"p5"``, ``"p25"``), or one pixel per class (``"p0"``). Each image draws from its
  own generator keyed by (seed, id), so the result does not depend on the order or the set of the
  other images.
"""
from __future__ import annotations

import random
import zlib

import numpy as np

PARTIAL = {"p0": 0.0, "p1": 0.01, "p5": 0.05, "p25": 0.25}


def image_classes(label, num_classes: int) -> set[int]:
    """Classes present in a label map (values outside [0, num_classes), e.g. void 255, dropped)."""
    v = np.unique(np.asarray(label))
    return {int(c) for c in v if 0 <= c < num_classes}


def partial_dataset(ids, classes_of, num_labels: int, num_classes: int, *, seed: int = 0,
                    min_classes: int = 3):
    """Pick ``num_labels`` image ids to label, class-balanced (official ``get_*_idx``).

    Args:
        ids: image ids (any order; sorted before shuffling).
        classes_of: id -> set of classes in the image (e.g. :func:`image_classes`).
        min_classes: T, the fewest classes an accepted image must have (official: 3 for VOC,
            background included; 12 for Cityscapes; use 1 for large budgets).

    The loop: shuffle with ``random.Random(seed)``; take images from the end; accept an image if
    it has at least T classes and (it is the first, or it holds a class of currently minimum
    count); deferred images are re-queued when the list runs out. Returns (labelled, unlabelled)
    id lists. Raises if the budget cannot be met.

    One deviation, where the official loop never ends: if no queued image holds a class of
    minimum count (a class that never appears with T others), that condition is dropped for one
    pick.
    """
    ids = sorted(ids)
    if not 0 < num_labels <= len(ids):
        raise ValueError(f"num_labels must be in [1, {len(ids)}], got {num_labels}")
    pool = list(ids)
    random.Random(seed).shuffle(pool)
    counter = np.zeros(num_classes, dtype=np.int64)
    fill = set(range(num_classes))
    chosen, deferred = [], []
    while len(chosen) < num_labels:
        if not pool:
            if not deferred:
                raise ValueError(f"only {len(chosen)} images can be labelled; cannot pick "
                                 f"{num_labels}")
            pool, deferred = deferred[::-1], []
            eligible = [i for i in pool if len(classes_of(i)) >= min_classes]
            if not eligible:
                raise ValueError(f"only {len(chosen)} images have at least {min_classes} "
                                 f"classes; cannot pick {num_labels} (lower min_classes)")
            if not any(classes_of(i) & fill for i in eligible):
                fill = set(range(num_classes))      # else the official loop would never end
        i = pool.pop()
        u = classes_of(i)
        if len(u) >= min_classes and (not chosen or u & fill):
            chosen.append(i)
            counter[list(u)] += 1
        else:
            deferred.append(i)
        fill = set(np.flatnonzero(counter == counter.min()).tolist())
    picked = set(chosen)
    return chosen, [i for i in ids if i not in picked]


def partial_label_map(label, percent: float, rng: np.random.Generator, *, num_classes: int,
                      ignore_index: int = 255):
    """Sparse version of one label map (official ``*_preprocess.py``).

    For each valid class l in ascending order: a seed pixel uniform among the class's pixels;
    target = int(percent * n_l); the seed's square is grown by 5x5 dilations (side 1 + 4k) and
    the labelled set is square & class until it reaches the target (the last ring may overshoot;
    target <= 1 keeps the seed alone). ``percent = 0`` is p0: the seed pixel only. Everything
    else becomes ``ignore_index``. The growth is computed in closed form: a class pixel at
    Chebyshev distance d from the seed enters at dilation ceil(d / 2)."""
    label = np.asarray(label)
    out = np.full(label.shape, ignore_index, dtype=label.dtype)
    for c in sorted(image_classes(label, num_classes)):
        ys, xs = np.nonzero(label == c)
        k = rng.integers(len(ys))
        target = int(percent * len(ys))
        if target <= 1:
            out[ys[k], xs[k]] = c
            continue
        step = (np.maximum(np.abs(ys - ys[k]), np.abs(xs - xs[k])) + 1) // 2
        K = np.sort(step)[target - 1]                  # fewest dilations reaching the target
        keep = step <= K
        out[ys[keep], xs[keep]] = c
    return out


def partial_labels(ids, labels, protocol: str, *, num_classes: int, seed: int = 0,
                   ignore_index: int = 255):
    """Apply ``protocol`` ("p0", "p1", "p5" or "p25") to every label map: ids and label maps
    (numpy or torch, (H, W)) in any order. Returns the sparse maps in the same order."""
    if protocol not in PARTIAL:
        raise ValueError(f"protocol must be one of {tuple(PARTIAL)}, got {protocol!r}")
    out = []
    for i, lab in zip(ids, labels):
        rng = np.random.default_rng([seed, zlib.crc32(str(i).encode())])
        out.append(partial_label_map(np.asarray(lab), PARTIAL[protocol], rng,
                                     num_classes=num_classes, ignore_index=ignore_index))
    return out
