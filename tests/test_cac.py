"""CAC: the directional loss against hand-computed cases and the official arithmetic, fused (CPU
tiles, Triton) vs reference, stop-gradients, the crop geometry, the overlap cut, the bank.

Tolerances: float64 1e-10 (same formula, other summation order); float32 1e-5 relative. The
official numerics differ from the exact loss by the eps terms (about 1e-3 on random unit
features, stated in specs/cac.md §6)."""
import math

import pytest
import torch
import torch.nn.functional as F

from pixcon.data import overlapping_crops
from pixcon.nn import DirectionalContrastLoss, NegativeBank
from pixcon.ops import directional_contrast_loss, overlap_rows
from pixcon.reference import cac as ref

from .conftest import assert_close, triton_device

DEV = triton_device()
TRITON = pytest.param("triton", marks=pytest.mark.interpret)


def case(n=40, N=300, D=16, C=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f1 = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    f2 = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    l1 = 3 * torch.randn(n, C, generator=g)
    l2 = 3 * torch.randn(n, C, generator=g)
    bank = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return f1, f2, l1, l2, bank, torch.randint(0, C, (N,), generator=g)


def run(backend, f1, f2, *rest, **kw):
    dev = DEV if backend == "triton" else torch.device("cpu")
    a, b = f1.to(dev).requires_grad_(), f2.to(dev).requires_grad_()
    loss = directional_contrast_loss(a, b, *[r.to(dev) for r in rest], backend=backend, **kw)
    ga, gb = torch.autograd.grad(loss, [a, b])
    return loss.detach().cpu(), ga.cpu(), gb.cpu()


def test_hand_computed_two_pixels():
    """Pixel 0: view 2 confident (0.9 > 0.75) and surer than view 1 -> term 1; pixel 1: view 1
    surer -> term 2. Negatives of the anchor's own pseudo-label are filtered out."""
    f1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    f2 = torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    p = torch.log(torch.tensor([[0.6, 0.4], [0.95, 0.05]]))          # view 1: c = 0.6, 0.95
    q = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))            # view 2: c = 0.9, 0.8
    bank = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    lab = torch.tensor([1, 0, 1])
    t = 0.5
    # term 1, pixel 0: anchor f1_0 (label 0), positive f2_0, negatives of label != 0: rows 0, 2
    s_pos, s_neg = 0.6 / t, torch.tensor([0.0, -1.0]) / t
    l1 = -(s_pos - torch.logsumexp(torch.cat([torch.tensor([s_pos]), s_neg]), 0))
    # term 2, pixel 1: anchor f2_1 (label 1), positive f1_1, negatives label != 1: row 1
    s_pos2, s_neg2 = 0.6 / t, torch.tensor([0.8]) / t
    l2 = -(s_pos2 - torch.logsumexp(torch.cat([torch.tensor([s_pos2]), s_neg2]), 0))
    for be in ("reference", "native"):
        loss = directional_contrast_loss(f1, f2, p, q, bank, lab, temperature=t, backend=be)
        assert abs(loss.item() - (l1 + l2).item()) < 1e-6            # expected built in fp32
        per = directional_contrast_loss(f1, f2, p, q, bank, lab, temperature=t, backend=be,
                                        reduction="none")
        assert per[0, 1] == 0 and per[1, 0] == 0                   # masks: one term each


def test_directional_mask_rules():
    c = torch.tensor([0.8, 0.8, 0.7, 0.9])
    other = torch.tensor([0.9, 0.8, 0.74, 0.76])
    assert ref.directional_mask(c, other, 0.75).tolist() == [True, False, False, False]


def test_negative_filter_uses_the_anchors_label():
    f1, f2, l1, l2, bank, lab = case(seed=1)
    base = directional_contrast_loss(f1, f2, l1, l2, bank, lab, backend="reference",
                                     reduction="none")
    swapped = directional_contrast_loss(f1, f2, l1, l2 + 0.0, bank, lab, backend="reference",
                                        reduction="none", pos_threshold=0.75)
    assert torch.equal(base, swapped)
    # give view 1's logits a different argmax but the same maximum: term 1 changes
    l1b = l1.clone()
    i = l1b.argmax(1)
    l1b[torch.arange(len(i)), (i + 1) % l1.shape[1]] = l1b.max(1).values
    l1b[torch.arange(len(i)), i] = l1b.min(1).values - 1
    changed = directional_contrast_loss(f1, f2, l1b, l2, bank, lab, backend="reference",
                                        reduction="none")
    sel = base[0] != 0
    assert sel.any() and not torch.allclose(changed[0][sel], base[0][sel])


@pytest.mark.parametrize("backend", ["native", TRITON])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(40, 300, 16, 5), (7, 1000, 24, 3), (65, 90, 8, 21)], ids=str)
def test_fused_matches_reference(backend, dtype, shape):
    n, N, D, C = shape
    data = case(n, N, D, C, seed=sum(shape), dtype=dtype)
    want = run("reference", *data, pos_threshold=0.5)
    got = run(backend, *data, pos_threshold=0.5)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, b, what in zip(got, want, ("loss", "grad f1", "grad f2")):
        assert_close(a, b, rtol=tol, atol=tol, what=what)


def test_gradients_reach_only_the_anchor_side():
    """Term 1 sends no gradient to f2 (stop-gradient target), term 2 none to f1; the bank gets
    none."""
    f1, f2, l1, l2, bank, lab = case(seed=3)
    f1.requires_grad_()
    f2.requires_grad_()
    bank.requires_grad_()
    for be in ("reference", "native"):
        per = directional_contrast_loss(f1, f2, l1, l2, bank, lab, backend=be, reduction="none",
                                        pos_threshold=0.5)
        g1 = torch.autograd.grad(per[0].sum(), [f1, f2, bank], allow_unused=True,
                                 retain_graph=True)
        assert g1[0].abs().sum() > 0 and g1[1].abs().sum() == 0
        assert g1[2] is None or g1[2].abs().sum() == 0
        g2 = torch.autograd.grad(per[1].sum(), [f1, f2], allow_unused=True)
        assert g2[0].abs().sum() == 0 and g2[1].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_gradcheck_term_of_each_view(backend):
    """With the target held fixed (it is stop-gradient), each term's autograd gradient is its
    true derivative w.r.t. its anchor view."""
    f1, f2, l1, l2, bank, lab = case(6, 20, 3, 3, seed=4)
    assert torch.autograd.gradcheck(
        lambda a: directional_contrast_loss(a, f2, l1, l2, bank, lab, backend=backend,
                                            pos_threshold=0.4, reduction="none")[0],
        (f1.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(
        lambda b: directional_contrast_loss(f1, b, l1, l2, bank, lab, backend=backend,
                                            pos_threshold=0.4, reduction="none")[1],
        (f2.clone().requires_grad_(),))


def test_official_numerics_close_on_random_features_and_where_they_differ():
    """Random unit features: the official arithmetic is within 5e-2 of the exact loss (the eps
    terms matter as a pixel's loss nears 18.4; 0.028 on this case). Constructed cases where it matters: (1) an anchor
    anti-aligned with its positive and aligned with its negatives at t = 0.05: the exact pixel
    loss is about 40, the official one saturates at -log(1e-8) = 18.4; (2) at t = 0.01 a bank
    column past the first 8000 far above their maximum: the official value overflows to inf in
    fp32, the exact one is finite."""
    f1, f2, l1, l2, bank, lab = case(200, 9000, 16, 5, seed=5, dtype=torch.float32)
    exact = directional_contrast_loss(f1, f2, l1, l2, bank, lab)
    official = directional_contrast_loss(f1, f2, l1, l2, bank, lab, official_numerics=True)
    assert abs(exact.item() - official.item()) < 5e-2
    sure = torch.tensor([[0.0, 5.0], [0.0, 5.0]])
    unsure = torch.zeros(2, 2)
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0]] * 10)
    labels = torch.ones(10, dtype=torch.long)       # the anchors' label is 0 (argmax of a tie)
    kw = dict(temperature=0.05)
    exact = directional_contrast_loss(e, -e, unsure, sure, bank, labels, **kw)
    official = directional_contrast_loss(e, -e, unsure, sure, bank, labels,
                                         official_numerics=True, **kw)
    want = -(-20.0 - math.log(math.exp(-20.0) + 10 * math.exp(20.0)))
    assert abs(exact.item() - want) < 1e-4 and exact.item() > 40
    assert abs(official.item() + math.log(1e-8)) < 1e-3
    bank = torch.cat([torch.tensor([[-1.0, 0.0]] * 8000), torch.tensor([[1.0, 0.0]])])
    labels = torch.ones(8001, dtype=torch.long)
    kw = dict(temperature=0.01)
    exact = directional_contrast_loss(-e, e, unsure, sure, bank, labels, **kw)
    official = directional_contrast_loss(-e, e, unsure, sure, bank, labels,
                                         official_numerics=True, **kw)
    assert torch.isfinite(exact) and not torch.isfinite(official)


@pytest.mark.parametrize("backend", ["reference", "native", TRITON])
def test_nothing_selected_is_connected_zero(backend):
    f1, f2, l1, l2, bank, lab = case(seed=6)
    loss, g1, g2 = run(backend, f1, f2, l1, l2, bank, lab, pos_threshold=0.999999)
    assert loss.item() == 0.0 and g1.abs().sum() == 0 and g2.abs().sum() == 0
    a = f1.clone().requires_grad_()
    out = directional_contrast_loss(a, f2, l1, l2, bank, lab, pos_threshold=0.999999,
                                    backend="native" if backend != "reference" else backend)
    assert out.requires_grad


BAD = [
    ("feat2 shape", dict(feat2=torch.zeros(3, 16, dtype=torch.float64)), ValueError, "feat2"),
    ("logits rows", dict(logits1=torch.zeros(3, 5)), ValueError, "logits1"),
    ("bank D", dict(negatives=torch.zeros(9, 4, dtype=torch.float64),
                    negative_labels=torch.zeros(9, dtype=torch.long)), ValueError, "negatives"),
    ("labels len", dict(negative_labels=torch.zeros(2, dtype=torch.long)), ValueError,
     "negative_labels"),
    ("labels dtype", dict(negative_labels=torch.zeros(300)), TypeError, "negative_labels"),
    ("threshold", dict(pos_threshold=1.5), ValueError, "pos_threshold"),
    ("reduction", dict(reduction="sum"), ValueError, "reduction"),
    ("official fused", dict(official_numerics=True, backend="native"), NotImplementedError,
     "official_numerics"),
]


@pytest.mark.parametrize("name,override,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_messages(name, override, exc, msg):
    f1, f2, l1, l2, bank, lab = case()
    kw = dict(feat1=f1, feat2=f2, logits1=l1, logits2=l2, negatives=bank, negative_labels=lab)
    kw.update(override)
    args = [kw.pop(k) for k in ("feat1", "feat2", "logits1", "logits2", "negatives",
                                "negative_labels")]
    with pytest.raises(exc, match=msg):
        directional_contrast_loss(*args, **kw)


# --- geometry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(375, 500, 320), (1024, 2048, 720), (200, 250, 320)])
def test_crops_geometry(size):
    """Offsets on the stride grid, IoU in bounds (or the fallback crop 2 = crop 1), boxes of
    equal size on the stride grid, mapping to the same image pixels, inside the unpadded image."""
    h, w, crop = size
    for seed in range(200):
        c = overlapping_crops(h, w, crop, seed=seed)
        assert c == overlapping_crops(h, w, crop, seed=seed)          # deterministic
        (y1, x1), (y2, x2) = c.origin1, c.origin2
        assert (y2 - y1) % 8 == 0 and (x2 - x1) % 8 == 0
        assert 0.1 <= c.iou <= 1.0
        t1, l1, b1, r1 = c.box1
        t2, l2, b2, r2 = c.box2
        assert all(v % 8 == 0 for v in c.box1 + c.box2)
        assert (b1 - t1, r1 - l1) == (b2 - t2, r2 - l2) and b1 > t1 and r1 > l1
        assert (y1 + t1, x1 + l1) == (y2 + t2, x2 + l2)                # same image pixel
        assert y1 + b1 <= max(h, crop) and x1 + r1 <= max(w, crop)
        assert y1 + b1 <= (h // 8) * 8 or h >= crop


def test_crops_fallback_and_errors():
    c = overlapping_crops(400, 400, 320, iou_bound=(0.99, 0.995), max_tries=3, seed=0)
    if c.origin1 != c.origin2:
        assert 0.99 <= c.iou <= 0.995
    else:
        assert c.iou == 1.0
    with pytest.raises(ValueError, match="multiple of stride"):
        overlapping_crops(400, 400, 321)
    with pytest.raises(ValueError, match="iou_bound"):
        overlapping_crops(400, 400, 320, iou_bound=(0.5, 0.2))


def test_overlap_rows_map_the_same_pixels_with_flips():
    """A coordinate image: each feature holds its image (row, col); after cutting, row j of
    both views holds the same image pixel, flips undone."""
    crop, stride = 64, 8
    for seed in range(20):
        c = overlapping_crops(100, 120, crop, stride=stride, seed=seed)
        maps, flips = [], [bool(seed % 2), bool(seed % 3 == 0)]
        for (oy, ox), flip in zip((c.origin1, c.origin2), flips):
            ys = torch.arange(0, crop, stride) + oy
            xs = torch.arange(0, crop, stride) + ox
            m = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).float()[None]
            maps.append(m.flip(-1) if flip else m)
        r1, r2 = overlap_rows(maps[0], maps[1], torch.tensor([c.box1]), torch.tensor([c.box2]),
                              torch.tensor([flips[0]]), torch.tensor([flips[1]]), stride=stride)
        assert r1.shape[0] > 0 and torch.equal(r1, r2)


# --- bank and module --------------------------------------------------------------------------
def test_negative_bank_keeps_last_steps_oldest_first():
    bank = NegativeBank(step_save=1)
    with pytest.raises(RuntimeError, match="empty"):
        bank.negatives()
    for step in range(3):
        f = torch.full((1, 4, 2, 3), float(step))
        bank.update(f, f + 0.5, torch.zeros(1, 2, 3, dtype=torch.long),
                    torch.ones(1, 2, 3, dtype=torch.long))
    feats, labels = bank.negatives()
    assert len(bank) == 2 and feats.shape == (24, 4)
    assert feats[:, 0].tolist() == [1.0] * 6 + [1.5] * 6 + [2.0] * 6 + [2.5] * 6
    assert labels.tolist() == ([0] * 6 + [1] * 6) * 2
    other = NegativeBank(step_save=5)
    other.load_state_dict(bank.state_dict())
    assert other.step_save == 1 and torch.equal(other.negatives()[0], feats)


def test_negative_bank_step_by_step_over_more_steps_than_it_keeps():
    """Six updates of a bank that keeps step_save + 1 = 3 steps, written out by hand: after
    update t the bank holds steps max(0, t - 2) .. t, oldest first; each step is view 1's rows
    then view 2's, a (B, D, h, w) map read in (b, y, x) order, each row with its own
    pseudo-label. With selected_num, each view keeps that many distinct rows of its own (rows
    and labels still paired), drawn afresh at each step and seed, the same for the same seed."""
    B, D, h, w = 2, 3, 2, 3
    P = B * h * w

    def view(step, v):                      # pixel (b, y, x) of view v at step: a unique id
        ids = 1000.0 * step + 100.0 * v + torch.arange(P, dtype=torch.float64)
        feat = ids.view(B, h, w)[:, None].expand(B, D, h, w) * torch.tensor([1.0, 2.0, 3.0],
                                                          dtype=torch.float64).view(1, D, 1, 1)
        return feat, (ids % 7).long().view(B, h, w)

    bank = NegativeBank(step_save=2)
    picked = NegativeBank(step_save=2, selected_num=4)
    kept = []
    for t in range(6):
        (f1, y1), (f2, y2) = view(t, 1), view(t, 2)
        bank.update(f1, f2, y1, y2)
        picked.update(f1, f2, y1, y2, seed=t % 2)
        kept = (kept + [t])[-3:]
        feats, labels = bank.negatives()
        ids = [1000.0 * s + 100.0 * v + p for s in kept for v in (1, 2) for p in range(P)]
        assert len(bank) == len(kept) and feats[:, 0].tolist() == ids, t
        assert torch.equal(feats, feats[:, :1] * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        assert labels.dtype == torch.int64 and labels.tolist() == [int(i) % 7 for i in ids], t
        pf, pl = picked.negatives()
        assert pf.shape == (len(kept) * 2 * 4, D) and len(picked) == len(kept)
        assert pl.tolist() == [int(i) % 7 for i in pf[:, 0].tolist()], t        # paired
        for j, s in enumerate(kept):                     # 4 distinct rows of its own view
            for v in (1, 2):
                block = pf[(2 * j + v - 1) * 4:(2 * j + v) * 4, 0].tolist()
                assert len(set(block)) == 4, (t, s, v)
                assert all(1000 * s + 100 * v <= i < 1000 * s + 100 * v + P for i in block)
    draws = [picked.entries[j][0][:4, 0] % 100 for j in range(3)]      # steps 3, 4, 5
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])  # seed 1, 0, 1
    first = picked.entries[-1][0][:, 0] % 100
    assert not torch.equal(first[:4], first[4:])                        # views draw apart


def test_negative_bank_subsample_and_validation():
    bank = NegativeBank(step_save=0, selected_num=4)
    f = torch.randn(1, 3, 2, 3)
    lab = torch.arange(6).view(1, 2, 3)
    bank.update(f, f, lab, lab, seed=1)
    feats, labels = bank.negatives()
    rows = f.permute(0, 2, 3, 1).reshape(6, 3)
    assert feats.shape == (8, 3) and len(set(labels[:4].tolist())) == 4
    assert torch.equal(feats[:4], rows[labels[:4]])                   # rows keep their labels
    before = [t.clone() for t in bank.negatives()]
    for bad in ((f, f, lab[:, :1], lab), (f, f[:, :2], lab, lab)):
        with pytest.raises((ValueError, TypeError)):
            bank.update(*bad)
        assert all(torch.equal(a, b) for a, b in zip(bank.negatives(), before))
    with pytest.raises(ValueError, match="selected_num"):
        NegativeBank(selected_num=10).update(f, f, lab, lab)


def test_module_end_to_end_backward():
    torch.manual_seed(0)
    crit, bank = DirectionalContrastLoss(16, 8, pos_threshold=0.3), NegativeBank(1)
    enc1 = torch.randn(2, 16, 8, 8, requires_grad=True)
    enc2 = torch.randn(2, 16, 8, 8, requires_grad=True)
    lg1, lg2 = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8) * 3
    crops = [overlapping_crops(80, 90, 64, seed=s) for s in range(2)]
    loss = crit(enc1, enc2, lg1, lg2, torch.tensor([c.box1 for c in crops]),
                torch.tensor([c.box2 for c in crops]), torch.tensor([True, False]),
                torch.tensor([False, True]), bank)
    loss.backward()
    assert loss.item() > 0 and enc1.grad.abs().sum() > 0 and enc2.grad.abs().sum() > 0
    assert len(bank) == 1 and bank.negatives()[0].shape == (2 * 2 * 64, 8)
    assert crit.weight == 0.1


def test_module_is_its_projector_then_the_functional_loss():
    """DirectionalContrastLoss by hand: the projector conv1x1 -> ReLU -> conv1x1 then L2 along
    channels; the bank updated with both full projected maps and their argmax pseudo-labels
    under the given seed; the overlap cut with each view's own flips; the loss keywords passed
    through; times weight."""
    torch.manual_seed(1)
    crit = DirectionalContrastLoss(6, 5, weight=0.3, pos_threshold=0.2, directional=False)
    enc1, enc2 = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    lg1, lg2 = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8) * 3
    crops = [overlapping_crops(80, 90, 64, seed=s) for s in range(2)]
    b1, b2 = torch.tensor([c.box1 for c in crops]), torch.tensor([c.box2 for c in crops])
    fl1, fl2 = torch.tensor([True, False]), torch.tensor([False, True])
    conv1, conv2 = crit.projector[0], crit.projector[2]

    def project(e):
        return F.normalize(conv2(torch.relu(conv1(e))), dim=1)

    p1, p2 = project(enc1), project(enc2)
    assert torch.equal(crit.project(enc1), p1)
    bank = NegativeBank(step_save=0, selected_num=50, cross_rank=False)
    got = crit(enc1, enc2, lg1, lg2, b1, b2, fl1, fl2, bank, seed=7)
    by_hand = NegativeBank(step_save=0, selected_num=50, cross_rank=False)
    by_hand.update(p1, p2, lg1.argmax(1), lg2.argmax(1), seed=7)
    for a, b in zip(bank.negatives(), by_hand.negatives()):
        assert torch.equal(a, b)
    (f1, g1), (f2, g2) = overlap_rows([p1, lg1], [p2, lg2], b1, b2, fl1, fl2, stride=8)
    want = 0.3 * directional_contrast_loss(f1, f2, g1, g2, *by_hand.negatives(),
                                           pos_threshold=0.2, directional=False)
    assert torch.equal(got, want)
    no = torch.tensor([False, False])
    for f1_, f2_ in ((no, fl2), (fl1, no)):         # each view's flips are read
        other = crit(enc1, enc2, lg1, lg2, b1, b2, f1_, f2_, by_hand, update_bank=False)
        assert not torch.equal(other, got)
    for bad in (-1, True, 1.0, "2"):
        with pytest.raises(ValueError, match="step_save must be an int >= 0"):
            NegativeBank(step_save=bad)


def test_negative_bank_takes_rows_and_names_its_arguments():
    """NegativeBank.update with (P, D) rows and (P,) labels keeps them as given; selected_num
    equal to the pixel count keeps every pixel; a label count that does not match names the
    labels of that view."""
    rows = torch.arange(12.0).view(6, 2)
    lab = torch.arange(6)
    bank = NegativeBank(step_save=0, selected_num=6, cross_rank=False)
    bank.update(rows, rows + 100, lab, lab + 10, seed=3)
    feats, labels = bank.negatives()
    assert sorted(feats[:6, 0].tolist()) == rows[:, 0].tolist()
    assert torch.equal(labels[:6], (feats[:6, 0] / 2).long())          # rows keep their label
    plain = NegativeBank(step_save=0, cross_rank=False)
    plain.update(rows, rows + 100, lab, lab + 10)
    assert torch.equal(plain.negatives()[0], torch.cat([rows, rows + 100]))
    for args, name in (((rows, rows, lab[:5], lab), "labels1"), ((rows, rows, lab, lab[:4]),
                                                                  "labels2")):
        with pytest.raises(ValueError, match=f"{name} must have one pseudo-label per pixel"):
            plain.update(*args)


def test_image_level_loss_by_hand():
    """The multi-label loss with 0/1 targets of any dtype (bool, int, float) is the mean BCE
    with logits, and a shape mismatch names the argument."""
    x1 = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    x2 = torch.tensor([[-2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([[1, 0], [0, 1]])
    bce = F.binary_cross_entropy_with_logits
    want = 0.5 * (bce(x1, y.float()) + bce(x2, y.float()))
    from pixcon.nn import image_level_loss
    for t in (y, y.bool(), y.float()):
        assert_close(image_level_loss(x1, x2, t), want, rtol=1e-6, atol=0, what=str(t.dtype))
    for args, name in (((x1, x2[:1], y), "logits2"), ((x1, x2, y[:, :1]), "targets")):
        with pytest.raises(ValueError, match=f"{name} must have logits1's shape"):
            image_level_loss(*args)


def _bank_worker(rank, world, init, out):
    import torch.distributed as dist

    from pixcon import distributed as pdist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        bank = NegativeBank(step_save=0)
        f = torch.full((1, 2, 2, 2), float(rank))
        lab = torch.full((1, 2, 2), rank, dtype=torch.long)
        bank.update(f, f + 10, lab, lab + 10)
        feats, labels = bank.negatives()
        torch.save((feats, labels), f"{out}.{rank}")
    finally:
        pdist.shutdown()


def test_negative_bank_all_gathers_across_ranks(tmp_path):
    """Two gloo processes: both hold the same bank, rank 0's rows first, then rank 1's."""
    import torch.multiprocessing as mp
    init = f"file://{tmp_path / 'init'}"
    out = str(tmp_path / "bank")
    mp.spawn(_bank_worker, args=(2, init, out), nprocs=2, join=True)
    b0, b1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert torch.equal(b0[0], b1[0]) and torch.equal(b0[1], b1[1])
    assert b0[0][:, 0].tolist() == [0.0] * 4 + [10.0] * 4 + [1.0] * 4 + [11.0] * 4
    assert b0[1].tolist() == [0] * 4 + [10] * 4 + [1] * 4 + [11] * 4


def test_module_cuts_the_overlap_at_its_own_stride():
    """DirectionalContrastLoss(stride=4) cuts the overlap of stride-4 maps at stride 4 (the
    overlap_rows default is 8): it equals the functional loss on rows cut at 4."""
    torch.manual_seed(2)
    crit = DirectionalContrastLoss(6, 5, stride=4, pos_threshold=0.2)
    enc1, enc2 = torch.randn(2, 6, 16, 16), torch.randn(2, 6, 16, 16)
    lg1, lg2 = torch.randn(2, 4, 16, 16) * 3, torch.randn(2, 4, 16, 16) * 3
    crops = [overlapping_crops(80, 90, 64, seed=s) for s in range(2)]
    b1, b2 = torch.tensor([c.box1 for c in crops]), torch.tensor([c.box2 for c in crops])
    fl = torch.tensor([False, True])
    bank = NegativeBank(step_save=0, cross_rank=False)
    got = crit(enc1, enc2, lg1, lg2, b1, b2, fl, fl, bank)
    p1, p2 = crit.project(enc1), crit.project(enc2)
    (f1, g1), (f2, g2) = overlap_rows([p1, lg1], [p2, lg2], b1, b2, fl, fl, stride=4)
    want = 0.1 * directional_contrast_loss(f1, f2, g1, g2, *bank.negatives(), pos_threshold=0.2)
    assert torch.equal(got, want)


def test_official_arithmetic_by_hand():
    """official_pixel_terms, one anchor by hand in float64 (specs/cac.md §6): m = max(pos, the
    logits), den = e^(pos - m) + the kept negatives' e^(s - m), the term
    -log(e^(pos - m) / (den + 1e-8) + 1e-8); negatives of the anchor's own label are not kept."""
    fa = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    ft = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    neg = torch.tensor([[0.0, 1.0], [0.8, 0.6], [1.0, 0.0]], dtype=torch.float64)
    yn = torch.tensor([1, 2, 0])
    got = ref.official_pixel_terms(fa, ft, torch.tensor([0]), neg, yn, 0.5)
    pos, s = 0.6 / 0.5, [0.8 / 0.5, (0.48 + 0.48) / 0.5]       # kept: labels 1 and 2
    m = max(pos, 0.8 / 0.5, 0.96 / 0.5, 0.6 / 0.5)
    den = math.exp(pos - m) + sum(math.exp(v - m) for v in s)
    want = -math.log(math.exp(pos - m) / (den + 1e-8) + 1e-8)
    assert abs(got.item() - want) <= 1e-14 * abs(want)
