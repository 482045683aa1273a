"""Every validation error starts with the op's name and names the argument (list elements by
their index), so a user reading a traceback from deep inside a trainer knows which call failed."""
import pytest
import torch

from pixcon import ops
from pixcon.nn import NegativeBank, PixelMemoryBank

E = torch.randn(2, 4, 6, 6)
L = torch.randint(0, 3, (2, 6, 6))
P = torch.softmax(torch.randn(2, 3, 6, 6), 1)
ROWS, RLAB = torch.randn(10, 4), torch.randint(0, 3, (10,))
IDX = torch.zeros(5, dtype=torch.long)

CASES = [
    ("reco_loss", "emb", lambda: ops.reco_loss(E[0], L, P)),
    ("reco_loss", "labels", lambda: ops.reco_loss(E, L.float(), P)),
    ("reco_loss", "probs", lambda: ops.reco_loss(E, L, P[:, :, :3])),
    ("reco_loss", "num_queries", lambda: ops.reco_loss(E, L, P, num_queries=0)),
    ("reco_loss", "temperature", lambda: ops.reco_loss(E, L, P, temperature=-1.0)),
    ("reco_loss", "mask", lambda: ops.reco_loss(E, L, P, mask=torch.full_like(L, 0.5,
                                                                            dtype=torch.float))),
    ("pixel_anchor_loss", "embs[1]", lambda: ops.pixel_anchor_loss([E, E[0]], L, P,
                                                                   layer_weights=(1, 1))),
    ("pixel_anchor_loss", "temperature", lambda: ops.pixel_anchor_loss([E], L, P,
                                                                       layer_weights=(1,),
                                                                       temperature=0.0)),
    ("bane_negatives", "labels", lambda: ops.bane_negatives(L.float(), L, 3)),
    ("bane_negatives", "num_classes", lambda: ops.bane_negatives(L, L, 0)),
    ("distance_transform", "x", lambda: ops.distance_transform(torch.rand(4, 4))),
    ("distance_transform", "background", lambda: ops.distance_transform(L, labels=True,
                                                                        background=0.5)),
    ("pixel_contrast_loss", "emb", lambda: ops.pixel_contrast_loss(E[0], L, L)),
    ("pixel_contrast_loss", "max_samples", lambda: ops.pixel_contrast_loss(E, L, L,
                                                                           max_samples=0)),
    ("dense_contrast_loss", "emb", lambda: ops.dense_contrast_loss(E[0], L)),
    ("dense_contrast_loss", "temperature", lambda: ops.dense_contrast_loss(E, L,
                                                                           temperature=0)),
    ("directional_contrast_loss", "feat1", lambda: ops.directional_contrast_loss(
        E, ROWS, ROWS, ROWS, ROWS, RLAB)),
    ("class_means", "emb", lambda: ops.class_means(L, RLAB, 3)),
    ("class_means", "labels", lambda: ops.class_means(ROWS, RLAB[:4], 3)),
    ("class_means", "num_classes", lambda: ops.class_means(ROWS, RLAB, 0)),
    ("sample_hard_queries", "hard", lambda: ops.sample_hard_queries(RLAB, RLAB, 3, 4, 0)),
    ("sample_negatives", "cdf", lambda: ops.sample_negatives(RLAB, torch.zeros(3, 2).long(),
                                                             RLAB, 4, 0)),
    ("sparse_infonce", "neg_idx", lambda: ops.sparse_infonce(ROWS, IDX, IDX, IDX,
                                                             temperature=0.5)),
    ("supervised_contrast", "anchors", lambda: ops.supervised_contrast(E, RLAB,
                                                                       temperature=0.1)),
    ("negative_logsumexp", "key_labels", lambda: ops.negative_logsumexp(
        ROWS, RLAB, ROWS, ROWS, temperature=0.1)),
    ("PixelMemoryBank", "num_classes", lambda: PixelMemoryBank(0)),
    ("PixelMemoryBank.update", "keys", lambda: PixelMemoryBank(3, dim=4).update(E[0], L)),
    ("NegativeBank", "selected_num", lambda: NegativeBank(1, selected_num=0)),
]


@pytest.mark.parametrize("op,argument,call", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_message_names_op_and_argument(op, argument, call):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    msg = str(err.value)
    assert msg.startswith(f"{op}: "), msg
    assert argument in msg, msg


def test_a_loss_that_selected_nothing_says_which_setting_once(monkeypatch):
    """Issue 31 item 4: pixel_contrast_loss on maps too small for max_views, CAC on an untrained
    network (nothing above pos_threshold): an exact 0, and one SelectedNothingWarning naming
    the setting, once per process; silenceable by category."""
    import warnings

    import pixcon
    from pixcon.ops import _common, directional_contrast_loss, pixel_contrast_loss
    monkeypatch.setattr(_common, "_WARNED", set())
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 8, 17, 17, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (2, 17, 17), generator=g)
    with pytest.warns(pixcon.SelectedNothingWarning, match="max_views=100") as rec:
        loss = pixel_contrast_loss(emb, labels, labels, seed=0)
    assert loss.item() == 0 and len(rec) == 1 and "17x17" in str(rec[0].message)
    assert rec[0].filename == __file__                  # it points at the caller's line
    monkeypatch.setattr(_common, "_WARNED", set())      # the reference says the same, here too
    with pytest.warns(pixcon.SelectedNothingWarning, match="max_views=100") as rec:
        pixel_contrast_loss(emb, labels, labels, seed=0, backend="reference")
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # once per process: silent now
        pixel_contrast_loss(emb, labels, labels, seed=0)
        pixel_contrast_loss(emb, labels, labels, seed=0, max_views=10)   # selects: no warning
    f1 = torch.randn(30, 8, generator=g, requires_grad=True)
    f2 = torch.randn(30, 8, generator=g)
    flat = torch.zeros(30, 5)                          # uniform predictions: confidence 0.2
    bank, blab = torch.randn(40, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    with pytest.warns(pixcon.SelectedNothingWarning, match="pos_threshold=0.75"):
        loss = directional_contrast_loss(f1, f2, flat, flat, bank, blab)
    assert loss.item() == 0
    monkeypatch.setattr(_common, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=pixcon.SelectedNothingWarning)
        directional_contrast_loss(f1, f2, flat, flat, bank, blab)      # silenced by category


def test_reco_and_u2pl_say_which_setting_selected_nothing(monkeypatch):
    """Issue 31 item 4, its other two losses: ReCo on a confident network (every labelled
    pixel's own-class probability at or above strong_threshold: no hard query) and U2PL on an
    untrained teacher (no reliable pixel above anchor_threshold): an exact 0 and one warning
    naming the setting; a setting that selects something is silent."""
    import warnings

    import pixcon
    from pixcon.nn import UnreliableBank
    from pixcon.ops import _common, reco_loss, u2pl_loss, u2pl_masks
    monkeypatch.setattr(_common, "_WARNED", set())
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 8, 6, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    sure = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 0.999 + 0.0003
    with pytest.warns(pixcon.SelectedNothingWarning, match="strong_threshold=0.97"):
        loss = reco_loss(emb, labels, sure, num_queries=4, num_negatives=8, seed=0)
    assert loss.item() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = reco_loss(emb, labels, sure, num_queries=4, num_negatives=8, seed=0,
                         strong_threshold=1.0)        # every pixel below 1: hard, no warning
    assert loss.item() > 0
    flat = torch.full((2, 3, 6, 6), 1 / 3)               # an untrained teacher
    rel, unrel = u2pl_masks(flat, labels, 1, 20.0)
    bank = UnreliableBank(3, 8, size=10)
    with pytest.warns(pixcon.SelectedNothingWarning, match="anchor_threshold=0.5"):
        loss = u2pl_loss(emb, labels, flat, emb.detach(), bank, num_labeled=1, reliable=rel,
                         unreliable=unrel, anchor_threshold=0.5, num_queries=4,
                         num_negatives=3, seed=0)
    assert loss.item() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u2pl_loss(emb, labels, flat, emb.detach(), bank, num_labeled=1, reliable=rel,
                  unreliable=unrel, anchor_threshold=0.3, num_queries=4, num_negatives=3,
                  seed=0)                              # 1/3 > 0.3: anchors exist
