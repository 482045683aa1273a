"""The small validation gaps a new user met (issue 31 item 5): each now a clear error naming
the op and the argument, at the point where the mistake is made."""
import subprocess
import sys

import pytest
import torch

from pixcon import nn, ops
from pixcon.synthetic import reco_batch


def test_reco_module_rejects_bad_settings_at_construction():
    for kw, name in ((dict(num_queries=0), "num_queries"), (dict(num_negatives=-1),
                     "num_negatives"), (dict(temperature=0.0), "temperature"),
                     (dict(strong_threshold=float("nan")), "strong_threshold")):
        with pytest.raises(ValueError, match=f"ReCoLoss: {name}"):
            nn.ReCoLoss(**kw)
    nn.ReCoLoss(num_queries=4)                        # a valid one constructs


def test_negative_layer_weights_are_an_error():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (1, 8, 8), generator=g)
    embs = [torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 4, generator=g)]
    logits = torch.randn(1, 3, 8, 8, generator=g)
    for bad in ((-0.1, 1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="pixel_anchor_loss: layer_weights"):
            ops.pixel_anchor_loss(embs, labels, logits, layer_weights=bad)
    with pytest.raises(ValueError, match="w_low"):
        ops.pixel_anchor_loss(embs, labels, logits, layer_weights=(0.5, 1.0), w_low=float("nan"))


def test_seed_errors_name_the_op():
    emb, labels, probs = reco_batch(1, 4, 5, 5, num_classes=3, present=3, seed=0)
    with pytest.raises(ValueError, match=r"reco_loss: seed must be in \[0, 2\^63\)"):
        ops.reco_loss(emb, labels, probs, seed=-1)
    with pytest.raises(TypeError, match="pixel_contrast_loss: seed must be an int"):
        ops.pixel_contrast_loss(emb, labels, labels, seed=1.5)
    bank = nn.PixelMemoryBank(3, 4, memory_size=8, pixel_update_freq=2)
    with pytest.raises(ValueError, match="PixelMemoryBank.update: seed"):
        bank.update(emb, labels, seed=2**63)


def test_a_mask_at_a_third_resolution_is_an_error():
    emb, labels, probs = reco_batch(1, 4, 5, 5, num_classes=3, present=3, seed=0)
    big = torch.nn.functional.interpolate(labels[:, None].float(), size=(13, 13))[:, 0].long()
    ops.reco_loss(emb, big, probs, mask=torch.ones(1, 13, 13, dtype=torch.bool))   # labels'
    ops.reco_loss(emb, big, probs, mask=torch.ones(1, 5, 5, dtype=torch.bool))     # emb's
    with pytest.raises(ValueError, match=r"reco_loss: mask spatial size \(7, 7\) must be the "
                                         r"labels' \(13, 13\) or emb's \(5, 5\)"):
        ops.reco_loss(emb, big, probs, mask=torch.ones(1, 7, 7, dtype=torch.bool))


def test_flags_do_not_claim_a_default_in_help():
    out = subprocess.run([sys.executable, "-m", "pixcon.train", "run", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    text = " ".join(out.split())
    assert "--no-figures" in text and "relation, dendrogram) (default" not in text
    assert "--memory-size" in text and "(default: 500)" in text
