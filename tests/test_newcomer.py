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


# --- every integer label dtype (issue 31 item 1) ----------------------------------------------
def _label_dtype_runs(cast):
    """Every loss and bank on the smoke cases' inputs with the labels cast by ``cast``."""
    from pixcon.nn import NegativeBank, PixelMemoryBank, UnreliableBank
    from tools import smoke
    cpu = torch.device("cpu")
    r, cs, cx = smoke._reco_make(cpu, 0), smoke._cs_make(cpu, 0), smoke._contextrast_make(cpu, 0)
    cac, u = smoke._cac_make(cpu, 0), smoke._u2pl_make(cpu, 0)
    out = {
        "reco": ops.reco_loss(r["emb"], cast(r["labels"]), r["probs"], num_queries=8,
                              num_negatives=16, seed=5),
        "pixel_contrast": ops.pixel_contrast_loss(cs["emb"], cast(cs["labels"]),
                                                  cast(cs["pred"]), max_samples=40,
                                                  max_views=6, seed=3),
        "dense": ops.dense_contrast_loss(cs["emb"], cast(cs["labels"])),
        "pixel_anchor": ops.pixel_anchor_loss(cx["embs"], cast(cx["labels"]), cx["logits"],
                                              layer_weights=(0.3, 1.0)),
        "bane": ops.bane_negatives(cast(cx["labels"]), cx["logits"], 5)[0],
        "cac": ops.directional_contrast_loss(cac["f1"], cac["f2"], cac["l1"], cac["l2"],
                                             cac["bank"], cast(cac["lab"])),
    }
    bank = UnreliableBank(5, 8, size=12)
    for step in range(2):
        out[f"u2pl{step}"] = ops.u2pl_loss(u["emb"], cast(u["labels"]), u["probs"], u["temb"],
                                           bank, num_labeled=2, reliable=u["rel"],
                                           unreliable=u["unrel"], num_queries=6,
                                           num_negatives=4, seed=step)
    out["u2pl_bank"] = bank.keys.clone()
    torch.manual_seed(0)                          # the bank's random initial queues
    memory = PixelMemoryBank(5, dim=16, memory_size=8, pixel_update_freq=3)
    memory.update(cs["emb"], cast(cs["labels"]), seed=2)
    out.update({f"memory.{k}": v for k, v in memory.state_dict().items()})
    neg = NegativeBank(step_save=1)
    neg.update(cs["emb"], cs["emb"], cast(cs["pred"]), cast(cs["pred"]), seed=4)
    feats, labels = neg.negatives()
    out["negative_bank"], out["negative_labels"] = feats, labels.to(torch.int64)
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_every_loss_and_bank_takes_any_integer_label_dtype(dtype):
    """PNG masks load as uint8: every loss and bank gives the same values for uint8, int16,
    int32 and int64 labels (ignore 255 included)."""
    want = _label_dtype_runs(lambda y: y)
    got = _label_dtype_runs(lambda y: y.to(dtype))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_banks_reject_a_label_outside_their_classes_before_writing():
    """A label neither a class nor ignore_index is an error, and nothing was written."""
    from pixcon.nn import PixelMemoryBank
    from tools import smoke
    cs = smoke._cs_make(torch.device("cpu"), 0)
    bank = PixelMemoryBank(5, dim=16, memory_size=8, pixel_update_freq=3)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    for bad in (7, -3):
        labels = cs["labels"].clone()
        labels[1, 2, 3] = bad
        with pytest.raises(ValueError, match="PixelMemoryBank.update: labels"):
            bank.update(cs["emb"], labels, seed=1)
        assert all(torch.equal(v, bank.state_dict()[k]) for k, v in before.items())
    labels = cs["labels"].clone().to(torch.uint8)            # 255 = ignore_index: fine
    bank.update(cs["emb"], labels, seed=1)
