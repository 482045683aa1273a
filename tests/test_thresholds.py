"""Every threshold on both sides of equality (issue 33): a comparison that is strict in the
official code stays strict, one ULP either side of the threshold decides, in float32 and
float64. The fused paths share these steps (pixcon.core), so a flip here is a flip everywhere;
the loss-level tests elsewhere check they are used."""
import math

import pytest
import torch

from pixcon.core import cac as ccac
from pixcon.core import common as cm
from pixcon.core import u2pl as cu2pl


def _around(t, dtype):
    """(just below, exactly, just above) threshold t, as ``dtype`` values."""
    x = torch.tensor(t, dtype=dtype)
    return (torch.nextafter(x, torch.tensor(-math.inf, dtype=dtype)), x,
            torch.nextafter(x, torch.tensor(math.inf, dtype=dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reco_hard_is_strictly_below_the_strong_threshold(dtype):
    """Official ``prob < strong_threshold`` (the paper writes <=): a pixel exactly at 0.97 is
    not hard, one ULP below is. Compared in the probabilities' own precision."""
    t = 0.97
    below, at, above = _around(t, dtype)
    probs = torch.zeros(1, 2, 1, 3, dtype=dtype)
    probs[0, 0, 0] = torch.stack([below, at, above])
    probs[0, 1, 0] = 1 - probs[0, 0, 0]
    lab = torch.zeros(3, dtype=torch.int64)
    assert cm.hard_pixels(probs, lab, t).tolist() == [True, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cac_targets_strictly_above_gamma_and_strictly_more_confident(dtype):
    """D1 = [c2 > gamma][c1 < c2]: the target at gamma is not confident; equal confidences pull
    neither view; each switch drops only its own condition."""
    g = 0.75
    below, at, above = _around(g, dtype)
    c_target = torch.stack([below, at, above, above])
    c_anchor = torch.stack([below * 0.5, at * 0.5, above * 0.5, above])      # last: a tie
    assert ccac.directional_mask(c_anchor, c_target, g).tolist() == [False, False, True, False]
    assert ccac.directional_mask(c_anchor, c_target, g, directional=False).tolist() == \
        [False, False, True, True]
    assert ccac.directional_mask(c_anchor, c_target, g, positive_filtering=False).tolist() == \
        [True, True, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_u2pl_anchors_strictly_above_and_negatives_strictly_below(dtype):
    """Anchors: reliable, labelled class, prob > anchor_threshold (0.3); negatives: prob <
    negative_threshold (1.0), unreliable, the rank window. Values one ULP either side."""
    a_t = 0.3
    below, at, above = _around(a_t, dtype)
    P = 3
    prob = torch.stack([torch.stack([p, 1 - p]) for p in (below, at, above)])
    gt = torch.zeros(P, dtype=torch.int64)
    reliable = torch.ones(P, dtype=torch.bool)
    unreliable = torch.ones(P, dtype=torch.bool)
    kw = dict(low_rank=0, high_rank=2, anchor_threshold=a_t, negative_threshold=1.0,
              official=False)
    _, anchors, _ = cu2pl.class_masks(gt, prob, reliable, unreliable, 1, P, **kw)
    assert anchors[:, 0].tolist() == [False, False, True]
    # negatives: for a labelled pixel, a class other than its own among its top low_rank
    # (here class 1, ranked first), whose prob is below negative_threshold (0.7 here)
    n_t = 0.7
    q = torch.stack(_around(n_t, dtype))
    prob = torch.stack([1 - q, q], dim=1)
    _, _, neg = cu2pl.class_masks(gt, prob, reliable, unreliable, 1, P,
                                  **{**kw, "low_rank": 2, "negative_threshold": n_t})
    assert neg[:, 1].tolist() == [True, False, False]
