"""The rules of specs/reco.md §1-3 that decide a value, each pinned by a constructed case where
the plausible alternative reading gives a different answer. Shared helpers (used by the
reference and the fused paths alike, so parity cannot see a mistake in them) are tested against
hand-computed values; whole losses run on every backend."""
import math

import pytest
import torch
import torch.nn.functional as F

import pixcon
from pixcon.ops import reco_loss, sample_hard_queries
from pixcon.reference import common as cm
from pixcon.reference.rng import STREAM_QUERY, philox4x32

from .conftest import triton_device

DEV = triton_device()
BACKENDS = ["reference",
            pytest.param("native", marks=pytest.mark.skipif(not pixcon.HAS_C, reason="not built")),
            pytest.param("triton", marks=pytest.mark.interpret)]


def _dev(backend):
    return DEV if backend == "triton" else torch.device("cpu")


# --- the hard-pixel rule: the own label's probability, strictly below the threshold --------
def test_hard_pixels_by_hand():
    thr = 179 / 255                              # a k/255 value: the quantised confidence grid
    probs = torch.tensor([
        [0.50, 0.45, 0.05],    # label 0: own 0.50 < thr                           -> hard
        [0.98, 0.01, 0.01],    # label 1: own 0.01 < thr, but the maximum 0.98 >= thr -> hard
        [0.98, 0.01, 0.01],    # label 0: own 0.98                                 -> easy
        [thr, 1 - thr, 0.0],   # label 0: own exactly at the threshold (not below) -> easy
        [0.10, 0.10, 0.80],    # ignored (label -1)                                -> never hard
    ], dtype=torch.float32).T.reshape(1, 3, 1, 5)
    lab = torch.tensor([0, 1, 0, 0, -1])
    assert cm.hard_pixels(probs, lab, thr).tolist() == [True, True, False, False, False]
    assert cm.own_class_prob(probs, lab)[:4].tolist() == pytest.approx([0.5, 0.01, 0.98, thr])


def _three_classes(own_prob_of_class2, other_prob_of_class2):
    """Orthogonal one-hot embeddings (every cosine across classes 0, the loss of a query is
    log(1 + N e^-2) whatever is drawn); classes 0, 1 hard (every probability 0.25); class 2's
    own probability and class 0's probability at class 2's pixels as given."""
    B, h, w, C = 2, 4, 6, 3
    labels = (torch.arange(h * w).reshape(h, w) % C).expand(B, h, w).clone()
    emb = F.one_hot(labels, C).permute(0, 3, 1, 2).float() * 3.0
    probs = torch.full((B, C, h, w), 0.25)
    is2 = labels == 2
    probs[:, 2] = torch.where(is2, own_prob_of_class2, probs[:, 2])
    probs[:, 0] = torch.where(is2, other_prob_of_class2, probs[:, 0])
    return emb, labels, probs


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_rule_in_the_whole_loss(backend):
    """Class 2 with own probability 0.01 and maximum 0.98 is hard (it contributes: loss = L);
    with own probability exactly 0.5 = the threshold it is not (contributes 0, still counts in
    K = 3: loss = 2/3 L)."""
    N, d = 4, _dev(backend)
    full = math.log(1 + N * math.exp(-2))
    kw = dict(num_queries=5, num_negatives=N, seed=3, backend=backend)
    for own, other, strong, expected in ((0.01, 0.98, 0.97, full), (0.5, 0.25, 0.5, 2 / 3 * full)):
        emb, labels, probs = _three_classes(own, other)
        loss = reco_loss(emb.to(d), labels.to(d), probs.to(d), strong_threshold=strong, **kw)
        assert loss.item() == pytest.approx(expected, abs=1e-5), (own, strong)


# --- the query sampler: independent classes, with replacement, the documented counters -------
@pytest.mark.parametrize("backend", BACKENDS)
def test_query_draws_follow_the_counter_contract(backend):
    """Query (c, q) = the hard pixels of c in ascending order, at index uniform_index(word 0 of
    philox(c*Q + q, seed, STREAM_QUERY), n_c) (docs/design.md §3): computed here from the pinned
    Philox, for every class, on every backend."""
    C, Q, seed = 3, 50, 12345
    lab = torch.arange(60) % C
    hard = torch.ones(60, dtype=torch.bool)
    hard[lab == 2] = torch.arange(20) < 7                         # class 2: 7 hard pixels
    d = _dev(backend)
    got = sample_hard_queries(lab.to(d), hard.to(d), C, Q, seed, backend=backend).cpu().long()
    for c in range(C):
        pix = torch.nonzero(hard & (lab == c))[:, 0]
        r = philox4x32(c * Q + torch.arange(Q), seed, STREAM_QUERY)[:, 0]
        assert torch.equal(got[c], pix[(r * len(pix)) >> 32]), c


def test_query_draws_of_classes_are_independent():
    """Two classes with the same number of hard pixels, interleaved: with shared counters their
    queries would be the same positions within each class (probability (1/n)^Q otherwise)."""
    C, Q = 2, 16
    lab = torch.arange(40) % C
    q = sample_hard_queries(lab, torch.ones(40, dtype=torch.bool), C, Q, 7, backend="reference")
    assert not torch.equal(q[0] // 2, q[1] // 2)


def test_query_draws_are_with_replacement_and_two_sided_uniform():
    """n_c = 40 hard pixels: Q = 40 draws with replacement repeat a pixel (all distinct has
    probability 40!/40^40 < 1e-15); Q = 20000: chi-square inside its two-sided 0.1% band
    (39 dof: 17.26 .. 72.05), so a too-even (cycling, stratified) sampler fails too."""
    C = 3
    lab = torch.arange(200) % C
    hard = torch.zeros(200, dtype=torch.bool)
    hard[(lab == 1).nonzero()[:40, 0]] = True
    few = sample_hard_queries(lab, hard, C, 40, 11, backend="reference")[1]
    assert len(torch.unique(few)) < 40
    many = sample_hard_queries(lab, hard, C, 20000, 11, backend="reference")[1].long()
    counts = torch.bincount(many, minlength=200)[hard].double()
    chi2 = ((counts - 500) ** 2 / 500).sum().item()
    assert 17.26 < chi2 < 72.05


# --- labels at feature resolution: ATen's nearest index mapping ------------------------------
@pytest.mark.parametrize("n_in,n_out,expected", [
    (321, 81, [0, 3, 7, 11, 15]),            # the VOC crop at stride 4 (specs/reco.md §1.1)
    (10, 4, [0, 2, 5, 7]),                   # floor(dst * 2.5); nearest-exact gives 1, 3, 6, 8
    (5, 3, [0, 1, 3]),
    (7, 3, [0, 2, 4]),
    (3, 7, [0, 0, 0, 1, 1, 2, 2]),           # upsampling
    (8, 16, [0, 0, 1, 1, 2, 2, 3, 3]),       # exactly twice
])
def test_nearest_indices_by_hand(n_in, n_out, expected):
    got = cm.nearest_indices(n_in, n_out).tolist()
    assert got[:len(expected)] == expected
    x = torch.arange(n_in, dtype=torch.float32)[None, None]
    assert got == F.interpolate(x, size=n_out, mode="nearest")[0, 0].long().tolist()


def _aten_nearest(n_in, n_out):
    x = torch.arange(n_in, dtype=torch.float32)[None, None]
    return F.interpolate(x, size=n_out, mode="nearest")[0, 0].long()


def test_nearest_indices_equal_aten_over_a_sweep_of_sizes():
    """Every in -> out size from 1 to 96 both ways (a rounding rule that agrees at the common
    strides, e.g. 26 -> 22 or 60 -> 44, differs somewhere here), plus the papers' crops at their
    strides (VOC 321 and 513, Cityscapes 769 and 1024, ADE 512, 4 / 8 / 16 / 32)."""
    pairs = [(i, o) for i in range(1, 97) for o in range(1, 97)]
    pairs += [(n, -(-n // s)) for n in (321, 513, 769, 1024, 512) for s in (4, 8, 16, 32)]
    pairs += [(n, n // s) for n in (321, 513, 769, 1024, 512) for s in (4, 8, 16, 32)]
    bad = [(i, o) for i, o in pairs if not torch.equal(cm.nearest_indices(i, o),
                                                       _aten_nearest(i, o))]
    assert not bad, bad[:10]


@pytest.mark.parametrize("size", [(26, 22), (60, 44), (33, 65), (17, 5), (81, 81), (7, 129)])
def test_every_label_resize_is_atens_nearest(size):
    """resize_nearest (the losses' labels and masks), pixel_labels and the figures' labels_at
    give exactly F.interpolate(mode="nearest") on random label maps, down and up."""
    from pixcon.viz.common import labels_at
    g = torch.Generator().manual_seed(sum(size))
    labels = torch.randint(0, 7, (2, 50, 37), generator=g)
    labels[labels == 6] = 255
    want = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    assert torch.equal(cm.resize_nearest(labels, size), want)
    assert torch.equal(cm.pixel_labels(labels, size, 6, 255),
                       torch.where(want == 255, -1, want).reshape(-1))
    assert torch.equal(labels_at(labels, size, 6), torch.where(want == 255, -1, want))


def test_labels_downsample_with_the_same_mapping_in_the_loss():
    """pixel_labels (shared by every backend) picks rows/columns floor(i * H/h): a 10 x 10 label
    map whose value is its row index, at 4 x 4, reads rows 0, 2, 5, 7."""
    labels = torch.arange(10)[None, :, None].expand(1, 10, 10)
    lab = cm.pixel_labels(labels, (4, 4), num_classes=10, ignore_index=255).view(4, 4)
    assert lab[:, 0].tolist() == [0, 2, 5, 7]
