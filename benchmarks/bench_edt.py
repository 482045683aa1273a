"""distance_transform benchmark: pixcon (C++ on CPU, Triton on GPU) vs SciPy (per image, per
class, as users call it today) and, where installed, OpenCV's exact mode (per image, per class),
the ``edt`` package (multi-label, per image) and, on a GPU, CuPy's and cuCIM's
distance_transform_edt (per image, per class). The CPU peers are optional:
``pip install opencv-python-headless edt`` (the table says which were missing).

    python benchmarks/bench_edt.py                  # all sizes that fit the device
    python benchmarks/bench_edt.py --size tiny      # seconds; what CI runs

Sizes: "bane" 8x128x256 multi-label (19 classes + background, the Contextrast layer-1 error map),
"pyramid" the HRNet BANE pyramid (8 x {128x256, 64x128, 32x64, 16x32}, multi-label), "large"
8x1024x2048 binary. SciPy/CuPy need one binary call per (image, class); pixcon does one
multi-label call for the whole batch. Rows report ms per batch and the speed-up over SciPy.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchkit, baselines
import benchkit as pb  # noqa: E402
from pixcon.ops import distance_transform

SIZES = {
    "tiny": [(2, 16, 32, 4)],
    "bane": [(8, 128, 256, 19)],
    "pyramid": [(8, 128, 256, 19), (8, 64, 128, 19), (8, 32, 64, 19), (8, 16, 32, 19)],
    "large": [(8, 1024, 2048, 0)],
    # issue 32 item 5's sizes: 8 x 512 x 512, binary and multi-label
    "512": [(8, 512, 512, 0), (8, 512, 512, 19)],
}


def make_maps(B, H, W, C, seed=0):
    """Multi-label error-like maps (C > 0: blobs of classes with -1 = background) or binary
    speckle-with-blobs masks (C = 0)."""
    g = torch.Generator().manual_seed(seed)
    if C == 0:
        coarse = torch.rand(B, 1, H // 32, W // 32, generator=g) < 0.6
        m = torch.nn.functional.interpolate(coarse.float(), size=(H, W)).bool()[:, 0]
        return m & (torch.rand(B, H, W, generator=g) > 0.01)
    coarse = torch.randint(-1, C, (B, 1, max(H // 8, 1), max(W // 8, 1)), generator=g)
    lab = torch.nn.functional.interpolate(coarse.float(), size=(H, W)).long()[:, 0]
    lab[torch.rand(B, H, W, generator=g) < 0.3] = -1
    return lab


def _per_class(maps, C, binary_dt, xp=np):
    """The whole (B, H, W) distance map from a binary transform called per image (binary maps)
    or per (image, class) (multi-label: each class's pixels get their distance to the nearest
    pixel outside the class), as users of the binary libraries do. Background stays 0.
    xp: the array module (numpy on the CPU, cupy for the GPU peers)."""
    a = maps.cpu().numpy() if xp is np else xp.asarray(maps)
    out = xp.zeros(a.shape, dtype=xp.float64)
    for b in range(a.shape[0]):
        if C == 0:
            out[b] = binary_dt(a[b])
            continue
        for c in range(C):
            m = a[b] == c
            if m.any():
                out[b][m] = binary_dt(m)[m]
    return out


def scipy_batch(maps, C):
    from scipy import ndimage
    return _per_class(maps, C, ndimage.distance_transform_edt)


def opencv_batch(maps, C, threads=1):
    """OpenCV's exact mode (DIST_L2 with DIST_MASK_PRECISE) per image / class, on ``threads``
    of OpenCV's own pool. OpenCV counts the image border as far away, as SciPy does."""
    import cv2
    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        return _per_class(maps, C, lambda m: cv2.distanceTransform(
            m.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE))
    finally:
        cv2.setNumThreads(before)


def edt_batch(maps, C, threads=1):
    """The ``edt`` package: multi-label in one call per image (labels shifted so that the
    background is 0), border not a boundary (black_border=False), ``parallel=threads``."""
    import edt
    a = maps.cpu().numpy()
    lab = a.astype(np.uint32) if C == 0 else (a + 1).astype(np.uint32)
    return np.stack([edt.edt(lab[b], black_border=False, parallel=threads)
                     for b in range(a.shape[0])])


PEER_PACKAGES = {"OpenCV": ("cv2", "opencv-python-headless"), "the edt package": ("edt", "edt")}


def _installed(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def peers(device, threads=None):
    """{name: fn(maps, C)} of the installed CPU peers (SciPy always, one thread); OpenCV and the
    edt package at 1 thread and at ``threads`` (all cores by default), as pixcon runs."""
    out = {"scipy (CPU, per image/class)": scipy_batch}
    many = threads or os.cpu_count()
    for module, name, fn in (("cv2", "opencv exact (CPU, per image/class)", opencv_batch),
                             ("edt", "edt package (CPU, per image)", edt_batch)):
        if not _installed(module):
            continue
        out[f"{name}, 1 thread"] = fn
        if many > 1:
            out[f"{name}, {many} threads"] = (lambda maps, C, fn=fn: fn(maps, C, many))
    return out


def cupy_batch(maps, C):
    import cupy
    from cupyx.scipy import ndimage as cnd
    return _per_class(maps, C, cnd.distance_transform_edt, xp=cupy)


def cucim_batch(maps, C):
    """cuCIM's exact EDT (PBA+ on the GPU), per image and class like the other peers."""
    import cupy
    from cucim.core.operations.morphology import distance_transform_edt
    return _per_class(maps, C, distance_transform_edt, xp=cupy)


def run(size="pyramid", device=None, reps=5, out=None, threads=None, verbose=True):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = pb.metadata(device)
    rows = []
    for B, H, W, C in SIZES[size]:
        maps = make_maps(B, H, W, C)
        kw = dict(labels=True, background=-1) if C else {}
        providers = {name: (lambda fn=fn: fn(maps, C))
                     for name, fn in peers(device, threads).items()}
        if device.type == "cuda":
            dm = maps.to(device)
            providers["pixcon triton"] = lambda: distance_transform(dm, backend="triton", **kw)
            import importlib.util
            if importlib.util.find_spec("cupy") is not None:
                providers["cupy (per image/class)"] = lambda: cupy_batch(dm, C)
            if importlib.util.find_spec("cucim") is not None:
                providers["cuCIM (per image/class)"] = lambda: cucim_batch(dm, C)
        else:
            providers["pixcon C++ (1 thread)"] = "1"
            providers["pixcon C++ (all threads)"] = "all"
        for name, fn in providers.items():
            if verbose:
                print(f"[{size} {B}x{H}x{W} C={C}] {name} ...", file=sys.stderr, flush=True)
            old = torch.get_num_threads()
            if isinstance(fn, str):
                torch.set_num_threads(1 if fn == "1" else (threads or os.cpu_count()))
                fn = (lambda: distance_transform(maps, backend="native", **kw))
            on_gpu = any(k in name for k in ("triton", "cupy", "cuCIM"))
            dev = device if on_gpu else torch.device("cpu")
            ms = pb.time_ms(fn, dev, warmup=1, reps=reps)
            torch.set_num_threads(old)
            rows.append({"op": "distance_transform", "size": size, "shape": [B, H, W],
                         "classes": C, "provider": name, "ms": round(ms, 4),
                         "threads": torch.get_num_threads() if "all" in name else 1, **meta})
    base = {}                                   # a shape can come binary and multi-label
    for r in rows:
        if r["provider"].startswith("scipy"):
            base[(tuple(r["shape"]), r["classes"])] = r["ms"]
    for r in rows:
        r["speedup_vs_scipy"] = round(base[(tuple(r["shape"]), r["classes"])] / r["ms"], 2)
    if out:
        pb.write_results(rows, out, f"edt-{size}", markdown(rows))
    return rows


def markdown(rows) -> str:
    m = rows[0]
    lines = [f"distance_transform on {m['device']} | torch {m['torch']} | triton {m['triton']} | "
             f"commit {m['commit']} | {m['date']}", "",
             "| shape | classes | provider | ms per batch | speed-up vs SciPy |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['classes'] or 'binary'} | "
                     f"{r['provider']} | {r['ms']:.3f} | {r['speedup_vs_scipy']:.1f}x |")
    total = {}
    for r in rows:
        total[r["provider"]] = total.get(r["provider"], 0.0) + r["ms"]
    if len({tuple(r["shape"]) for r in rows}) > 1:
        lines += ["", "Whole set: " + ", ".join(f"{k} {v:.3f} ms" for k, v in total.items())]
    vs = against_peers(rows)
    missing = [name for name in PEER_PACKAGES if not _installed(PEER_PACKAGES[name][0])]
    if missing and any(r["provider"].startswith("pixcon C++") for r in rows):
        lines += ["", "Not installed, so not compared: " + ", ".join(
            f"{name} (pip install {PEER_PACKAGES[name][1]})" for name in missing) + "."]
    if vs:
        lines += ["", "pixcon against the best of OpenCV and the edt package at the same thread "
                  "count (issue 32 item 5 asks for 2x; SciPy 4x):", "",
                  "| shape | classes | threads | pixcon ms | best peer | x best peer | x SciPy |",
                  "|---|---|---|---|---|---|---|"]
        for shape, C, n, ms, peer, x_peer, x_scipy in vs:
            lines.append(f"| {shape} | {C or 'binary'} | {n} | {ms:.3f} | {peer} | "
                         f"{x_peer:.1f}x | {x_scipy:.1f}x |")
    return "\n".join(lines) + "\n"


def against_peers(rows):
    """[(shape, classes, threads, pixcon ms, best peer, its ms / pixcon's, SciPy's / pixcon's)]
    per shape and thread count (1 and all): pixcon's C++ rows against OpenCV's and the edt
    package's rows of the same thread count."""
    out = []
    for shape, C in dict.fromkeys(("x".join(map(str, r["shape"])), r["classes"]) for r in rows):
        rs = [r for r in rows if "x".join(map(str, r["shape"])) == shape and r["classes"] == C]
        scipy = next((r["ms"] for r in rs if r["provider"].startswith("scipy")), None)
        # the thread count from the providers' names (the suite tags every row with its own
        # "threads"): pixcon's "(1 thread)" row against the peers' ", 1 thread" rows, its
        # "(all threads)" row against their ", N threads" rows
        peers_ = [p for p in rs if p["provider"].startswith(("opencv", "edt"))]
        for r in rs:
            if not r["provider"].startswith("pixcon C++"):
                continue
            one = r["provider"].endswith("(1 thread)")
            same = [p for p in peers_ if p["provider"].endswith(", 1 thread") == one]
            if not same:
                continue
            best = min(same, key=lambda p: p["ms"])
            n = 1 if one else int(best["provider"].rsplit(", ", 1)[1].split()[0])
            out.append((shape, r["classes"], n, r["ms"], best["provider"], best["ms"] / r["ms"],
                        scipy / r["ms"] if scipy else float("nan")))
    return out


def main(argv=None):
    ap = pb.parser(__doc__, SIZES, "settings to run", reps=5,
                   many_sizes=["bane", "pyramid", "large", "512"])
    a = ap.parse_args(argv)
    for size in a.size:
        print(markdown(run(size, reps=a.reps, out=a.out)))


if __name__ == "__main__":
    main()
