"""The benchmark suite itself runs (tiny size; the fused provider under the interpreter on CPU)
and writes its JSON and Markdown; pytest-benchmark drives one fused step."""
import json
import os

import pytest
import torch

import pixcon

from .conftest import bench_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.interpret
def test_bench_reco_tiny_writes_results(tmp_path):
    mod = bench_module()
    rows = mod.run("tiny", device="cpu", reps=1, out=str(tmp_path), verbose=False)
    assert [r["provider"] for r in rows] == ["official-style", "reference", "native", "fused"]
    by = {r["provider"]: r for r in rows}
    assert by["fused"]["loss"] == pytest.approx(by["reference"]["loss"], rel=1e-5)
    assert by["native"]["loss"] == pytest.approx(by["reference"]["loss"], rel=1e-5)
    assert all(r["fwd_bwd_ms"] > 0 and r["saved_mib"] >= 0 for r in rows)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    data = json.load(open(tmp_path / files[0]))
    assert data[0]["torch"] == torch.__version__ and data[0]["commit"]
    md = open(tmp_path / files[1]).read()
    assert "| fused |" in md and "| official-style |" in md


@pytest.mark.interpret
def test_fused_step_under_pytest_benchmark(benchmark):
    mod = bench_module()
    from pixcon.synthetic import reco_batch
    emb, labels, probs = reco_batch(2, 8, 9, 9, num_classes=5, present=4)
    emb.requires_grad_()
    _, step = mod.make_step("fused", emb, labels, probs, 4, 8)
    loss = benchmark.pedantic(step, rounds=1, iterations=1)
    assert loss.item() > 0 and emb.grad is not None


def test_bench_edt_tiny_writes_results(tmp_path):
    mod = bench_module("bench_edt")
    rows = mod.run("tiny", device="cpu", reps=1, out=str(tmp_path), verbose=False)
    names = [r["provider"] for r in rows]
    assert names[0].startswith("scipy") and any("C++" in n for n in names)
    assert all(r["ms"] > 0 and r["speedup_vs_scipy"] > 0 for r in rows)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]


@pytest.mark.interpret
def test_bench_contextrast_tiny_writes_results(tmp_path):
    mod = bench_module("bench_contextrast")
    rows = mod.run("tiny", device="cpu", reps=1, out=str(tmp_path), verbose=False)
    by = {r["provider"]: r for r in rows}
    assert set(by) == ({"reference", "native", "fused"} if pixcon.HAS_C else {"reference", "fused"})
    for p in set(by) - {"reference"}:
        assert by[p]["loss"] == pytest.approx(by["reference"]["loss"], rel=1e-5), p
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]


def test_contrastiveseg_official_style_baseline_has_the_method_value():
    """With one embedding per class (so that which pixels are sampled does not matter) the
    official-style baseline gives the reference's loss: it computes the method, at its cost."""
    import torch.nn.functional as F

    from pixcon.reference import contrastiveseg as ref
    base = bench_module("baselines")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 10, 12), generator=g)
    labels[0, :2] = 255
    centroids = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    emb = centroids[labels.clamp(max=4)].permute(0, 3, 1, 2)
    pred = torch.where(torch.rand(2, 10, 12, generator=g) < 0.7, labels.clamp(max=3), 0)
    want = ref.pixel_contrast_loss(emb, labels, pred, max_samples=30, max_views=5, seed=0)
    got = base.contrastiveseg_official_style(emb, labels, pred, max_samples=30, max_views=5)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.interpret
def test_bench_contrastiveseg_tiny_writes_results(tmp_path):
    mod = bench_module("bench_contrastiveseg")
    rows = mod.run("tiny", device="cpu", reps=1, out=str(tmp_path), verbose=False)
    assert [r["provider"] for r in rows] == list(mod.PROVIDERS) * 2
    for bank in ("none", "4x20"):
        by = {r["provider"]: r for r in rows if r["bank"] == bank}
        assert by["native"]["loss"] == pytest.approx(by["reference"]["loss"], rel=1e-5)
        assert by["fused"]["loss"] == pytest.approx(by["reference"]["loss"], rel=1e-5)
    assert all(r["fwd_bwd_ms"] > 0 and r["peak_extra_mib"] is not None for r in rows)
    dense = mod.run_dense([300], device="cpu", out=str(tmp_path), verbose=False, D=8, C=4)
    assert [r["provider"] for r in dense] == ["native", "fused"]
    assert dense[0]["loss"] == pytest.approx(dense[1]["loss"], rel=1e-5)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".md", ".md"]


def test_cac_official_style_baseline_is_the_official_arithmetic():
    """The chunked, checkpointed baseline equals the reference with official_numerics (one chunk
    of 8000 and several of 300), and its gradients too."""
    import torch.nn.functional as F

    from pixcon.reference import cac as ref
    base = bench_module("baselines")
    g = torch.Generator().manual_seed(1)
    f1 = F.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=1)
    f2 = F.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=1)
    l1, l2 = 3 * torch.randn(30, 4, generator=g), 3 * torch.randn(30, 4, generator=g)
    bank = F.normalize(torch.randn(1000, 8, generator=g, dtype=torch.float64), dim=1)
    lab = torch.randint(0, 4, (1000,), generator=g)
    want_8000 = None
    for chunk in (8000, 300):
        a, b = f1.clone().requires_grad_(), f2.clone().requires_grad_()
        want = ref.directional_contrast_loss(a, b, l1, l2, bank, lab, pos_threshold=0.5,
                                             official_numerics=True) if chunk == 8000 else None
        got = base.cac_official_style(a, b, l1, l2, bank, lab, pos_threshold=0.5, chunk=chunk)
        if want is not None:
            assert got.item() == pytest.approx(want.item(), rel=1e-12)
            ga = torch.autograd.grad(got, [a, b])
            gw = torch.autograd.grad(want, [a, b])
            assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(ga, gw))
        else:     # smaller chunks only change the stabiliser: the value within eps effects
            assert got.item() == pytest.approx(want_8000, rel=1e-3)
        want_8000 = got.item()


@pytest.mark.interpret
def test_bench_cac_tiny_writes_results(tmp_path):
    mod = bench_module("bench_cac")
    rows = mod.run("tiny", device="cpu", reps=1, out=str(tmp_path), verbose=False)
    by = {r["provider"]: r for r in rows}
    assert list(by) == list(mod.PROVIDERS)
    assert by["native"]["loss"] == pytest.approx(by["reference"]["loss"], rel=1e-5)
    assert by["fused"]["loss"] == pytest.approx(by["reference"]["loss"], rel=1e-5)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]


def test_official_code_loaded_from_a_checkout(tmp_path):
    """--official reco=PATH loads compute_reco_loss from the user's checkout at run time and
    calls it in the official form (here a stand-in checkout that records what it got)."""
    (tmp_path / "helper.py").write_text("SCALE = 2.0\n")
    (tmp_path / "module_list.py").write_text(
        "import torch\nfrom helper import SCALE\n"
        "def compute_reco_loss(rep, label, mask, prob, strong_threshold, temp, num_queries,"
        " num_negatives):\n"
        "    assert label.shape == prob.shape and mask.shape[1] == 1\n"
        "    return SCALE * (rep.sum() * 0 + label.sum() + num_queries + num_negatives"
        " + strong_threshold + temp)\n")
    base = bench_module("baselines")
    method, fn = base.load_official(f"reco={tmp_path}")
    labels = torch.tensor([[[0, 1], [255, 2]]])
    probs = torch.full((1, 3, 2, 2), 1 / 3)
    out = fn(torch.zeros(1, 4, 2, 2), labels, probs, num_queries=5, num_negatives=7)
    assert method == "reco" and out.item() == pytest.approx(2.0 * (3 + 5 + 7 + 0.97 + 0.5))
    with pytest.raises(FileNotFoundError, match="module_list.py"):
        base.load_official(f"reco={tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="METHOD=PATH"):
        base.load_official("edt")


def test_suite_ci_mode_runs_every_module_and_writes_json_markdown_plots(tmp_path):
    """python -m benchmarks --mode ci: every module, one JSON with the tags, one Markdown table,
    a time, a memory and a resident-set plot per op (EDT: time only, it reports no memory)."""
    suite = bench_module("suite")
    assert suite.main(["--mode", "ci", "--out", str(tmp_path), "--quiet"]) == 0
    js, = tmp_path.glob("*-suite-ci.json")
    rows = json.loads(js.read_text())
    assert {r["module"] for r in rows} == set(suite.SUITE)
    for r in rows:
        for tag in ("device", "threads", "torch", "triton", "commit", "date", "x", "time_ms"):
            assert r[tag] is not None, (r["module"], tag)
    ops = {r["op"] for r in rows}
    pngs = {p.name for p in tmp_path.glob("*.png")}
    for op in ops:
        assert any(n.endswith(f"-{op}-time.png") for n in pngs), op
    assert len(pngs) == 3 * len(ops) - 2                     # EDT has no memory columns
    md, = tmp_path.glob("*-suite-ci.md")
    assert all(op in md.read_text() for op in ops)
    assert suite.LOSS_NOTE.strip() in md.read_text()    # official-style losses differ: said
    rates = rows[0]["cpu_roofline"]                      # this CPU's roofline, every row
    assert rates["threads"] == rows[0]["threads"]
    assert all(rates[k] > 0 for k in ("sgemm_gflops", "copy_gbs", "gather_gbs"))
    floored = [r for r in rows if r.get("cpu_floor_ms") is not None]
    assert {r["module"] for r in floored} == set(suite.SUITE)
    for r in floored:
        assert r["x_cpu_floor"] == round(r["time_ms"] / r["cpu_floor_ms"], 1)
    assert "This CPU's roofline" in md.read_text()
    from PIL import Image
    assert Image.open(next(tmp_path.glob("*.png"))).size == (760, 460)     # a real PNG


def test_resident_set_rise_counts_what_a_call_touches():
    """pixcon.measure.rss_peak_extra_bytes sees a 64 MiB buffer written and freed inside the call
    (Linux /proc; skipped elsewhere), and the live-tensor count agrees."""
    import pixcon.measure as pb
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs")

    def fn():
        x = torch.empty(16 * 2**20, dtype=torch.float32)
        x.fill_(1.0)
        return float(x[-1])

    rss = pb.rss_peak_extra_bytes(fn)
    assert 60 * 2**20 < rss < 80 * 2**20
    assert pb.peak_extra_bytes(fn, torch.device("cpu")) == 64 * 2**20
    assert 60 < pb.last_rss_mib() < 80


def test_suite_fresh_process_rows(tmp_path):
    """--fresh runs each provider in a process of its own and brings the rows back."""
    suite = bench_module("suite")
    rows = suite.run_module_fresh("reco", "tiny", device="cpu", reps=1)
    assert rows and all(r["fresh_process"] and r["op"] == "reco_loss" for r in rows)
    assert {r["provider"] for r in rows} >= {"official-style", "reference"}
    if os.access("/proc/self/clear_refs", os.W_OK):
        assert all(r["peak_rss_mib"] is not None for r in rows)
    assert "each provider in a process of its own" in suite.markdown(rows)


@pytest.mark.parametrize("peer", ["scipy_batch", "opencv_batch", "edt_batch"])
@pytest.mark.parametrize("C", [0, 4])
def test_edt_peers_compute_what_pixcon_computes(peer, C):
    """The benchmark's peers are the same transform (exact Euclidean, border not a boundary,
    per class for multi-label maps): equal to pixcon's on the tiny maps; a peer that is not
    installed is skipped."""
    pytest.importorskip({"scipy_batch": "scipy", "opencv_batch": "cv2", "edt_batch": "edt"}[peer])
    mod = bench_module("bench_edt")
    from pixcon.ops import distance_transform
    maps = mod.make_maps(2, 64, 96, C) if C == 0 else mod.make_maps(2, 16, 32, C)
    kw = dict(labels=True, background=-1) if C else {}
    ours = distance_transform(maps, backend="reference", **kw).double().numpy()
    theirs = getattr(mod, peer)(maps, C)
    tol = 1e-4 if peer == "opencv_batch" else 1e-6    # OpenCV returns float32
    assert abs(theirs - ours).max() < tol * max(1.0, ours.max())


def test_edt_against_peers_by_hand():
    """bench_edt's comparison: per (shape, classes), pixcon's row at each thread count against
    the fastest OpenCV / edt-package row at the same count, and SciPy's; a binary and a
    multi-label map of one shape are kept apart."""
    mod = bench_module("bench_edt")

    def row(C, provider, ms, threads=1):        # "threads": the suite's tag, not read
        return {"shape": [8, 512, 512], "classes": C, "provider": provider, "ms": ms,
                "threads": 7}
    rows = [row(0, "scipy (CPU, per image/class)", 80.0),
            row(0, "opencv exact (CPU, per image/class), 1 thread", 40.0),
            row(0, "opencv exact (CPU, per image/class), 2 threads", 15.0, 2),
            row(0, "edt package (CPU, per image), 1 thread", 30.0),
            row(0, "pixcon C++ (1 thread)", 10.0),
            row(0, "pixcon C++ (all threads)", 10.0, 2),
            row(19, "scipy (CPU, per image/class)", 1500.0),
            row(19, "edt package (CPU, per image), 1 thread", 70.0),
            row(19, "pixcon C++ (1 thread)", 20.0)]
    got = mod.against_peers(rows)
    assert [(g[1], g[2], g[4].split(" ")[0], g[5], g[6]) for g in got] == [
        (0, 1, "edt", 3.0, 8.0), (0, 2, "opencv", 1.5, 8.0), (19, 1, "edt", 3.5, 75.0)]


def test_thread_study_tiny_runs_every_op(tmp_path):
    """benchmarks/bench_threads.py --tiny: every op's native provider at 1 and 2 threads,
    interleaved; one row per case with both medians (no timing is asserted)."""
    mod = bench_module("bench_threads")
    assert mod.main(["--tiny", "--rounds", "1", "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("*-threads.json")).read_text())
    assert {r["op"] for r in rows} == {"reco_loss", "pixel_contrast_loss",
                                      "directional_contrast_loss", "pixel_anchor_loss",
                                      "distance_transform"}
    assert all(set(r["ms"]) == {"1", "2"} and r["ratio_to_1"]["1"] == 1.0 for r in rows)


def test_floor_estimates_by_hand():
    """benchmarks/floor.py (the cost model's "must") at ReCo's VOC setting with 10 classes: emb
    read once for the class sums and its gradient written once (2 x 131,220 x 256 x 4 B), the
    labels and own-class probabilities (x 12 B), 10 x 256 queries x 513 gathered rows x 256 x
    4 B, and each query's D-vector written and read (2 x 2560 x 256 x 4 B): 1620.4 MB,
    memory-bound at 3.35 TB/s = 0.484 ms; the class sums (2 P D) and 6 x 2560 x 513 x 256 +
    2 x 2560 x 256 FLOPs."""
    floor = bench_module("floor")
    row = {"op": "reco_loss", "shape": [20, 256, 81, 81], "num_classes": 21,
           "present_classes": 10, "num_queries": 256, "num_negatives": 512}
    est = floor.estimate(row)
    P, M = 20 * 81 * 81, 10 * 256
    nbytes = 2 * P * 256 * 4 + 12 * P + M * 513 * 256 * 4 + 2 * M * 256 * 4
    assert est["floor_mb"] == round(nbytes / 1e6, 1) == 1620.4
    flops = 2 * P * 256 + 6 * M * 513 * 256 + 2 * M * 256
    assert est["floor_gflop"] == round(flops / 1e9, 2)
    assert est["floor_bound"] == "memory"
    assert est["floor_ms_est"] == pytest.approx(1e3 * nbytes / 3.35e12, rel=1e-3)
    assert est["floor_ms_est"] < est["model_ms_est"]
    md = floor.markdown(floor.paper_cases())
    for op in ("reco_loss", "pixel_contrast_loss", "dense_contrast_loss",
               "directional_contrast_loss", "pixel_anchor_loss", "distance_transform"):
        assert f"| {op} |" in md
    assert "not measured" in md


def test_cpu_floor_by_hand():
    """benchmarks/roofline.py charges the floor's bytes at the copy rate and its FLOPs at the
    sgemm rate: ReCo's VOC row above (1620.4 MB; 0.67 GFLOP + 2560 x 513 x 256 x 6) at 10 GB/s
    and 100 GFLOP/s is memory-bound at 162 ms; at 1 GFLOP/s compute-bound; the time over it."""
    roofline = bench_module("roofline")
    row = {"op": "reco_loss", "shape": [20, 256, 81, 81], "num_classes": 21,
           "present_classes": 10, "num_queries": 256, "num_negatives": 512, "time_ms": 324.08}
    P, M = 20 * 81 * 81, 10 * 256
    nbytes = 2 * P * 256 * 4 + 12 * P + M * 513 * 256 * 4 + 2 * M * 256 * 4
    flops = 2 * P * 256 + 6 * M * 513 * 256 + 2 * M * 256
    fast = roofline.floor(row, {"threads": 1, "sgemm_gflops": 100.0, "copy_gbs": 10.0,
                                "gather_gbs": 2.0})
    assert fast["cpu_floor_ms"] == pytest.approx(1e3 * nbytes / 10e9, rel=5e-4)   # 4 digits
    assert fast["cpu_floor_bound"] == "memory" and fast["x_cpu_floor"] == 2.0
    slow = roofline.floor(row, {"threads": 1, "sgemm_gflops": 1.0, "copy_gbs": 10.0,
                                "gather_gbs": 2.0})
    assert slow["cpu_floor_bound"] == "compute"
    assert slow["cpu_floor_ms"] == pytest.approx(1e3 * flops / 1e9, rel=5e-4)
    assert roofline.floor({"op": "unknown", "time_ms": 1.0}, {}) == {}
    assert "x_cpu_blas_floor" not in fast                        # ReCo: no class-sized side


def test_gather_floor_by_hand():
    """ReCo's negatives are random rows: the gather floor charges the 2560 x 513 rows of 1 KB
    the step gathers at the random-row read rate (given: 5 GB/s) and its other bytes at the
    copy rate (10 GB/s); without a measured read rate, or for an op with no gathered rows, no
    such column."""
    roofline = bench_module("roofline")
    row = {"op": "reco_loss", "shape": [20, 256, 81, 81], "num_classes": 21,
           "present_classes": 10, "num_queries": 256, "num_negatives": 512, "time_ms": 324.08}
    P, M = 20 * 81 * 81, 10 * 256
    gathered = M * 513 * 256 * 4
    other = 2 * P * 256 * 4 + 12 * P + 2 * M * 256 * 4
    rates = {"threads": 1, "sgemm_gflops": 100.0, "copy_gbs": 10.0, "gather_gbs": 2.0,
             "row_read_gbs": 5.0}
    got = roofline.floor(row, rates)
    want = 1e3 * (other / 10e9 + gathered / 5e9)
    assert got["cpu_gather_floor_ms"] == pytest.approx(want, rel=5e-4)
    assert got["gathered_mb"] == round(gathered / 1e6, 1)
    assert got["x_cpu_gather_floor"] == round(324.08 / got["cpu_gather_floor_ms"], 1)
    assert got["cpu_gather_floor_ms"] > got["cpu_floor_ms"]
    assert "x_cpu_gather_floor" not in roofline.floor(row, {**rates, "row_read_gbs": None})
    cac = {"op": "directional_contrast_loss", "anchors": 8100, "negatives": 129600, "dim": 128,
           "time_ms": 1.0}
    assert "x_cpu_gather_floor" not in roofline.floor(cac, rates)


def test_class_sized_blas_floor_by_hand():
    """Contextrast's contractions have a class-sized side: its second floor charges the same
    FLOPs at the class-sized sgemm rate (given here: 25 GFLOP/s where square sgemm is 100), so at
    a compute-bound setting it is 4x the first; the rate is measured once per class count and
    kept in the rates."""
    roofline = bench_module("roofline")
    row = {"op": "pixel_anchor_loss", "batch": 8, "dim": 256, "classes": 19,
           "layers": [[128, 256], [64, 128], [32, 64], [16, 32]], "time_ms": 500.0}
    rates = {"threads": 1, "sgemm_gflops": 100.0, "copy_gbs": 1000.0, "gather_gbs": 2.0,
             "class_sgemm": {"19": 25.0}}
    got = roofline.floor(row, rates)
    assert got["cpu_floor_bound"] == "compute" and got["cpu_blas_gflops"] == 25.0
    assert got["cpu_blas_floor_ms"] == pytest.approx(4 * got["cpu_floor_ms"], rel=1e-3)
    assert got["x_cpu_blas_floor"] == round(500.0 / got["cpu_blas_floor_ms"], 1)
    small = {"threads": 1, "sgemm_gflops": 100.0, "copy_gbs": 10.0, "gather_gbs": 2.0,
             "size": "small"}
    roofline.floor({**row, "classes": 5}, small)                # measured at 5 classes, kept
    assert set(small["class_sgemm"]) == {"5"} and small["class_sgemm"]["5"] > 0


def test_contrastiveseg_bench_skips_the_reference_above_its_limit(monkeypatch):
    """At the Cityscapes setting with the bank the plain reference would build 912 x 190,000
    logits and refuses; the benchmark leaves that provider out instead of failing the suite."""
    mod = bench_module("bench_contrastiveseg")
    monkeypatch.setattr(mod, "DENSE_LIMIT", 0)
    rows = mod.run("tiny", providers=("reference", "native"), reps=1, verbose=False)
    assert {r["provider"] for r in rows} == {"native"}


def test_grid_ci_runs_every_case_in_every_condition(tmp_path):
    """benchmarks/grid.py --grid ci: every case in each condition asked for, the loaded one with
    its busy process started and stopped; the report counts the cells and draws one PNG per op
    (no timing is asserted)."""
    mod = bench_module("grid")
    assert mod.main(["--grid", "ci", "--conditions", "1-idle", "2-loaded", "--reps", "1",
                     "--quiet", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("*-grid-ci.json")).read_text())
    cells = {(r["op"], r["case"], r["condition"]) for r in rows}
    ops = {"pixel_contrast_loss", "directional_contrast_loss", "dense_contrast_loss"}
    assert {c[0] for c in cells} == ops
    assert {c[2] for c in cells} == {"1-idle", "2-loaded"}
    assert len(cells) == 2 * len(mod.cases("ci"))
    assert all(r["ms"] > 0 for r in rows)
    assert {r["provider"] for r in rows if r["op"] == "dense_contrast_loss"} == {"reference",
                                                                               "native"}
    md = next(tmp_path.glob("*-grid-ci.md")).read_text()
    assert f"of {len(mod.ratios(rows))} cells won" in md
    assert len(list(tmp_path.glob("*-grid-ci-*.png"))) == (3 if _has_matplotlib() else 0)


def test_grid_thread_ratios_by_hand():
    """The threads section: 1-idle / 2-idle and 2-loaded / 1-loaded of the native times only,
    the idle criterion counted over the cells of 100 ms or more, a cell missing a condition left
    out, every miss flagged."""
    mod = bench_module("grid")
    times = {"a": (200.0, 200.0, 100.0, 400.0), "b": (50.0, 50.0, 40.0, 60.0),
             "c": (300.0, 300.0, 250.0, 330.0)}     # in CONDITIONS order
    rows = [{"op": "x", "case": case, "condition": cond, "provider": "native", "ms": ms}
            for case, ts in times.items() for cond, ms in zip(mod.CONDITIONS, ts)]
    rows += [{"op": "x", "case": c, "condition": cond, "provider": "reference", "ms": 1.0}
             for c in "ab" for cond in mod.CONDITIONS]
    rows += [{"op": "x", "case": "d", "condition": "1-idle", "provider": "native", "ms": 9.0}]
    r = mod.thread_ratios(rows)
    assert [(x[1], x[2], x[3]) for x in r] == [("a", 2.0, 2.0), ("b", 1.25, 1.2),
                                               ("c", 1.2, 1.1)]
    md = mod.threads_markdown(rows)
    assert "1 of 3 cells (worst 2.00x)" not in md and "in 2 of 3 cells (worst 2.00x)" in md
    assert "in 1 of the 2 cells whose one-thread step takes 100 ms or more (least 1.20x)" in md
    assert "| x | a | 200 | 2.00x | 2.00x ** |" in md
    assert "| x | b | 50 | 1.25x | 1.20x |" in md                # under 100 ms: no idle flag
    assert "| x | c | 300 | 1.20x ** | 1.10x |" in md


def test_grid_busy_core_lives_only_inside_its_block():
    mod = bench_module("grid")
    with mod.BusyCore(seconds=30) as busy:
        assert busy.proc.poll() is None                      # running
    assert busy.proc.poll() is not None                      # stopped at the block's end


def _has_matplotlib():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def test_suite_runs_the_grid_after_it(tmp_path):
    suite = bench_module("suite")
    assert suite.main(["--mode", "ci", "--only", "edt", "--grid", "ci", "--quiet",
                       "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*-suite-ci.json"))) == 1
    assert len(list(tmp_path.glob("*-grid-ci.json"))) == 1


@pytest.mark.interpret
def test_bench_u2pl_tiny_writes_results(tmp_path):
    mod = bench_module("bench_u2pl")
    rows = mod.run("tiny", device="cpu", reps=1, out=str(tmp_path), verbose=False)
    by = {r["provider"]: r for r in rows}
    assert {"official-style", "reference", "fused"} <= set(by)
    for p in set(by) - {"reference", "official-style"}:
        assert by[p]["loss"] == pytest.approx(by["reference"]["loss"], rel=1e-5), p
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    # the floor's push bytes: the rows one step pushes, counted by an empty bank of roomy queues
    from pixcon.nn import UnreliableBank
    from pixcon.ops import u2pl_loss
    emb, labels, probs, temb, rel, unrel, _ = mod.make_inputs("tiny", "cpu")
    B, L, D, h, w, C = mod.SIZES["tiny"][:6]
    bank = UnreliableBank(C, D, sizes=(10**4,) * C)
    u2pl_loss(emb, labels, probs, temb, bank, num_labeled=L, reliable=rel, unreliable=unrel,
              seed=1)
    assert by["reference"]["pushed"] == int(bank.counts.sum()) > 0


def test_u2pl_official_style_baseline_has_the_method_value():
    """Student and teacher rows constant per class, the queues one constant key, no new
    negatives (negative_threshold 0) and the two images of each half labelled alike: which
    pixels and keys are drawn does not matter, so the official-style baseline and
    u2pl_loss(official=True) must agree; the per-class terms differ (the positive is the
    class's teacher row), so the value tests the masks, the means and the divisor."""
    import torch.nn.functional as F

    from pixcon.nn import UnreliableBank
    from pixcon.ops import u2pl_loss, u2pl_masks
    from pixcon.reference import u2pl as ref
    base = bench_module("baselines")
    g = torch.Generator().manual_seed(1)
    B, L, D, h, w, C = 4, 2, 6, 8, 9, 5
    labels = torch.randint(0, C, (B, h, w), generator=g)
    labels[1], labels[3] = labels[0], labels[2]
    labels[0, 0, :3] = labels[1, 0, :3] = 255
    probs = (4 * F.one_hot(labels.clamp(max=C - 1), C).permute(0, 3, 1, 2)
             + torch.randn(B, C, h, w, generator=g)).softmax(1)
    cent = F.normalize(torch.randn(C, D, generator=g), dim=1)
    tcent = F.normalize(torch.randn(C, D, generator=g), dim=1)
    emb = cent[labels.clamp(max=C - 1)].permute(0, 3, 1, 2).contiguous()
    temb = tcent[labels.clamp(max=C - 1)].permute(0, 3, 1, 2).contiguous()
    t = F.normalize(torch.randn(D, generator=g), dim=0)
    rel, unrel = u2pl_masks(probs, labels, L, 20.0)
    gt = torch.where(labels == 255, -1, labels)
    sizes = (7,) * C
    kw = dict(low_rank=1, high_rank=5, negative_threshold=0.0, num_queries=4, num_negatives=3)
    want = base.u2pl_official_style(emb, gt, probs, rel[:, None].float(), unrel[:, None].float(),
                                    temb, [t.expand(7, D).clone() for _ in range(C)],
                                    num_labeled=L, sizes=sizes, **kw)
    bank = UnreliableBank(C, D, sizes=sizes)
    bank.keys.copy_(t.expand(7 * C, D))
    bank.counts.fill_(7)
    got = u2pl_loss(emb, labels, probs, temb, bank, num_labeled=L, reliable=rel,
                    unreliable=unrel, official=True, backend="reference", **kw)
    assert got.item() > 0
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    onehot = base._scatter_onehot(gt[:2], C).bool()
    assert torch.equal(onehot, ref.official_onehot(gt[:2], C))


def test_plots_give_a_provider_one_colour_and_say_what_was_timed(tmp_path, monkeypatch):
    """A provider keeps its colour from plot to plot (matplotlib's cycle gave it the colour of
    its position), its "+ bank" line the same colour dashed; the EDT's plot says forward."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    plot, suite = bench_module("plot"), bench_module("suite")
    drawn = []
    real = matplotlib.axes.Axes.plot

    def spy(ax, *a, **k):
        drawn.append((k.get("label"), k.get("color"), k.get("linestyle")))
        return real(ax, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    pts = [(1, 1.0), (10, 2.0)]
    plot.line_plot({"native": pts, "official-style": pts}, tmp_path / "a.png", title="a",
                   xlabel="x", ylabel="y")
    plot.line_plot({"official-style": pts, "native + bank": pts, "zz new": pts},
                   tmp_path / "b.png", title="b", xlabel="x", ylabel="y")
    colour = {}
    for name, c, style in drawn:
        assert colour.setdefault(name.removesuffix(" + bank"), c) == c, name
        assert style == ("--" if name.endswith(" + bank") else "-")
    assert colour["native"] != colour["official-style"]
    assert plot.colour("zz new") == colour["zz new"]
    assert len(set(plot.COLOURS.values())) == len(plot.COLOURS) - 2   # triton = fused, C++ = native
    assert suite.title("distance_transform", "time").startswith("forward time")
    assert suite.title("reco_loss", "time") == "forward+backward time"
