"""The CPU grid: every contrastive loss over a grid of settings and four conditions (1 and 2
threads, idle and with another process keeping a core busy), the CPU default ("native") against
the reference and the official-style baseline. One point says little about an op: the CPU
default must win everywhere on this grid (issue 34), and the tables say where it does.

    python -m benchmarks.grid                    # the small grid (a few minutes)
    python -m benchmarks.grid --grid full        # the committed one (about half an hour)
    python -m benchmarks.grid --grid ci          # seconds (the tests run it)
    python -m benchmarks.grid --only cac --conditions 2-loaded

Each op is swept one axis at a time around a base setting (a star, not a product): for the
tiled losses anchors, bank keys, classes present, D and the label layout (square blocks of one
class, of several sizes), for CAC the anchors, the bank and the share of pixels passing the
confidence threshold; ReCo, Contextrast and U2PL at their CPU settings. Conditions: ``T-idle`` and
``T-loaded`` for T threads; "loaded" starts one busy-looping process (pure Python, bounded by a
deadline, stopped when the condition ends) that holds one of the machine's cores. Times are the
best of ``--reps`` forward+backward steps (more for steps of milliseconds) after one warm-up
step, in one process. Providers
refuse where they would not fit: the reference above its 8192^2-logit limit, the official-style
baselines likewise (they materialise the anchors x keys logits several times).

Writes <out>/<date>-<device>-grid-<grid>.{json,md} and one PNG per op: the CPU default's time
over the best other provider's, per setting and condition (below 1: the default wins).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import benchkit as pb  # noqa: E402
from pixcon._cli import HelpFormatter  # noqa: E402
from pixcon.ops import dense_contrast_loss, directional_contrast_loss  # noqa: E402
from pixcon.ops import pixel_contrast_loss  # noqa: E402
from pixcon.reference.contrastiveseg import DENSE_LIMIT  # noqa: E402

CONDITIONS = ("1-idle", "1-loaded", "2-idle", "2-loaded")
PROVIDERS = ("official-style", "reference", "native")

# ContrastiveSeg: B, D, h, w, classes present, block side, anchors, bank keys (0: in-batch)
CS_BASE = dict(B=4, D=256, h=64, w=128, C=19, block=16, anchors=1024, bank=0)
# CAC: anchors, bank negatives, D, classes, logit scale (sets the share passing gamma = 0.75)
CAC_BASE = dict(n=2000, N=32400, D=128, C=19, scale=8.0)
GRIDS = {
    "ci": {
        "contrastiveseg": [dict(B=2, D=16, h=16, w=16, C=4, block=4, anchors=64, views=8, bank=0),
                           dict(B=2, D=16, h=16, w=16, C=4, block=4, anchors=64, views=8, bank=400)],
        "cac": [dict(n=60, N=500, D=16, C=4, scale=8.0)],
        "dense": [dict(B=1, D=16, h=16, w=16, C=4, block=4)],
        "reco": [], "contextrast": [], "u2pl": [],
    },
    "small": {
        "contrastiveseg": [dict(), dict(anchors=256), dict(anchors=4096), dict(C=2),
                           dict(C=150, block=8), dict(D=128), dict(D=512), dict(block=4),
                           dict(bank=1000), dict(bank=38000), dict(bank=200000)],
        "cac": [dict(), dict(n=500), dict(N=8000), dict(scale=1.0)],
        "dense": [dict(B=1, D=256, h=48, w=64, C=12, block=16)],
        "reco": ["cpu"], "contextrast": ["cpu", "cpu-ade"], "u2pl": ["cpu"],
    },
    "full": {
        "contrastiveseg": [dict(), dict(anchors=256), dict(anchors=4096), dict(anchors=8192),
                           dict(C=2), dict(C=8), dict(C=150, block=8), dict(D=128),
                           dict(D=512), dict(block=4), dict(block=32), dict(B=2, h=96, w=96,
                                                                             C=12),
                           dict(bank=1000), dict(bank=10000), dict(bank=38000),
                           dict(bank=200000), dict(bank=38000, anchors=4096)],
        "cac": [dict(), dict(n=500), dict(n=8100), dict(N=8000), dict(N=129600),
                dict(scale=1.0), dict(scale=3.0), dict(scale=30.0)],
        "dense": [dict(B=1, D=256, h=48, w=64, C=12, block=16),
                  dict(B=2, D=256, h=64, w=64, C=19, block=16)],
        "reco": ["cpu", "voc"], "contextrast": ["cpu", "cpu-d256", "cpu-ade", "hrnet-1"],
        "u2pl": ["cpu", "voc"],
    },
}


# --- inputs ------------------------------------------------------------------------------------
def block_labels(B, h, w, C, block, g):
    """(B, h, w) labels in square blocks of one class each; the classes of a batch are spread
    over its blocks so that every class appears when there are at least C blocks."""
    bh, bw = -(-h // block), -(-w // block)
    n = B * bh * bw
    cls = torch.arange(n) % C
    cls = cls[torch.randperm(n, generator=g)].reshape(B, bh, bw)
    return cls.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w].contiguous()


def cs_inputs(s, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(s["B"], s["D"], s["h"], s["w"], generator=g), dim=1)
    labels = block_labels(s["B"], s["h"], s["w"], s["C"], s["block"], g)
    wrong = torch.rand(labels.shape, generator=g) < 0.3               # 30% mispredicted
    pred = torch.where(wrong, torch.randint(0, s["C"], labels.shape, generator=g), labels)
    bank = None
    if s["bank"]:
        per = -(-s["bank"] // s["C"])
        keys = F.normalize(torch.randn(per * s["C"], s["D"], generator=g), dim=1)
        bank = (keys, torch.arange(s["C"]).repeat_interleave(per))
    return emb.requires_grad_(), labels, pred, bank


def _views(s):
    """max_views such that max_samples anchors can be drawn (n_view = min(M // T, V))."""
    return s.get("views", max(100, s["anchors"] // 8))


def cs_steps(s):
    from baselines import contrastiveseg_official_style
    emb, labels, pred, bank = cs_inputs(s)
    M, V = s["anchors"], _views(s)
    keys = bank[0].shape[0] if bank else M
    steps = {}
    for prov in PROVIDERS:
        if prov != "native" and M * keys > DENSE_LIMIT:
            continue
        if prov == "official-style" and bank is not None and keys < M:
            continue     # the official memory variant masks key column r for anchor r: it
            #              needs at least as many bank keys as anchors (else an index error)
        if prov == "official-style":
            queue = None if bank is None else bank[0].reshape(s["C"], -1, s["D"])

            def loss(queue=queue):
                return contrastiveseg_official_style(emb, labels, pred, max_samples=M,
                                                     max_views=V, queue=queue)
        else:
            def loss(prov=prov):
                return pixel_contrast_loss(emb, labels, pred, max_samples=M, max_views=V,
                                           memory=bank, seed=1, backend=prov, check_values=False)
        steps[prov] = pb.fwd_bwd_step(emb, loss)
    return steps


def cac_inputs(s, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, N, D, C = s["n"], s["N"], s["D"], s["C"]
    f1 = F.normalize(torch.randn(n, D, generator=g), dim=1).requires_grad_()
    f2 = F.normalize(torch.randn(n, D, generator=g), dim=1).requires_grad_()
    l1, l2 = (s["scale"] * torch.randn(n, C, generator=g) for _ in range(2))
    bank = F.normalize(torch.randn(N, D, generator=g), dim=1)
    return f1, f2, l1, l2, bank, torch.randint(0, C, (N,), generator=g)


def gamma_share(l1, l2, threshold=0.75):
    """Share of pixels whose target view passes the confidence threshold (either direction)."""
    c1, c2 = l1.softmax(1).amax(1), l2.softmax(1).amax(1)
    return round(float(((c1 > threshold) | (c2 > threshold)).float().mean()), 2)


def cac_steps(s):
    from baselines import cac_official_style
    f1, f2, l1, l2, bank, lab = cac_inputs(s)
    steps = {}
    for prov in PROVIDERS:
        if prov != "native" and s["n"] * s["N"] > DENSE_LIMIT:
            continue
        if prov == "official-style":
            def loss():
                return cac_official_style(f1, f2, l1, l2, bank, lab)
        else:
            def loss(prov=prov):
                return directional_contrast_loss(f1, f2, l1, l2, bank, lab, backend=prov)
        steps[prov] = pb.fwd_bwd_step((f1, f2), loss)
    return steps


def dense_steps(s):
    emb, labels, _, _ = cs_inputs(dict(s, anchors=0, bank=0))
    n = s["B"] * s["h"] * s["w"]
    steps = {}
    for prov in ("reference", "native"):        # no official code runs the dense mode
        if prov == "reference" and n * n > DENSE_LIMIT:
            continue

        def loss(prov=prov):
            return dense_contrast_loss(emb, labels, backend=prov, check_values=False)
        steps[prov] = pb.fwd_bwd_step(emb, loss)
    return steps


def module_steps(name, size):
    """ReCo / Contextrast / U2PL: their bench module's inputs and losses at one of its sizes."""
    import importlib
    mod = importlib.import_module(f"bench_{name}")
    cpu = torch.device("cpu")
    steps = {}
    if name == "u2pl":                         # full queues; each step pushes first
        inputs = mod.make_inputs(size, cpu)
        return {prov: mod.make_step(prov, inputs, size)[1] for prov in PROVIDERS}
    if name == "reco":
        from pixcon.synthetic import reco_batch
        B, D, h, w, C, presents, Q, N = mod.SIZES[size]
        emb, labels, probs = reco_batch(B, D, h, w, num_classes=C, present=presents[-1],
                                        device=cpu, seed=presents[-1])
        emb.requires_grad_()
        for prov in PROVIDERS:
            steps[prov] = mod.make_step(prov, emb, labels, probs, Q, N)[1]
    else:
        from pixcon.ops import pixel_anchor_loss
        B, D, layers, C = mod.SIZES[size]
        embs, labels, logits = mod.make_inputs(B, D, layers, C, cpu)
        for prov in ("reference", "native"):
            def loss(prov=prov):
                return pixel_anchor_loss(embs, labels, logits, backend=prov,
                                         layer_weights=(0.1, 0.3, 0.7, 1.0)[-len(embs):],
                                         check_values=False)
            steps[prov] = pb.fwd_bwd_step(embs, loss)
    return steps


def cases(grid, only=None):
    """[(op, label, setting dict, steps factory)] of a grid."""
    out = []
    g = GRIDS[grid]
    for name, items in g.items():
        if only and name not in only:
            continue
        for item in items:
            if name == "contrastiveseg":
                s = dict(CS_BASE, **item) if grid != "ci" else item
                label = _label(item, s, grid)
                out.append(("pixel_contrast_loss", label, s, lambda s=s: cs_steps(s)))
            elif name == "cac":
                s = dict(CAC_BASE, **item) if grid != "ci" else item
                label = _label(item, s, grid)
                out.append(("directional_contrast_loss", label, s, lambda s=s: cac_steps(s)))
            elif name == "dense":
                out.append(("dense_contrast_loss", f"{item['B'] * item['h'] * item['w']} px",
                            item, lambda s=item: dense_steps(s)))
            else:
                op = {"reco": "reco_loss", "u2pl": "u2pl_loss"}.get(name, "pixel_anchor_loss")
                out.append((op, item, {"size": item}, lambda n=name, s=item: module_steps(n, s)))
    return out


def _label(item, s, grid):
    if grid == "ci":
        return "tiny" + (" + bank" if s.get("bank") else "")
    if not item:
        return "base"
    return ", ".join(f"{k}={v}" for k, v in item.items())


# --- conditions --------------------------------------------------------------------------------
class BusyCore:
    """One busy-looping process (pure Python, its own deadline as a bound) for as long as the
    block lasts: the 'loaded' condition."""

    def __init__(self, seconds=3600):
        self.seconds = seconds

    def __enter__(self):
        code = f"import time\nend = time.time() + {self.seconds}\nwhile time.time() < end:\n    pass\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(0.3)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def best_ms(step, reps):
    """Best of at least ``reps`` timed steps after a warm-up step; short steps are repeated
    more (up to 30, about 0.3 s in all), so millisecond cases are not one scheduler tick."""
    t0 = time.perf_counter()
    step()                                                         # warm-up
    warm = time.perf_counter() - t0
    ts = []
    for _ in range(max(reps, min(30, int(0.3 / max(warm, 1e-4))))):
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
    return min(ts)


def run(grid="small", conditions=CONDITIONS, reps=2, only=None, progress=True):
    from pixcon.progress import Progress
    todo = cases(grid, only)
    meta = pb.metadata(torch.device("cpu"))
    old = torch.get_num_threads()
    rows = []
    bar = Progress(len(todo) * len(conditions), f"grid {grid}", progress)
    k = 0
    try:
        for cond in conditions:
            threads, load = int(cond.split("-")[0]), cond.split("-")[1]
            torch.set_num_threads(threads)
            ctx = BusyCore() if load == "loaded" else contextlib.nullcontext()
            with ctx:
                for op, label, setting, make in todo:
                    bar.update(k, f"{cond} {op} {label}")
                    k += 1
                    steps = make()
                    for prov, step in steps.items():
                        rows.append({"op": op, "case": label, "setting": _jsonable(setting),
                                     "condition": cond, "threads": threads, "load": load,
                                     "provider": prov, "ms": round(best_ms(step, reps), 2),
                                     **{k2: v for k2, v in meta.items() if k2 != "device"},
                                     "device": _cpu_name()})
                    if op == "directional_contrast_loss":
                        rows[-1]["gamma_share"] = gamma_share(*cac_inputs(setting)[2:4])
    finally:
        torch.set_num_threads(old)
        bar.update(len(todo) * len(conditions), "done")
        bar.close()
    return rows


def _cpu_name():
    import platform
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} cores"


def _jsonable(s):
    return {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in s.items()}


# --- reports -----------------------------------------------------------------------------------
def table(rows):
    """{(op, case): {condition: {provider: ms}}} in the rows' order."""
    t = {}
    for r in rows:
        t.setdefault((r["op"], r["case"]), {}).setdefault(r["condition"], {})[r["provider"]] = r["ms"]
    return t


def ratios(rows):
    """[(op, case, condition, native ms / best other ms, the best other's name)]."""
    out = []
    for (op, case), conds in table(rows).items():
        for cond, provs in conds.items():
            others = {p: ms for p, ms in provs.items() if p != "native"}
            if "native" not in provs or not others:
                continue
            best = min(others, key=others.get)
            out.append((op, case, cond, provs["native"] / others[best], best))
    return out


def speedups(rows):
    """{op: {provider: (min, max) of provider ms / native ms over every cell and condition}}
    and the cell count per op."""
    out, cells = {}, {}
    for (op, case), conds in table(rows).items():
        for cond, provs in conds.items():
            if "native" not in provs:
                continue
            cells[op] = cells.get(op, 0) + 1
            for prov, ms in provs.items():
                if prov != "native":
                    lo, hi = out.setdefault(op, {}).get(prov, (float("inf"), 0.0))
                    q = ms / provs["native"]
                    out[op][prov] = (min(lo, q), max(hi, q))
    return out, cells


# The threads criteria of issue 32, on the CPU default's own times: with the other core busy, two
# threads at most this much slower than one; idle, two at least this much faster than one where
# the work parallelises (a cell whose one-thread idle step takes PARALLEL_MS or more: below it
# the kernels' own rule runs most passes on one thread).
LOADED_MAX, IDLE_MIN, PARALLEL_MS = 1.5, 1.6, 100.0


def thread_ratios(rows):
    """[(op, case, 1-idle / 2-idle, 2-loaded / 1-loaded, 1-idle ms)] of the native provider, for
    the cells measured in all four conditions."""
    out = []
    for (op, case), conds in table(rows).items():
        t = {c: conds.get(c, {}).get("native") for c in CONDITIONS}
        if None in t.values():
            continue
        out.append((op, case, t["1-idle"] / t["2-idle"], t["2-loaded"] / t["1-loaded"],
                    t["1-idle"]))
    return out


def threads_markdown(rows) -> str:
    """The 1- vs 2-thread ratios per cell and how many meet the criteria."""
    r = thread_ratios(rows)
    if not r:
        return ""
    par = [x for x in r if x[4] >= PARALLEL_MS]
    ok_loaded = [x for x in r if x[3] <= LOADED_MAX]
    ok_idle = [x for x in par if x[2] >= IDLE_MIN]
    lines = ["## Threads: two against one, idle and loaded", "",
             f"Loaded (another process holds a core): 2 threads at most {LOADED_MAX}x slower "
             f"than 1 in {len(ok_loaded)} of {len(r)} cells (worst "
             f"{max(x[3] for x in r):.2f}x). Idle: 2 threads at least {IDLE_MIN}x faster than 1 "
             f"in {len(ok_idle)} of the {len(par)} cells whose one-thread step takes "
             f"{PARALLEL_MS:.0f} ms or more" + (f" (least {min(x[2] for x in par):.2f}x)"
                                               if par else "") + ". The CPU default only.", "",
             "| op | case | 1-idle ms | idle: 1 / 2 threads | loaded: 2 / 1 threads |",
             "|---|---|---|---|---|"]
    for op, case, idle, loaded, ms in r:
        flag_i = "" if ms < PARALLEL_MS or idle >= IDLE_MIN else " **"
        flag_l = "" if loaded <= LOADED_MAX else " **"
        lines.append(f"| {op} | {case} | {_ms(ms)} | {idle:.2f}x{flag_i} | {loaded:.2f}x{flag_l} |")
    lines += ["", "(** misses its criterion.)", ""]
    return "\n".join(lines)


def summary_table(rows) -> str:
    """One line per op: the CPU default's speed-up over each other provider, smallest and
    largest over the grid's cells and conditions."""
    sp, cells = speedups(rows)
    lines = ["| op | cells (settings x conditions) | speed-up over reference | speed-up over "
             "official-style |", "|---|---|---|---|"]
    for op, n in cells.items():
        cols = []
        for prov in ("reference", "official-style"):
            lo, hi = sp.get(op, {}).get(prov, (None, None))
            cols.append("-" if lo is None else f"{lo:.1f}x - {hi:.1f}x")
        lines.append(f"| {op} | {n} | {cols[0]} | {cols[1]} |")
    return "\n".join(lines) + "\n"


def _ms(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def markdown(rows, grid) -> str:
    m = rows[0]
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    lines = [f"# CPU grid `{grid}`: {m['device']} | torch {m['torch']} | commit {m['commit']} | "
             f"{m['date']}", "",
             "Forward+backward ms, best of the repetitions after a warm-up; conditions are "
             "threads-load ('loaded': another process keeps one core busy). Each cell: native "
             "(the CPU default) / reference / official-style, '-' where a provider refuses "
             "(its logits over 8192^2) or has no such mode.", ""]
    r = ratios(rows)
    if r:
        worst = max(r, key=lambda x: x[3])
        lose = [x for x in r if x[3] >= 1.0]
        lines += [f"**Native against the best other provider: {len(r) - len(lose)} of {len(r)} "
                  f"cells won; worst ratio {worst[3]:.2f} ({worst[0]}, {worst[1]}, {worst[2]}, "
                  f"against {worst[4]}).**", ""]
        if lose:
            lines += ["Cells where it does not win:", ""]
            lines += [f"- {op} {case} {cond}: {q:.2f} x {other}" for op, case, cond, q, other
                      in lose]
            lines.append("")
    lines += ["Speed-up of the CPU default, smallest and largest over every setting and "
              "condition where the other provider runs:", "", summary_table(rows)]
    lines += [threads_markdown(rows)]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [f"## {op}", "", "| case | " + " | ".join(conds) + " |",
                  "|---|" + "---|" * len(conds)]
        for (o, case), byc in table(rows).items():
            if o != op:
                continue
            cells = []
            for c in conds:
                p = byc.get(c, {})
                cells.append(" / ".join("-" if p.get(x) is None else _ms(p[x])
                                        for x in PROVIDERS[::-1]))
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, stem):
    """One PNG per op: native / best other provider per case, a marker per condition."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    r = ratios(rows)
    paths = []
    for op in dict.fromkeys(x[0] for x in r):
        pts = [x for x in r if x[0] == op]
        case_names = list(dict.fromkeys(x[1] for x in pts))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(case_names) + 2), 4.4), dpi=100)
        for j, cond in enumerate(dict.fromkeys(x[2] for x in pts)):
            xs = [case_names.index(x[1]) + 0.12 * (j - 1.5) for x in pts if x[2] == cond]
            ys = [x[3] for x in pts if x[2] == cond]
            ax.scatter(xs, ys, label=cond, marker="os^D"[j % 4], s=28)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        import matplotlib.ticker as ticker
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.set_xticks(range(len(case_names)))
        ax.set_xticklabels(case_names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("native time / best other provider")
        ax.set_title(f"{op}: the CPU default against the reference and official-style\n"
                     f"below 1 = the default wins ({rows[0]['date']})", fontsize=10)
        ax.legend(fontsize=8, title="threads-load", title_fontsize=8)
        fig.tight_layout()
        path = f"{stem}-{op}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.grid", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--grid", choices=list(GRIDS), default="small",
                    help="ci (seconds), small (minutes), full (the committed results)")
    ap.add_argument("--only", nargs="+", choices=list(GRIDS["full"]), default=None,
                    help="these ops only")
    ap.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS),
                    help="threads-load conditions")
    ap.add_argument("--reps", type=int, default=2, help="timed steps per cell (the best counts)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    rows = run(a.grid, a.conditions, a.reps, a.only, progress=not a.quiet)
    md = markdown(rows, a.grid)
    name = f"grid-{a.grid}" + ("".join(f"-{n}" for n in a.only) if a.only else "")
    stem = pb.write_results(rows, a.out, name, md)
    paths = [stem + ".json", stem + ".md"] + plot(rows, stem)
    print(md)
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
