"""pixcon.viz: the data behind each figure (palettes, panel predictions, the class-balanced
t-SNE sample, the error-distance bins against a brute-force computation), that every PNG is
written and decodes, the trainer's end-of-run figures and the command line. No test looks at
the pixels of a rendering."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pixcon import viz
from pixcon.train.loop import Config, train
from pixcon.train.cli import TINY
from pixcon.workbench.model import DeepLabV3Plus
from pixcon.workbench.scenes import IGNORE, NUM_CLASSES, SceneDataset
from pixcon.viz import errors as verr
from pixcon.viz import tsne as vtsne

pytest.importorskip("matplotlib")
TINY_CFG = dict(TINY, progress=False)


def decodes(path):
    with Image.open(path) as im:
        im.load()
        return im.format == "PNG" and min(im.size) > 50


@pytest.fixture(scope="module")
def scenes():
    return SceneDataset("val", size=32, length=6)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepLabV3Plus(NUM_CLASSES, rep_dim=8).eval()


# --- palettes and panels -----------------------------------------------------------------------
def test_palettes():
    voc = viz.palette("voc")
    # Pascal VOC's colour map: bits of k spread over R, G, B, high bits first
    assert voc[0].tolist() == [0, 0, 0] and voc[1].tolist() == [128, 0, 0]
    assert voc[2].tolist() == [0, 128, 0] and voc[3].tolist() == [128, 128, 0]
    assert voc[15].tolist() == [192, 128, 128] and voc[20].tolist() == [0, 64, 128]
    assert voc[255].tolist() == [224, 224, 192]              # VOC's own 255 is the cream
    city = viz.palette("cityscapes")
    assert city[0].tolist() == [128, 64, 128] and city[18].tolist() == [119, 11, 32]
    sun = viz.palette("sun")
    assert len({tuple(c) for c in sun[:37].tolist()}) == 37  # 37 distinct colours
    assert viz.palette("cityscapes", ignore_index=0)[0].tolist() == [224, 224, 192]
    with pytest.raises(ValueError, match="palette: name must be one of"):
        viz.palette("ade")


def test_colorize_maps_labels_and_out_of_range_as_ignored():
    table = viz.palette("voc")
    lab = torch.tensor([[0, 1, 255], [-1, 300, 2]])
    rgb = viz.colorize(lab, table)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [128, 0, 0] and rgb[1, 2].tolist() == [0, 128, 0]
    for y, x in ((0, 2), (1, 0), (1, 1)):
        assert rgb[y, x].tolist() == [224, 224, 192]


def test_prediction_panels_models_and_label_maps(tmp_path, scenes, model):
    images, labels = scenes.images[:3], scenes.labels[:3]
    want = viz.common.predict(model, images)
    assert want.shape == labels.shape and want.dtype == torch.int64
    got = viz.panels.panel_predictions({"net": model, "truth": labels}, images)
    assert torch.equal(got["net"], want) and torch.equal(got["truth"], labels)
    path = viz.prediction_panels(images, labels, {"net": model, "copy of the truth": labels},
                                 tmp_path / "p.png", class_names=scenes.class_names,
                                 ignore_index=IGNORE, title="t")
    assert decodes(path)
    # one image (3, H, W) and a (H, W) prediction also work
    assert decodes(viz.prediction_panels(images[0], labels[0], {"m": want[0]}, tmp_path / "q.png",
                                         class_names=scenes.class_names))


def test_prediction_panels_bad_inputs(tmp_path, scenes):
    images, labels = scenes.images[:2], scenes.labels[:2]
    names = scenes.class_names
    with pytest.raises(ValueError, match=r"predictions\['x'\] has shape \(2, 16, 16\)"):
        viz.prediction_panels(images, labels, {"x": labels[:, :16, :16]}, tmp_path / "a.png",
                              class_names=names)
    with pytest.raises(ValueError, match="labels must be"):
        viz.prediction_panels(images, labels[:1], {}, tmp_path / "a.png", class_names=names)
    with pytest.raises(ValueError, match="images must be"):
        viz.prediction_panels(images[:, :2], labels, {}, tmp_path / "a.png", class_names=names)


def _lab(rgb):
    """CIELAB of sRGB rows (D65), for colour differences (delta E 1976)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def test_the_distinct_palette_keeps_neighbouring_classes_apart():
    """VOC's own map draws classes 1 and 8 as two dark reds; "distinct" (the scenes' and every
    dataset without a map of its own) keeps each class far from the next at any count, and the
    scenes' 9 classes far from each other."""
    lab = _lab(viz.palette("distinct")[:255])
    step = np.linalg.norm(lab[1:] - lab[:-1], axis=1)
    assert step.min() > 60, step.min()
    nine = lab[:NUM_CLASSES]
    d = np.linalg.norm(nine[:, None] - nine[None], axis=-1) + np.eye(NUM_CLASSES) * 1e9
    assert d.min() > 30, d.min()
    voc = _lab(viz.palette("voc")[:21])
    assert np.linalg.norm(voc[1:] - voc[:-1], axis=1).min() < step.min()
    from pixcon.viz.cli import palette_of
    for dataset, name in (("scenes", "distinct"), ("voc:/data", "voc"),
                          ("cityscapes:/d", "cityscapes"), ("ade:/d", "distinct")):
        assert palette_of(Config(dataset=dataset)) == name


@pytest.mark.parametrize("num_classes", [150, 171])
def test_the_legend_lists_every_class_inside_the_figure(tmp_path, monkeypatch, num_classes):
    """ADE20K's 150 / COCO-Stuff's 171 classes, all present: every entry drawn, inside the
    figure, right of the panels (one column was clipped to classes 57-96)."""
    import matplotlib.figure
    seen = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        texts = [t.get_window_extent(r) for t in fig.legends[0].get_texts()]
        right = max(ax.get_window_extent(r).x1 for ax in fig.axes)
        seen.update(n=len(texts), right=right, box=fig.bbox,
                    left=min(t.x0 for t in texts), out=[t for t in texts if not (
                        t.x0 >= 0 and t.y0 >= 0 and t.x1 <= fig.bbox.x1 and t.y1 <= fig.bbox.y1)])
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    names = [f"class {k} {'long name ' * (k % 3)}".strip() for k in range(num_classes)]
    labels = torch.arange(3 * 48 * 48).reshape(3, 48, 48) % num_classes
    viz.prediction_panels(torch.rand(3, 3, 48, 48), labels, {"net": (labels + 7) % num_classes},
                          tmp_path / "p.png", class_names=names, palette_name="distinct")
    assert seen["n"] == num_classes and not seen["out"], seen
    assert seen["left"] > seen["right"]                   # beside the panels, not over them
    assert seen["left"] - seen["right"] < 100             # and near them (pixels at 100 dpi)


class _Wrapped(torch.nn.Module):
    """The test model behind another output convention."""

    def __init__(self, inner, kind):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        out = self.inner(x)
        return {"tensor": lambda: out.logits, "tuple": lambda: (out.logits, out.rep),
                "torchvision": lambda: {"out": out.logits},
                "dict": lambda: {"logits": out.logits, "rep": out.rep,
                                 "features": out.features}}[self.kind]()


@pytest.mark.parametrize("kind", ["tensor", "tuple", "torchvision", "dict"])
def test_figures_read_a_tensor_tuple_or_dict_output(scenes, model, kind):
    """A model returning a tensor, a tuple (logits, rep), torchvision's {"out": ...} or a dict
    gets the same predictions and relation as pixcon's SegOutput model (its rep when it gives
    one, its logits when not)."""
    wrapped = _Wrapped(model, kind).eval()
    images = scenes.images[:3]
    assert torch.equal(viz.common.predict(wrapped, images), viz.common.predict(model, images))
    sim, counts = viz.class_relation(wrapped, scenes)
    with_rep = kind in ("tuple", "dict")
    if with_rep:
        ref, _ = viz.class_relation(model, scenes)
    else:
        class LogitsOnly(torch.nn.Module):
            def forward(self, x):
                return model(x)._replace(rep=None)
        ref, _ = viz.class_relation(LogitsOnly().eval(), scenes)
    assert torch.allclose(sim, ref, equal_nan=True)
    if kind == "dict":
        verr.error_distance_curve(wrapped, scenes, max_distance=3)
    else:
        with pytest.raises(TypeError, match="needs the backbone stages"):
            verr.error_distance_curve(wrapped, scenes, max_distance=3)
    with pytest.raises(TypeError, match="cannot find logits in the model's output"):
        viz.common.logits_of("not an output")


def test_relation_cells_are_readable_or_left_to_the_json(tmp_path, monkeypatch):
    import matplotlib.figure
    sizes = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        ax = fig.axes[0]
        sizes.append(([t.get_fontsize() for t in ax.texts], ax.get_title()))
        return save(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    for C in (9, 150):
        sim = torch.rand(C, C) * 2 - 1
        viz.relation_png(sim, [f"c{k}" for k in range(C)], tmp_path / f"r{C}.png")
    (small, title9), (big, title150) = sizes
    assert len(small) == 81 and min(small) >= 8
    assert not big and "values in relation.json" in title150


# --- t-SNE ------------------------------------------------------------------------------------
def test_keep_smallest_keys_is_the_per_class_minimum():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (200,), generator=g)
    keys = torch.rand(200, generator=g)
    keep = vtsne.keep_smallest_keys(keys, labels, 7)
    for c in range(5):
        idx = (labels == c).nonzero().flatten()
        want = set(idx[torch.argsort(keys[idx])[:7]].tolist())
        assert set(keep[labels[keep] == c].tolist()) == want


def test_sample_is_class_balanced_and_drawn_from_the_right_pixels(scenes, model):
    per = 20
    z, y = viz.sample_embeddings(model, scenes, per_class=per, seed=1, batch=4)
    # brute force: every pixel's embedding and label at the representation's resolution
    with torch.no_grad():
        rep = model(viz.common.normalize_images(scenes.images)).rep
    lab = viz.common.labels_at(scenes.labels, rep.shape[-2:], NUM_CLASSES).reshape(-1)
    allz = torch.nn.functional.normalize(rep, dim=1).permute(0, 2, 3, 1).reshape(-1, 8)
    avail = torch.bincount(lab[lab >= 0], minlength=NUM_CLASSES)
    got = torch.bincount(y, minlength=NUM_CLASSES)
    assert torch.equal(got, avail.clamp(max=per))            # balanced, all of a small class
    assert (avail > per).any() and (avail[avail > 0] < per).any()   # both cases occur here
    for row, c in zip(z, y):                                  # each row is a pixel of its class
        d = (allz[lab == c] - row).abs().amax(1)
        assert float(d.min()) < 1e-5
    z2, y2 = viz.sample_embeddings(model, scenes, per_class=per, seed=1, batch=6)
    assert torch.equal(y, y2) and torch.allclose(z, z2, atol=1e-6)   # batching does not matter
    _, y3 = viz.sample_embeddings(model, scenes, per_class=per, seed=2)
    assert torch.equal(torch.bincount(y3, minlength=NUM_CLASSES), got)
    with pytest.raises(ValueError, match="per_class must be positive"):
        viz.sample_embeddings(model, scenes, per_class=0)


def test_embedding_tsne_two_models(tmp_path, scenes, model):
    pytest.importorskip("sklearn")
    torch.manual_seed(1)
    other = DeepLabV3Plus(NUM_CLASSES, representation=False).eval()
    res = viz.embedding_tsne({"rep head": model, "logits": other}, scenes, tmp_path / "t.png",
                             per_class=15)
    assert list(res) == ["rep head", "logits"]
    for r in res.values():
        n = len(r["labels"])
        assert r["xy"].shape == (n, 2) and np.isfinite(r["xy"]).all()
        counts = np.bincount(r["labels"], minlength=NUM_CLASSES)
        assert counts.max() == 15 and n == counts.sum() > 15    # capped per class
    assert decodes(tmp_path / "t.png")


# --- error-distance curve ---------------------------------------------------------------------
def brute_error_stats(emb, labels, pred, anchors, K):
    """Per pixel with SciPy's binary EDT of each image's class-wise error region B^n."""
    from scipy.ndimage import distance_transform_edt
    sums, counts = np.zeros((2, K + 1)), np.zeros(K + 1, np.int64)
    z = torch.nn.functional.normalize(emb.double(), dim=1).numpy()
    A = anchors.double().numpy()
    for b in range(labels.shape[0]):
        for n in range(anchors.shape[0]):
            region = ((labels[b] == n) & (pred[b] >= 0) & (pred[b] != n)).numpy()
            if not region.any() or region.all():
                continue
            dist = distance_transform_edt(region)
            for i, j in zip(*np.nonzero(region)):
                p = int(pred[b, i, j])
                if not (np.isfinite(A[n]).all() and np.isfinite(A[p]).all()):
                    continue
                d = dist[i, j]
                k = min(math.ceil(d) - 1, K)
                sums[0, k] += z[b, :, i, j] @ A[n]
                sums[1, k] += z[b, :, i, j] @ A[p]
                counts[k] += 1
    return sums, counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_distance_bins_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    B, D, h, w, C, K = 2, 5, 17, 23, 4, 4
    # blocky labels so that regions have interiors, predictions wrong in patches, some ignored
    labels = torch.randint(0, C, (B, 1, 5, 6), generator=g).float()
    labels = torch.nn.functional.interpolate(labels, size=(h, w), mode="nearest")[:, 0].long()
    pred = torch.randint(0, C, (B, 1, 4, 4), generator=g).float()
    pred = torch.nn.functional.interpolate(pred, size=(h, w), mode="nearest")[:, 0].long()
    labels[:, 0, :5] = -1
    pred[0, 10, 10] = -1
    emb = torch.randn(B, D, h, w, generator=g)
    anchors = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    anchors[3] = float("nan")                                  # a class without pixels
    sums, counts = verr.error_distance_stats(emb, labels, pred, anchors, K)
    want_s, want_n = brute_error_stats(emb, labels, pred, anchors, K)
    assert counts.tolist() == want_n.tolist() and want_n.sum() > 50
    assert (want_n[1:] > 0).sum() >= 2                          # several bins filled
    np.testing.assert_allclose(sums.numpy(), want_s, rtol=1e-5, atol=1e-5)
    assert len(verr.distance_bins(K)) == K + 1


def test_error_region_without_boundary_is_left_out():
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    pred = torch.ones(1, 6, 6, dtype=torch.long)             # every pixel wrong: no outside
    anchors = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    sums, counts = verr.error_distance_stats(torch.randn(1, 3, 6, 6), labels, pred, anchors)
    assert int(counts.sum()) == 0 and float(sums.abs().sum()) == 0


def test_error_distance_curve_on_a_model(tmp_path, scenes, model):
    curve = viz.error_distance_curve(model, scenes, max_distance=3, batch=4)
    assert curve["bins"] == ["1", "(1,2]", "(2,3]", "> 3"]
    assert len(curve["layers"]) == len(model.backbone.channels)
    assert curve["layers"][0]["shape"] == [16, 16]
    total = sum(sum(lay["count"]) for lay in curve["layers"])
    assert total > 0
    for lay in curve["layers"]:
        for key in ("true", "pred"):
            vals = [v for v in lay[key] if v is not None]
            assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in vals)
            assert len(vals) == sum(1 for n in lay["count"] if n > 0)
    assert decodes(viz.error_distance_png(curve, tmp_path / "e.png"))
    # with a ContextrastLoss's heads the layers are its projected embeddings
    from pixcon.nn import ContextrastLoss
    heads = ContextrastLoss(in_channels=model.backbone.channels, dim=6)
    curve2 = viz.error_distance_curve(model, scenes, heads=heads, max_distance=3)
    assert [lay["count"] for lay in curve2["layers"]] == [lay["count"] for lay in
                                                          curve["layers"]]
    assert heads.training and not model.training              # modes restored


# --- trainer and command line -----------------------------------------------------------------
def test_trainer_writes_figures_and_the_cli_draws_the_rest(tmp_path, capsys):
    pytest.importorskip("sklearn")
    a, b = tmp_path / "a", tmp_path / "b"
    train(Config(**dict(TINY_CFG, steps=1, eval_every=1), mode="sup", loss="contextrast",
                 out=str(a)))
    for f in ("panels.png", "relation.png", "dendrogram.png"):
        assert decodes(a / "figures" / f), f
    rel = json.loads((a / "figures" / "relation.json").read_text())
    assert len(rel["classes"]) == NUM_CLASSES
    train(Config(**dict(TINY_CFG, steps=1, eval_every=1), mode="sup", out=str(b),
                 figures=False))
    assert not (b / "figures").exists()
    assert viz.main([str(a / "checkpoint.pt"), "--tsne", "--errors", "--per-class", "10",
                     "--compare", str(b / "checkpoint.pt"), "--panels", "2"]) == 0
    out = a / "viz"
    for f in ("panels.png", "relation.png", "dendrogram.png", "tsne.png", "errors.png"):
        assert decodes(out / f), f
    curve = json.loads((out / "errors.json").read_text())
    assert len(curve["layers"]) == 4 and curve["bins"][0] == "1"
    assert "wrote" in capsys.readouterr().out
