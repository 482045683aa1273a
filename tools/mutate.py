"""Mutation testing with a list of our own mutants: realistic one-line mistakes in the rules that
decide the methods' values (specs/*.md), each applied alone to a copy of the tree while the
tests that should notice it run. A mutant the tests do not notice "survives".

    ./dev mutate                      # every mutant (about 15 minutes on 2 cores)
    ./dev mutate --only reco          # the mutants whose name starts with "reco"
    ./dev mutate --list               # what each mutant changes and which tests run

Each mutant is (name, file, the exact original text, its replacement, the tests to run, what
the mistake is). The original text must occur exactly once, so a refactoring that moves it
fails loudly here instead of silently testing nothing. The copy holds the git-tracked files and
the built extension (pixcon/_C*.so); the tests run with -x under a per-mutant time limit.
Results: a table on stdout and tools/mutants-last.json (not tracked). Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixcon.progress import Progress  # noqa: E402

RECO = ["tests/test_semantics.py", "tests/test_reco.py", "tests/test_primitives.py"]
CTX = ["tests/test_contextrast.py"]
CSEG = ["tests/test_contrastiveseg.py"]
CAC = ["tests/test_cac.py", "tests/test_cac_ablation.py"]
TRAIN = ["tests/test_train.py"]
RECO_K = ["tests/test_reco.py"]
EDT = ["tests/test_edt.py"]
U2PL = ["tests/test_u2pl.py"]
EDGES = ["tests/test_thresholds.py", "tests/test_semantics.py"]   # issue 33: equality, sizes

MUTANTS = [
    # --- ReCo (specs/reco.md §1) ---------------------------------------------------------------
    ("reco-hard-uses-max-prob", "pixcon/core/common.py",
     "    p = own_class_prob(probs, lab)\n",
     "    p = probs.amax(1).reshape(-1)\n", RECO,
     "hard pixels from the maximum probability instead of the own label's"),
    ("reco-hard-less-equal", "pixcon/core/common.py",
     "    return (lab >= 0) & (p < threshold)",
     "    return (lab >= 0) & (p <= threshold)", RECO,
     "the hard rule as <= (the paper's text) instead of the official <"),
    ("reco-query-counters-shared", "pixcon/reference/reco.py",
     "        rows = c * Q + torch.arange(Q, device=dev)",
     "        rows = torch.arange(Q, device=dev)", RECO,
     "every class draws its queries from the same counters"),
    ("reco-divisor-classes-with-queries", "pixcon/reference/reco.py",
     "    return per_query.sum() / (num_queries * max(K, 1))",
     "    return per_query.sum() / (num_queries * max(int((queries[:, 0] >= 0).sum()), 1))", RECO,
     "divide by the classes that drew queries instead of all present classes"),
    ("reco-relation-own-class-allowed", "pixcon/core/common.py",
     "    allowed = present[None, :] & present[:, None] & ~torch.eye(C, dtype=torch.bool, device=m.device)",
     "    allowed = present[None, :] & present[:, None]", RECO,
     "the query's own class may be drawn as a negative class"),
    ("reco-relation-no-temperature", "pixcon/core/common.py",
     "    sim = (m @ m.T) / temperature",
     "    sim = m @ m.T", RECO,
     "the relation softmax without its temperature"),
    ("reco-positive-not-normalised", "pixcon/reference/reco.py",
     "        pos = cm.normalize(means[c].detach())",
     "        pos = means[c].detach()", RECO,
     "the positive key (class mean) enters the cosine unnormalised"),
    ("reco-nearest-exact", "pixcon/core/common.py",
     "    src = torch.floor(dst.to(torch.float32) * scale).to(torch.int64)",
     "    src = torch.floor((dst.to(torch.float32) + 0.5) * scale).to(torch.int64)", RECO,
     "labels downsampled with nearest-exact (pixel centres) instead of ATen's nearest"),
    ("reco-uniform-index-modulo", "pixcon/core/rng.py",
     "    return (r.to(torch.int64) * n.to(torch.int64)) >> 32",
     "    return r.to(torch.int64) % n.to(torch.int64)", RECO,
     "a draw mapped to an index by modulo instead of the multiply-shift"),
    ("reco-mask-not-applied", "pixcon/core/common.py",
     "        valid &= resize_nearest(mask, size).to(torch.bool)",
     "        pass", RECO, "the validity mask is not applied to the labels"),
    ("reco-relation-absent-classes", "pixcon/core/common.py",
     "    allowed = present[None, :] & present[:, None] & ~torch.eye(C, dtype=torch.bool, device=m.device)",
     "    allowed = present[:, None] & ~torch.eye(C, dtype=torch.bool, device=m.device)", RECO,
     "classes absent from the batch may be drawn as negative classes"),
    # --- the trainer's semi-supervised wiring (specs/reco.md §2) -------------------------------
    ("train-reco-mask-strong-threshold", "pixcon/train/loop.py",
     "mask = torch.cat([yl != ignore, conf >= cfg.weak_threshold])",
     "mask = torch.cat([yl != ignore, conf >= cfg.strong_threshold])", TRAIN,
     "the contrastive mask at 0.97 (eta's threshold) instead of 0.7"),
    ("train-classmix-drops-ignore", "pixcon/train/semisup.py",
     "        classes = torch.unique(label[i])\n",
     "        classes = torch.unique(label[i])\n        classes = classes[classes != 255]\n",
     TRAIN, "ClassMix never selects the ignore value (the official code can)"),
    ("train-eta-greater", "pixcon/train/semisup.py",
     "eta = (conf.ge(strong_threshold) & valid)",
     "eta = (conf.gt(strong_threshold) & valid)", TRAIN,
     "eta counts confidences strictly above the threshold"),
    # --- Contextrast (specs/contextrast.md) ------------------------------------------------------
    ("ctx-fusion-weights-swapped", "pixcon/core/contextrast.py",
     "torch.where(deep_present[:, None], w_low * a + w_high * deep, a)",
     "torch.where(deep_present[:, None], w_high * a + w_low * deep, a)", CTX,
     "the static fusion's weights swapped between the layer and the deepest layer"),
    ("ctx-fusion-everywhere", "pixcon/core/contextrast.py",
     "torch.where(deep_present[:, None], w_low * a + w_high * deep, a)",
     "w_low * a + w_high * deep", CTX,
     "classes absent at the deepest layer fused with a zero anchor"),
    ("ctx-layer-weights-reversed", "pixcon/reference/contextrast.py",
     "zip(zs, fused, here, layer_weights)",
     "zip(zs, fused, here, tuple(reversed(layer_weights)))", CTX,
     "lambda_i applied shallow-to-deep in the wrong order"),
    ("ctx-bane-farthest", "pixcon/reference/contextrast.py",
     "        order = torch.sort(d2[idx], stable=True).indices",
     "        order = torch.sort(d2[idx], stable=True, descending=True).indices", CTX,
     "BANE keeps the error pixels farthest from the boundary"),
    ("ctx-divisor-all-classes", "pixcon/reference/contextrast.py",
     "        n_present = pres.sum()",
     "        n_present = torch.tensor(C)", CTX,
     "L_i divided by every class instead of the classes present at layer i"),
    ("ctx-no-normalisation", "pixcon/reference/contextrast.py",
     "        z = F.normalize(z, dim=1, eps=cm.EPS)",
     "        pass", CTX, "pixel embeddings not L2-normalised (normalize=True ignored)"),
    ("ctx-r2-negatives-inverted", "pixcon/core/contextrast.py",
     "    return selected[:, None] & (err[:, None] == c[None, :])",
     "    return selected[:, None] & (err[:, None] >= 0) & (err[:, None] != c[None, :])", CTX,
     "reading R2 uses the other classes' false positives instead of n's own"),
    # --- ContrastiveSeg (specs/contrastiveseg.md) ------------------------------------------------
    ("cseg-anchors-without-positive-counted", "pixcon/core/contrastiveseg.py",
     "    used = (y >= 0) & (npos > 0)",
     "    used = y >= 0", CSEG,
     "anchors without a positive counted in the mean (as zeros)"),
    ("cseg-no-temperature-factor", "pixcon/core/contrastiveseg.py",
     "    return factor * torch.where(used, terms, 0.0).sum() / used.sum().clamp(min=1)",
     "    return torch.where(used, terms, 0.0).sum() / used.sum().clamp(min=1)", CSEG,
     "the factor tau / tau_b left out"),
    ("cseg-split-rule-all-hard", "pixcon/reference/contrastiveseg.py",
     "        keep_h = n_view - n_easy",
     "        keep_h = min(n_hard, n_view)", CSEG,
     "with few easy pixels, every view taken from the hard ones"),
    ("cseg-supcon-denominator", "pixcon/reference/contrastiveseg.py",
     "    ell = -F.softplus(nl - s)",
     "    ell = s - torch.logsumexp(s.masked_fill(~(neg | pos), float(\"-inf\")), dim=1,\n"
     "                              keepdim=True)", CSEG,
     "SupCon's denominator (all positives) instead of each positive's own"),
    ("ctx-r1-uses-prediction", "pixcon/core/contextrast.py",
     'return torch.where(wrong, gt if reading == "R1" else pred, -1)',
     'return torch.where(wrong, pred, -1)', CTX,
     "reading R1's error maps keyed by the predicted class"),
    ("ctx-own-class-negatives", "pixcon/core/contextrast.py",
     "        return selected[:, None] & (err[:, None] >= 0) & (err[:, None] != c[None, :])",
     "        return selected[:, None] & (err[:, None] >= 0)", CTX,
     "R1 negatives of anchor n include n's own false negatives"),
    ("cseg-class-filter-not-strict", "pixcon/reference/contrastiveseg.py",
     "            if c >= 0 and int((gt[b] == c).sum()) > max_views]",
     "            if c >= 0 and int((gt[b] == c).sum()) >= max_views]", CSEG,
     "a class with exactly max_views pixels kept (the official filter is strict)"),
    # --- CAC (specs/cac.md) ---------------------------------------------------------------------
    ("cac-threshold-on-anchor", "pixcon/core/cac.py",
     "        keep = keep & (c_target > pos_threshold)",
     "        keep = keep & (c_anchor > pos_threshold)", CAC,
     "the confidence threshold applied to the anchor instead of the target"),
    ("cac-ties-pull", "pixcon/core/cac.py",
     "        keep = keep & (c_anchor < c_target)",
     "        keep = keep & (c_anchor <= c_target)", CAC,
     "equal confidences pull both views"),
    ("cac-l2-not-squared", "pixcon/core/cac.py",
     "    return (f_anchor - f_target.detach()).square().sum(dim=1)",
     "    return (f_anchor - f_target.detach()).square().sum(dim=1).sqrt()", CAC,
     "experiment I's alignment as the distance instead of its square"),
    ("cac-no-sampling-still-filters", "pixcon/core/cac.py",
     "    return torch.ones_like(y_anchor), torch.zeros_like(negative_labels)",
     "    return y_anchor, negative_labels", CAC,
     "negative_sampling=False still drops the anchor's own pseudo-label"),
    ("cac-no-pseudo-label-filter", "pixcon/reference/common.py",
     "    neg = (y[:, None] >= 0) & (key_labels[None, :] >= 0) & (y[:, None] != key_labels[None, :])",
     "    neg = (y[:, None] >= 0) & (key_labels[None, :] >= 0)", CAC,
     "negatives with the anchor's pseudo-label kept"),
    # --- the fused kernels (issue 12's redesign; checked under the Triton interpreter) ----------
    ("kern-reco-negative-counters", "pixcon_kernels/reco.py",
     "        kidx = negative_pixels(m * N + n, ",
     "        kidx = negative_pixels(n + m * 0, ", RECO_K,
     "every query regenerates the same negatives (counters without the query's row)"),
    ("kern-reco-direction-without-positive", "pixcon_kernels/reco.py",
     "    u = v / l_run - p * p_inv - (cb / l_run - cos0) * a * a_inv",
     "    u = v / l_run - (cb / l_run - cos0) * a * a_inv", RECO_K,
     "the gradient direction leaves out the positive's -1"),
    ("kern-ctx-radial-term-dropped", "pixcon_kernels/anchor.py",
     "        r = tl.where(inv * eps < 1.0, r, 0.0)",
     "        r = r * 0.0", CTX,
     "the pixel gradient skips the unit-norm projection (the radial term)"),
    ("kern-edt-run-end-off-by-one", "pixcon_kernels/edt.py",
     "        down = tl.where(end < H, end - y + 1, FAR)",
     "        down = tl.where(end < H, end - y, FAR)", EDT,
     "the distance to the differing pixel below is one short"),
    ("kern-edt-row-search-one-side", "pixcon_kernels/edt.py",
     "        for sign in tl.static_range(2):",
     "        for sign in tl.static_range(1):", EDT,
     "a row's outward search looks only to the left of each pixel"),
    ("kern-edt-row-no-boundary-finite", "pixcon_kernels/edt.py",
     "            cand = tl.where(same, tl.where(gs >= FAR, NONE, gs + dd), dd)",
     "            cand = tl.where(same, gs + dd, dd)", EDT,
     "a column without a differing pixel (G^2 = FAR) counts as a distance"),
    # --- U2PL (specs/u2pl.md) ---------------------------------------------------------------------
    ("u2pl-rank-window-inclusive", "pixcon/core/u2pl.py",
     "(rank >= low_rank) & (rank < high_rank))",
     "(rank >= low_rank) & (rank <= high_rank))", U2PL,
     "an unlabelled pixel's negative classes include rank high_rank itself"),
    ("u2pl-negatives-own-class-labelled", "pixcon/core/u2pl.py",
     "(rank < low_rank) & not_c,",
     "(rank < low_rank),", U2PL,
     "a labelled pixel is a negative of its own class"),
    ("u2pl-anchor-threshold-ge", "pixcon/core/u2pl.py",
     "anchors = low_valid & (prob > anchor_threshold)",
     "anchors = low_valid & (prob >= anchor_threshold)", U2PL,
     "anchors at exactly the threshold are kept (the official comparison is strict)"),
    # --- edges: thresholds at equality, index mappings at sizes where rules differ (issue 33) ---
    ("u2pl-negative-threshold-le", "pixcon/core/u2pl.py",
     "negatives = (prob < negative_threshold)",
     "negatives = (prob <= negative_threshold)", EDGES,
     "a class at exactly the negative threshold counts as a negative"),
    ("cac-gamma-inclusive", "pixcon/core/cac.py",
     "        keep = keep & (c_target > pos_threshold)",
     "        keep = keep & (c_target >= pos_threshold)", EDGES,
     "a target at exactly gamma is confident (the official comparison is strict)"),
    ("nearest-scale-float64", "pixcon/core/common.py",
     "    src = torch.floor(dst.to(torch.float32) * scale).to(torch.int64)",
     "    src = torch.floor(dst.to(torch.float64) * (in_size / out_size)).to(torch.int64)", EDGES,
     "the nearest mapping's scale in float64 (ATen rounds it to float32): differs at a few "
     "sizes only"),
    ("ctx-fuse-next-deeper", "pixcon/core/contextrast.py",
     "    fused = [torch.where(deep_present[:, None], w_low * a + w_high * deep, a)\n"
     "             for a in anchors[:-1]]",
     "    fused = [torch.where(present[i + 1][:, None], w_low * a + w_high * anchors[i + 1], a)\n"
     "             for i, a in enumerate(anchors[:-1])]", CTX,
     "each layer fused with the next deeper layer's anchors (the same as the deepest for two)"),
    ("teacher-pseudo-labels-in-eval", "pixcon/train/loop.py",
     "                self.teacher.model.train()\n",
     "                self.teacher.model.eval()\n", TRAIN,
     "the teacher makes pseudo-labels with its running statistics (official: train mode)"),
    ("cac-image-level-max-pool", "pixcon/nn/cac.py",
     "        return self.classifier(enc.mean(dim=(2, 3)))",
     "        return self.classifier(enc.amax(dim=(2, 3)))", CAC,
     "the image-level branch pools by the maximum instead of the paper's global average"),
    ("bane-key-range-too-narrow", "pixcon/ops/contextrast.py",
     "\n    sel = select_lowest(err.reshape(-1), d2.reshape(-1), C, ks, h * h + w * w + 1)",
     "\n    sel = select_lowest(err.reshape(-1), d2.reshape(-1), C, ks, h * h + w)", CTX,
     "BANE's sort key leaves room for distances up to h^2 + w, not the diagonal's h^2 + w^2"),
    ("reco-fused-ignores-relation-temperature", "pixcon/ops/reco.py",
     "    rel_t = temperature if relation_temperature is None else relation_temperature",
     "    rel_t = temperature", ["tests/test_options.py"],
     "the fused ReCo path ignores relation_temperature (the reference honours it)"),
    ("bank-segment-pointer-absent-classes", "pixcon/nn/memory.py",
     "seg_p = torch.where(present, (seg_p + 1) % R, seg_p)",
     "seg_p = (seg_p + 1) % R", CSEG,
     "the segment pointer advances for classes absent from the image"),
    ("bank-one-slot-too-many", "pixcon/nn/memory.py",
     "used = j[None, :] < K[:, None]",
     "used = j[None, :] <= K[:, None]", CSEG,
     "an enqueue writes one pixel slot past the K it counts"),
    # --- banks step by step, adapters, the primitives' options (issue 33, second round) -------
    ("u2pl-queue-slots-without-drop", "pixcon/nn/u2pl.py",
     "slot = self.offsets[:, None] + (self.ptr[:, None] + rank - drop[:, None]) % size",
     "slot = self.offsets[:, None] + (self.ptr[:, None] + rank) % size", U2PL,
     "an overflowing push writes its newest rows from ptr + dropped, not at the pointer"),
    ("cac-bank-views-share-draws", "pixcon/nn/cac.py",
     "counter = torch.arange(r.shape[0], device=r.device) + v * r.shape[0]",
     "counter = torch.arange(r.shape[0], device=r.device)", CAC,
     "the bank's subsample draws the same pixel positions in both views"),
    ("reco-adapter-mask-half", "pixcon/ops/reco.py",
     "    return lab, m != 0",
     "    return lab, m > 0.5", RECO_K,
     "the official mask read as > 0.5 instead of non-zero"),
    ("groups-sample-no-group-reads-last", "pixcon/ops/primitives.py",
     "    return torch.where(ok & (counts[grp] > 0), pix, -1).to(torch.int32)",
     "    return torch.where(counts[grp] > 0, pix, -1).to(torch.int32)",
     ["tests/test_options.py"],
     "a row without a group (-1) samples group 0 in the reference (the kernels give -1)"),
    ("edt-exact-ignores-background", "pixcon/ops/edt.py",
     "        return edt_exact(lab, bg) if squared else edt(lab, bg, False)",
     "        return edt_exact(lab, NO_BACKGROUND) if squared else edt(lab, bg, False)",
     ["tests/test_options.py", "tests/test_edt.py"],
     "the exact (squared) transform of the compiled backends ignores background"),
]


def _copy_tree(dst: Path):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "pixcon").glob("_C*.so")]
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _pytest(tree: Path, tests, timeout: float):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-m", "not slow", *tests]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                           timeout=timeout)
        out = (r.stdout + r.stderr).strip().splitlines()
        return r.returncode, (out[-1] if out else ""), time.time() - t0
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s", time.time() - t0


def main(argv=None):
    from pixcon._cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="./dev mutate", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--only", nargs="+", default=None,
                    help="mutants whose name starts with one of these (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    ap.add_argument("--json", default=str(ROOT / "tools" / "mutants-last.json"),
                    help="where the results go")
    a = ap.parse_args(argv)
    from pixcon.methods import METHODS      # every method has mutants of its own code
    lacking = [m.name for m in METHODS if not any(
        path in (f"pixcon/reference/{m.reference}.py", f"pixcon/core/{m.reference}.py",
                 f"pixcon/ops/{m.op}.py", *(f"pixcon_kernels/{k}.py" for k in m.kernels))
        for _, path, *_ in MUTANTS)]
    if lacking:
        print(f"tools/mutate.py: no mutant of the methods {lacking} (pixcon.methods)",
              file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not a.only or m[0].startswith(tuple(a.only))]
    if a.list:
        for name, path, _, _, tests, why in chosen:
            print(f"{name:36s} {path}: {why} [{' '.join(tests)}]")
        return 0
    if not chosen:
        print(f"no mutant matches {a.only}", file=sys.stderr)
        return 2
    for name, path, old, _, _, _ in chosen:     # every mutant must still apply: fail first
        n = (ROOT / path).read_text().count(old)
        if n != 1:
            print(f"mutant {name}: its original text occurs {n} times in {path} (must be 1); "
                  "update tools/mutate.py", file=sys.stderr)
            return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="pixcon-mutate-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        rc, last, _ = _pytest(tree, sorted({t for m in chosen for t in m[4]}), a.timeout * 3)
        if rc != 0:
            print(f"the unmutated tree fails its tests ({last}); fix that first", file=sys.stderr)
            return 2
        bar = Progress(len(chosen), "mutants")
        for k, (name, path, old, new, tests, why) in enumerate(chosen):
            target = tree / path
            pristine = target.read_text()
            target.write_text(pristine.replace(old, new))
            try:
                rc, last, secs = _pytest(tree, tests, a.timeout)
            finally:
                target.write_text(pristine)
            status = "killed" if rc not in (0, None) else ("SURVIVED" if rc == 0 else "timeout")
            rows.append({"name": name, "file": path, "mistake": why, "status": status,
                         "seconds": round(secs, 1), "tests": tests, "last_line": last})
            bar.update(k + 1, f"{status} {name}")
        bar.close()
    Path(a.json).write_text(json.dumps(rows, indent=1))
    print("\n| mutant | status | s | mistake |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['mistake']} |")
    survived = [r["name"] for r in rows if r["status"] == "SURVIVED"]
    print(f"\n{len(rows)} mutants, {len(rows) - len(survived)} killed, {len(survived)} survived"
          + (": " + ", ".join(survived) if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
