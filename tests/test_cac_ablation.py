"""CAC's ablation switches (the paper's Table 3) and its image-level extension (eqs. 10-11).

Every row of the ablation table and every combination of the loss's four switches runs on the
reference, the CPU tiles and Triton (interpreter) and agrees (float64 1e-10, float32 1e-5
relative, as tests/test_cac.py); each switch moves the value the way its definition says on a
constructed case; the l2 alignment equals its formula; the image-level loss equals torch's
multi-label soft-margin loss."""
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from pixcon.data import image_labels, overlapping_crops
from pixcon.nn import DirectionalContrastLoss, ImageLevelLoss, NegativeBank, image_level_loss
from pixcon.nn.cac import ABLATION, loss_switches
from pixcon.ops import directional_contrast_loss

from .conftest import assert_close
from .test_cac import TRITON, case, run

SWITCHES = [dict(directional=d, positive_filtering=p, negative_sampling=ns, alignment=a)
            for d, p, ns, a in itertools.product((True, False), (True, False), (True, False),
                                                 ("contrastive", "l2"))]


def _id(sw):
    return "-".join(k[:3] + str(int(v)) if isinstance(v, bool) else v for k, v in sw.items())


@pytest.mark.parametrize("backend", ["native", TRITON])
@pytest.mark.parametrize("switches", SWITCHES, ids=_id)
def test_every_switch_combination_fused_matches_reference(backend, switches):
    data = case(33, 250, 12, 4, seed=len(_id(switches)), dtype=torch.float32)
    want = run("reference", *data, pos_threshold=0.5, **switches)
    got = run(backend, *data, pos_threshold=0.5, **switches)
    for a, b, what in zip(got, want, ("loss", "grad f1", "grad f2")):
        assert_close(a, b, rtol=1e-5, atol=1e-5, what=f"{what} {switches}")


@pytest.mark.parametrize("row", list(ABLATION))
@pytest.mark.parametrize("backend", ["native", TRITON])
def test_every_ablation_row_runs_fused_and_matches(row, backend):
    data = case(40, 300, 16, 5, seed=7, dtype=torch.float64)
    want = run("reference", *data, pos_threshold=0.5, **loss_switches(row))
    got = run(backend, *data, pos_threshold=0.5, **loss_switches(row))
    for a, b, what in zip(got, want, ("loss", "grad f1", "grad f2")):
        assert_close(a, b, rtol=1e-10, atol=1e-10, what=f"{what} row {row}")


def test_ablation_table_rows():
    """The table as the paper prints it: columns Proj, Context, CL, Dir, NS, PF."""
    marks = {"I": "110000", "II": "111000", "III": "111100", "IV": "111110", "V": "111011",
             "VI": "101111", "VII": "011111", "VIII": "111111"}
    for row, m in marks.items():
        a = ABLATION[row]
        got = [a["projector"], a["context"], a["alignment"] == "contrastive", a["directional"],
               a["negative_sampling"], a["positive_filtering"]]
        assert got == [c == "1" for c in m], row
    with pytest.raises(ValueError, match="ablation row must be one of"):
        loss_switches("IX")


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_each_switch_moves_the_value_as_defined(backend):
    f1, f2, l1, l2, bank, lab = case(60, 400, 8, 4, seed=11)
    kw = dict(pos_threshold=0.8, backend=backend, reduction="none")
    full = directional_contrast_loss(f1, f2, l1, l2, bank, lab, **kw)
    on = full != 0
    # negative sampling off: the anchor's own pseudo-label's negatives join every denominator,
    # so every selected pixel's term grows (softplus is increasing)
    no_ns = directional_contrast_loss(f1, f2, l1, l2, bank, lab, negative_sampling=False, **kw)
    assert torch.equal(no_ns != 0, on) and (no_ns[on] > full[on]).all()
    # directional mask off: the pixels whose anchor view is the surer one (above gamma) join;
    # the pixels already selected keep their terms
    no_dir = directional_contrast_loss(f1, f2, l1, l2, bank, lab, directional=False, **kw)
    assert torch.allclose(no_dir[on], full[on], rtol=1e-12) and (no_dir != 0).sum() > on.sum()
    # positive filtering off: the pixels whose target is below gamma join
    no_pf = directional_contrast_loss(f1, f2, l1, l2, bank, lab, positive_filtering=False, **kw)
    assert torch.allclose(no_pf[on], full[on], rtol=1e-12) and (no_pf != 0).sum() > on.sum()
    # both off: every overlap pixel in both terms
    neither = directional_contrast_loss(f1, f2, l1, l2, bank, lab, directional=False,
                                        positive_filtering=False, **kw)
    assert (neither != 0).all()
    # which pixels each mask keeps, by its definition
    c1, c2 = F.softmax(l1, 1).amax(1), F.softmax(l2, 1).amax(1)
    assert torch.equal(on[0], (c2 > 0.8) & (c1 < c2))
    assert torch.equal(no_dir[0] != 0, c2 > 0.8)
    assert torch.equal(no_pf[0] != 0, c1 < c2)


@pytest.mark.parametrize("backend", ["reference", "native", TRITON])
def test_l2_alignment_is_its_formula(backend):
    f1, f2, l1, l2, bank, lab = case(25, 50, 6, 3, seed=5)
    loss, g1, g2 = run(backend, f1, f2, l1, l2, bank, lab, alignment="l2", directional=False,
                       positive_filtering=False)
    want = 2 * (f1 - f2).square().sum(1).mean()                       # both terms, every pixel
    assert abs(float(loss) - float(want.detach())) < 1e-10
    assert_close(g1, 2 * (f1 - f2) / 25, rtol=1e-10, atol=1e-12, what="grad f1")
    assert_close(g2, 2 * (f2 - f1) / 25, rtol=1e-10, atol=1e-12, what="grad f2")
    # with the masks: each term averaged over its own pixels
    per = directional_contrast_loss(f1, f2, l1, l2, bank, lab, alignment="l2",
                                    pos_threshold=0.5, reduction="none", backend="reference")
    c1, c2 = F.softmax(l1, 1).amax(1), F.softmax(l2, 1).amax(1)
    d1 = (c2 > 0.5) & (c1 < c2)
    assert torch.allclose(per[0], torch.where(d1, (f1 - f2).square().sum(1), 0.0))


def test_l2_gradcheck_and_nothing_selected_is_connected_zero():
    f1, f2, l1, l2, bank, lab = case(6, 20, 3, 3, seed=4)
    assert torch.autograd.gradcheck(
        lambda a: directional_contrast_loss(a, f2, l1, l2, bank, lab, alignment="l2",
                                            pos_threshold=0.4, reduction="none")[0],
        (f1.clone().requires_grad_(),))
    a = f1.clone().requires_grad_()
    loss = directional_contrast_loss(a, f2, l1, l2, bank, lab, alignment="l2",
                                     pos_threshold=0.999999, backend="native")
    loss.backward()
    assert float(loss.detach()) == 0 and float(a.grad.abs().sum()) == 0


@pytest.mark.parametrize("override,exc,msg", [
    (dict(directional=1), TypeError, "directional must be True or False"),
    (dict(negative_sampling="no"), TypeError, "negative_sampling must be True or False"),
    (dict(alignment="cosine"), ValueError, "alignment must be one of"),
])
def test_bad_switches(override, exc, msg):
    f1, f2, l1, l2, bank, lab = case()
    with pytest.raises(exc, match=f"directional_contrast_loss: {msg}"):
        directional_contrast_loss(f1, f2, l1, l2, bank, lab, **override)


def test_module_without_projector_and_crops_without_context():
    torch.manual_seed(0)
    crit = DirectionalContrastLoss(16, projector=False, pos_threshold=0.3, **loss_switches("VII"))
    assert crit.projector is None and not list(crit.parameters())
    enc = torch.randn(2, 16, 4, 4)
    assert torch.allclose(crit.project(enc), F.normalize(enc, dim=1))
    one = overlapping_crops(120, 100, 64, seed=3, context=False)
    assert one.origin1 == one.origin2 and one.box1 == one.box2 == (0, 0, 64, 64)
    assert one.iou == 1.0 and one.tries == 0
    two = overlapping_crops(120, 100, 64, seed=3)
    assert two.origin1 == one.origin1                    # the same first crop
    enc1, enc2 = torch.randn(1, 16, 8, 8, requires_grad=True), torch.randn(1, 16, 8, 8)
    lg = torch.randn(1, 4, 8, 8) * 3
    loss = crit(enc1, enc2, lg, lg * 2, torch.tensor([one.box1]), torch.tensor([one.box2]),
                None, None, NegativeBank(0))
    loss.backward()
    assert enc1.grad.abs().sum() > 0


# --- image-level labels (eqs. 10-11) -----------------------------------------------------------
def test_image_labels_from_masks():
    lab = torch.tensor([[[0, 0], [2, 255]], [[255, 255], [255, 255]], [[1, 7], [-1, 1]]])
    want = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.float32)
    assert torch.equal(image_labels(lab, 3), want)


def test_image_level_loss_is_torchs_multilabel_loss():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = (torch.rand(5, 7, generator=g) > 0.6).float()
    want = 0.5 * (F.multilabel_soft_margin_loss(x1, y) + F.multilabel_soft_margin_loss(x2, y))
    assert abs(float(image_level_loss(x1, x2, y)) - float(want)) < 1e-6
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(3, 4) > 0.5).double()
    assert torch.autograd.gradcheck(lambda a: image_level_loss(a, a * 0.5, t), (x,))
    with pytest.raises(ValueError, match="image_level_loss: targets must have"):
        image_level_loss(x1, x2, y[:, :3])
    with pytest.raises(TypeError, match="image_level_loss: logits1"):
        image_level_loss(x1.long(), x2, y)


def test_image_level_module_and_empty_labels():
    torch.manual_seed(0)
    weak = ImageLevelLoss(8, 5, weight=0.5)
    enc1, enc2 = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 4, 4)
    y = torch.zeros(2, 5)                                 # no class present: still a loss
    loss = weak(enc1, enc2, y)
    loss.backward()
    want = 0.5 * image_level_loss(weak.logits(enc1), weak.logits(enc2), y)
    assert torch.allclose(loss, want) and float(loss) > 0
    assert weak.classifier.weight.grad.abs().sum() > 0 and enc1.grad.abs().sum() > 0
    assert weak.logits(enc1).shape == (2, 5)
    # the paper's global average pooling, then the linear classifier (issue 33: the operator,
    # not only the shape): max pooling or a sum would differ on these features
    by_hand = enc1.detach().mean(dim=(2, 3)) @ weak.classifier.weight.T + weak.classifier.bias
    assert torch.allclose(weak.logits(enc1.detach()), by_hand, atol=1e-6)
    assert not torch.allclose(weak.logits(enc1.detach()), enc1.detach().amax(dim=(2, 3))
                              @ weak.classifier.weight.T + weak.classifier.bias, atol=1e-3)


# --- the trainer: CAC end to end ---------------------------------------------------------------
def _cac_cfg(tmp_path=None, **over):
    from pixcon.train.cli import TINY
    from pixcon.train.loop import Config
    kw = dict(TINY, progress=False, mode="semi", loss="cac", steps=2, eval_every=2,
              figures=False, out=None if tmp_path is None else str(tmp_path))
    kw.update(over)
    return Config(**kw)


def test_trainer_runs_cac_with_the_image_level_branch_and_resumes(tmp_path):
    from pixcon.train.loop import Trainer, train
    rep = train(_cac_cfg(tmp_path / "a", steps=3, eval_every=3, image_level=True))
    hist = rep["history"]
    assert [sorted(h) for h in hist] == [["contrast", "loss", "lr", "step", "sup", "weak"]] * 3
    assert all(h["weak"] > 0 and h["contrast"] >= 0 for h in hist)
    for h in hist:                    # eq. 10: CE + lambda L_dc + lambda_w L_w (lambda_w = 1)
        assert abs(h["loss"] - (h["sup"] + 0.1 * h["contrast"] + h["weak"])) < 1e-5
    assert rep["final_miou"] is not None
    # a run stopped after step 2 and resumed (bank and heads from the checkpoint) ends as the
    # uninterrupted one
    cfg = _cac_cfg(tmp_path / "b", steps=3, eval_every=1, image_level=True)
    Trainer(dataclasses.replace(cfg, stop_at=2)).run()
    t = Trainer(dataclasses.replace(cfg, resume=True))
    assert t.step == 2 and len(t.bank) == 2
    resumed = t.run()["history"]
    assert abs(resumed[-1]["loss"] - hist[-1]["loss"]) < 1e-4


@pytest.mark.parametrize("row", list(ABLATION))
def test_trainer_runs_every_ablation_row(row):
    from pixcon.train.loop import Trainer
    t = Trainer(_cac_cfg(steps=1, cac_ablation=row))
    rec = t.train_step()
    assert rec["contrast"] >= 0 and torch.isfinite(torch.tensor(rec["loss"]))
    assert (t.extra.contrast.projector is None) == (not ABLATION[row]["projector"])
    assert t.teacher is None                      # CAC trains without Mean Teacher


def test_trainer_cac_config_errors():
    with pytest.raises(ValueError, match="needs mode 'semi'"):
        _cac_cfg(mode="sup").validate()
    with pytest.raises(ValueError, match="cac_ablation must be one of"):
        _cac_cfg(cac_ablation="IX").validate()
    with pytest.raises(ValueError, match="multiple of the feature stride 8"):
        _cac_cfg(crop=36).validate()
    with pytest.raises(ValueError, match="image_level is CAC's extension"):
        _cac_cfg(loss="reco", image_level=True).validate()


def test_cac_views_overlap_is_the_same_image_content(monkeypatch):
    """Without photometric changes the two views agree on their overlap boxes."""
    from pixcon.train import cac as tc
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 40, 48)
    monkeypatch.setattr(tc.ss, "photometric", lambda x, lab, **k: (x, lab, None))
    v1, v2, b1, b2 = tc.cac_views(list(img), crop=32, stride=8, context=True, generator=g)
    assert v1.shape == v2.shape == (2, 3, 32, 32)
    for i in range(2):
        t1, l1, bt1, r1 = b1[i].tolist()
        t2, l2, bt2, r2 = b2[i].tolist()
        assert (bt1 - t1, r1 - l1) == (bt2 - t2, r2 - l2) and bt1 > t1
        assert torch.allclose(v1[i, :, t1:bt1, l1:r1], v2[i, :, t2:bt2, l2:r2])
