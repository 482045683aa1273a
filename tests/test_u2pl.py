"""U2PL (specs/u2pl.md): the official label_onehot's behaviour, the queue bank, and the loss
against a per-class restatement of the official function on the same samples; degenerate
batches, gradients only at anchors, float64 gradcheck, masks like train_semi.py, clear errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pixcon
from pixcon.nn import UnreliableBank
from pixcon.ops import u2pl_loss, u2pl_masks, u2pl_unsupervised_loss
from pixcon.ops import primitives as prim
from pixcon.reference import common as cm
from pixcon.reference import u2pl as ref

from .conftest import assert_close, triton_device

FUSED = [pytest.param("triton", marks=pytest.mark.interpret),
         pytest.param("native", marks=pytest.mark.skipif(not pixcon.HAS_C, reason="not built"))]


def batch(B=4, D=8, h=6, w=7, C=5, L=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, h, w, generator=g, dtype=dtype)
    temb = torch.randn(B, D, h, w, generator=g, dtype=dtype)
    probs = (3 * torch.randn(B, C, h, w, generator=g)).softmax(1).to(dtype)
    labels = torch.randint(0, C, (B, h, w), generator=g)
    labels[0, 0] = 255
    labels[L:] = probs[L:].argmax(1)
    rel, unrel = u2pl_masks(probs, labels, L, 20.0)
    return emb, temb, probs, labels, rel, unrel


def test_official_onehot_writes_every_image_into_image_0():
    """The issue's (2, 2, 2) example: image 0 gets the union, image 1 nothing."""
    gt = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [0, 1]]])
    oh = ref.official_onehot(gt, 3)
    assert oh[1].sum() == 0
    got = {(y, x): sorted(oh[0, :, y, x].nonzero()[:, 0].tolist()) for y in (0, 1) for x in (0, 1)}
    assert got == {(0, 0): [0, 2], (0, 1): [1, 2], (1, 0): [0, 1], (1, 1): [1]}
    # one image: the correct one-hot; image 0's ignored pixel cleared, another's maps to 0
    assert torch.equal(ref.official_onehot(gt[:1], 3)[0].permute(1, 2, 0),
                       F.one_hot(gt[0], 3).bool())
    ign = torch.tensor([[[-1, 1]], [[-1, -1]]])
    oh = ref.official_onehot(ign, 3)
    assert oh[0, :, 0, 0].sum() == 0 and oh[0, :, 0, 1].tolist() == [True, True, False]


def test_bank_keeps_the_newest_rows_per_class():
    bank = UnreliableBank(3, 2, sizes=(4, 2, 3))
    rows = torch.arange(10.0)[:, None].repeat(1, 2)                      # row p = (p, p)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :6] = True                  # 6 rows into a queue of 4: the newest 4 (2..5) stay
    mask[1, [1, 7]] = True              # a row may go to several queues
    mask[2, 9] = True
    bank.push(rows, mask)
    assert bank.counts.tolist() == [4, 2, 1] and bank.ptr.tolist() == [0, 0, 1]
    q0 = bank.keys[0:4, 0].tolist()
    assert sorted(q0) == [2, 3, 4, 5]
    assert bank.keys[4:6, 0].tolist() == [1, 7] and bank.keys[6, 0] == 9
    bank.push(rows[:1] + 100, torch.tensor([[True], [False], [True]]))   # the ring wraps
    assert sorted(bank.keys[0:4, 0].tolist()) == [3, 4, 5, 100]
    assert bank.counts.tolist() == [4, 2, 2] and bank.keys[7, 0] == 100
    state = bank.state_dict()
    other = UnreliableBank(3, 2, sizes=(4, 2, 3))
    other.load_state_dict(state)
    assert torch.equal(other.keys, bank.keys) and torch.equal(other.ptr, bank.ptr)


def test_bank_queues_step_by_step_with_absent_classes_and_overflow():
    """Five pushes into rings of sizes (4, 2, 3, 5), written out by hand: class c's rows pushed
    at one call, in row order, are L; the newest min(len L, size) of them go to slots ptr,
    ptr + 1, ... (mod size), the pointer advances by that many, the count is capped at the
    size. A class absent from a push keeps every slot, its pointer and its count. Row values
    are unique ids, so every slot is compared exactly, rows given as (P, D) and as maps."""
    sizes, D = (4, 2, 3, 5), 3
    bank = UnreliableBank(4, D, sizes=sizes)
    model = [[0.0] * s for s in sizes]
    ptr, count = [0] * 4, [0] * 4
    pushes = [   # per push: class -> the rows (of 6) it takes; absent classes take none
        {0: [0, 1, 2], 1: [0, 3, 4, 5], 3: [1]},            # class 1 overflows (4 rows, size 2)
        {0: [5], 2: [2, 3]},                                 # class 1 and 3 absent
        {0: [0, 1, 2, 3, 4, 5], 2: [0, 1]},                  # class 0: 6 rows into 4, class 2 wraps
        {},                                                  # nothing: nothing moves
        {1: [2], 3: [0, 1, 2, 3, 4, 5]},                     # class 3 wraps past its size
    ]
    for step, take in enumerate(pushes):
        vals = 100.0 * (step + 1) + torch.arange(6.0)        # row p's id: 100 (step + 1) + p
        rows = vals[:, None] * torch.tensor([1.0, -1.0, 0.5])
        mask = torch.zeros(4, 6, dtype=torch.bool)
        for c, ps in take.items():
            mask[c, ps] = True
        if step % 2:                                         # (B, D, HW) maps: 2 images of 3
            bank.push(rows.view(2, 3, D).permute(0, 2, 1), mask)
        else:
            bank.push(rows, mask)
        for c, s in enumerate(sizes):
            L = [float(vals[p]) for p in take.get(c, [])]
            kept = L[-s:]
            for j, v in enumerate(kept):
                model[c][(ptr[c] + j) % s] = v
            ptr[c] = (ptr[c] + len(kept)) % s
            count[c] = min(count[c] + len(L), s)
        assert bank.ptr.dtype == bank.counts.dtype == torch.int64
        assert bank.ptr.tolist() == ptr, step
        assert bank.counts.tolist() == count, step
        flat = [v for q in model for v in q]
        assert bank.keys[:, 0].tolist() == flat, step
        assert torch.equal(bank.keys, torch.tensor(flat)[:, None] * torch.tensor([1.0, -1.0, 0.5]))
        order, offsets, counts = bank.slots()
        assert offsets.tolist() == [0, 4, 6, 9] and torch.equal(counts, bank.counts)
    assert model == [[302.0, 303.0, 304.0, 305.0], [502.0, 105.0], [301.0, 203.0, 300.0],
                     [505.0, 501.0, 502.0, 503.0, 504.0]]


def test_bank_validates_before_writing():
    bank = UnreliableBank(3, 2, size=4)
    before = bank.keys.clone()
    with pytest.raises(ValueError, match="D = 5"):
        bank.push(torch.zeros(4, 5), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \(C, P\)"):
        bank.push(torch.zeros(4, 2), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        bad = torch.zeros(4, 2)
        bad[1] = float("nan")
        bank.push(bad, torch.ones(3, 4, dtype=torch.bool), check_values=True)
    assert torch.equal(bank.keys, before) and bank.counts.sum() == 0


def official_restatement(emb, temb, probs, gt, rel, unrel, L, bank_keys, a_idx, neg_idx, *,
                         Q, t=0.5, dp=0.3, dn=1.0, rl=3, rh=20):
    """The official per-class loop (specs/u2pl.md §2) on given samples: anchors a_idx (C, Q)
    pixel indices, negatives neg_idx (C, Q, N) rows of the (already pushed) bank."""
    B, D, h, w = emb.shape
    C = probs.shape[1]
    rep = emb.permute(0, 2, 3, 1).reshape(-1, D)
    trep = temb.permute(0, 2, 3, 1).reshape(-1, D)
    g = gt.view(B, h, w)
    onehot = torch.cat([ref.official_onehot(g[:L], C), ref.official_onehot(g[L:], C)])
    low_valid = onehot * rel.view(B, 1, h, w)
    loss, n_valid = 0.0, 0
    for c in range(C):
        lv = low_valid[:, c].reshape(-1)
        if lv.sum() == 0:
            continue
        n_valid += 1
        cand = (probs[:, c].reshape(-1) > dp) & lv
        if cand.sum() == 0 or (neg_idx[c] < 0).all():
            continue
        assert bool(cand[a_idx[c].long()].all())             # the sampled anchors are candidates
        proto = trep[lv].mean(0, keepdim=True)
        anchor = rep[a_idx[c].long()]
        keys = torch.cat([proto.expand(Q, 1, D), bank_keys[neg_idx[c].long()]], dim=1)
        logits = torch.cosine_similarity(anchor[:, None], keys, dim=2) / t
        loss = loss + F.cross_entropy(logits, torch.zeros(Q, dtype=torch.long))
    if n_valid <= 1:
        return emb.sum() * 0
    return loss / n_valid


@pytest.mark.parametrize("official", [True, False])
def test_loss_equals_a_per_class_restatement_on_the_same_samples(official):
    """official=True against the official loop above; the paper's reading against the same
    loop with its own anchors (anchors and positives use a correct one-hot there, checked by
    passing B = 1 per half, where both one-hots agree)."""
    L = 2 if official else 1
    B = 4 if official else 2
    emb, temb, probs, labels, rel, unrel = batch(B=B, L=L, seed=3)
    C, Q, N = 5, 8, 5
    bank = UnreliableBank(C, 8, size=40)
    x = emb.clone().requires_grad_()
    loss = u2pl_loss(x, labels, probs, temb, bank, num_labeled=L, reliable=rel, unreliable=unrel,
                     num_queries=Q, num_negatives=N, seed=11, official=official)
    # the samples the call drew, from the bank as the call left it
    gt = cm.pixel_labels(labels, (6, 7), C, 255)
    prob = probs.permute(0, 2, 3, 1).reshape(-1, C)
    V, A, _ = ref.class_masks(gt, prob, rel.reshape(-1), unrel.reshape(-1), L, 42, low_rank=3,
                              high_rank=20, anchor_threshold=0.3, negative_threshold=1.0,
                              official=official)
    a_idx, neg_idx = ref.sample(A, bank, Q, N, 11,
                                lambda *a, **k: prim.sample_in_groups(*a, backend="reference",
                                                                      **k))
    want = official_restatement(emb, temb, probs, gt, rel.reshape(-1), unrel.reshape(-1), L,
                                bank.keys, a_idx.view(C, Q), neg_idx.view(C, Q, N), Q=Q)
    assert bank.counts.sum() > 0 and (a_idx >= 0).any()
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(loss, x)
    touched = grad.permute(0, 2, 3, 1).reshape(-1, 8).abs().sum(1) > 0
    sampled = torch.zeros_like(touched)
    sampled[a_idx[a_idx >= 0].long()] = True
    assert torch.equal(touched & ~sampled, torch.zeros_like(touched))   # only at anchors


@pytest.mark.parametrize("shape,density", [((37, 5), 0.3), ((1, 1), 1.0), ((9, 3), 0.0),
                                           ((50, 4), 1.0)])
def test_group_columns_lists_each_class_rows_in_order(shape, density):
    """(order, offsets, counts): class c's rows are order[offsets[c]: offsets[c] + counts[c]],
    ascending, as a loop over the mask's columns lists them (the samplers draw from there)."""
    g = torch.Generator().manual_seed(int(100 * density) + shape[0])
    mask = torch.rand(*shape, generator=g) < density
    order, offsets, counts = ref.group_columns(mask)
    assert order.shape == (mask.numel(),) and order.dtype == torch.int64
    for c in range(shape[1]):
        want = [p for p in range(shape[0]) if mask[p, c]]
        o, n = int(offsets[c]), int(counts[c])
        assert order[o:o + n].tolist() == want


def test_readings_differ_only_where_the_spec_says():
    """One image per half: anchors and positive sets agree. The official negatives need the
    pixel's own label to be c, so they lose every labelled negative; with two images per half
    the official anchors come from image 0 of each half only."""
    emb, temb, probs, labels, rel, unrel = batch(B=2, L=1, seed=5)
    gt = cm.pixel_labels(labels, (6, 7), 5, 255)
    prob = probs.permute(0, 2, 3, 1).reshape(-1, 5)
    kw = dict(low_rank=1, high_rank=5, anchor_threshold=0.3, negative_threshold=1.0)
    paper = ref.class_masks(gt, prob, rel.reshape(-1), unrel.reshape(-1), 1, 42, official=False,
                            **kw)
    off = ref.class_masks(gt, prob, rel.reshape(-1), unrel.reshape(-1), 1, 42, official=True,
                          **kw)
    assert torch.equal(paper[0], off[0]) and torch.equal(paper[1], off[1])
    assert paper[2][:42].any() and not off[2][:42].any()        # labelled negatives
    emb, temb, probs, labels, rel, unrel = batch(B=4, L=2, seed=5)
    gt = cm.pixel_labels(labels, (6, 7), 5, 255)
    prob = probs.permute(0, 2, 3, 1).reshape(-1, 5)
    off = ref.class_masks(gt, prob, rel.reshape(-1), unrel.reshape(-1), 2, 42, official=True,
                          **kw)
    per_image = off[1].view(4, 42, 5).any(2).any(1)
    assert per_image.tolist() == [True, False, True, False]


def test_degenerate_batches_give_a_connected_zero():
    emb, temb, probs, labels, rel, unrel = batch(seed=1)
    bank = UnreliableBank(5, 8, size=20)
    x = emb.clone().requires_grad_()
    one = torch.zeros_like(labels)                                  # one class: nothing to contrast
    loss = u2pl_loss(x, one, probs, temb, bank, num_labeled=2, reliable=rel, unreliable=unrel,
                     num_queries=4, num_negatives=3, seed=0)
    assert loss.item() == 0 and loss.requires_grad
    assert torch.autograd.grad(loss, x)[0].abs().sum() == 0
    none = torch.zeros_like(unrel)                                  # no negatives ever queued
    loss = u2pl_loss(x, labels, probs, temb, UnreliableBank(5, 8, size=20), num_labeled=2,
                     reliable=rel, unreliable=none, num_queries=4, num_negatives=3, seed=0)
    assert loss.item() == 0 and loss.requires_grad


def test_float64_gradcheck_of_the_reference():
    emb, temb, probs, labels, rel, unrel = batch(B=2, D=4, h=3, w=4, L=1, seed=2,
                                                 dtype=torch.float64)

    def f(x):
        bank = UnreliableBank(5, 4, size=10, dtype=torch.float64)
        return u2pl_loss(x, labels, probs, temb, bank, num_labeled=1, reliable=rel,
                         unreliable=torch.ones_like(unrel), num_queries=3, num_negatives=2,
                         seed=4, low_rank=1, high_rank=5)

    x = emb.clone().requires_grad_()
    assert f(x).item() > 0
    assert torch.autograd.gradcheck(f, (x,))


def test_masks_follow_train_semi_percentiles():
    _, _, probs, labels, rel, unrel = batch(B=4, L=2, seed=7)
    p = probs[2:]
    ent = -(p * torch.log(p + 1e-10)).sum(1)
    valid = labels[2:] != 255
    lo = np.percentile(ent[valid].numpy(), 20.0)
    hi = np.percentile(ent[valid].numpy(), 80.0)
    assert torch.equal(rel[2:], (ent <= float(lo)) & valid)
    assert torch.equal(unrel[2:], (ent >= float(hi)) & valid)
    assert torch.equal(rel[:2], labels[:2] != 255) and torch.equal(unrel[:2], labels[:2] != 255)


@pytest.mark.parametrize("kw, err, match", [
    (dict(bank=torch.zeros(3)), TypeError, "UnreliableBank"),
    (dict(num_labeled=9), ValueError, "num_labeled"),
    (dict(reliable=torch.ones(4, 5, 5, dtype=torch.bool)), ValueError, "reliable"),
    (dict(low_rank=5, high_rank=2), ValueError, "low_rank"),
    (dict(anchor_threshold=1.5), ValueError, "anchor_threshold"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="fastest"), ValueError, "backend"),
])
def test_bad_arguments_name_themselves(kw, err, match):
    emb, temb, probs, labels, rel, unrel = batch()
    args = dict(bank=UnreliableBank(5, 8, size=10), num_labeled=2, reliable=rel,
                unreliable=unrel)
    args.update(kw)
    bank = args.pop("bank")
    with pytest.raises(err, match=match):
        u2pl_loss(emb, labels, probs, temb, bank, **args)


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_match_the_reference(backend, official):
    """Same seed, same samples: the compiled / Triton samplers and the sparse InfoNCE kernels
    reading the bank in place against the reference's gathers. fp32, sums of D = 8 products
    and 1 + N = 6 terms in another order: 1e-5."""
    emb, temb, probs, labels, rel, unrel = batch(seed=9)
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    out = {}
    for be, d in (("reference", torch.device("cpu")), (backend, dev)):
        bank = UnreliableBank(5, 8, size=30).to(d)
        x = emb.to(d).requires_grad_()
        losses, grads = [], []
        for step in range(2):                     # the second call samples a filled bank
            loss = u2pl_loss(x, labels.to(d), probs.to(d), temb.to(d), bank, num_labeled=2,
                             reliable=rel.to(d), unreliable=unrel.to(d), num_queries=6,
                             num_negatives=4, seed=step, official=official, backend=be)
            losses.append(loss.detach())          # backward before the next push: the
            grads.append(torch.autograd.grad(loss, x)[0])   # Triton backward reads the bank
        out[be] = torch.stack(losses).cpu(), torch.stack(grads).cpu(), bank.keys.cpu()
    (l0, g0, k0), (l1, g1, k1) = out["reference"], out[backend]
    assert torch.equal(k1, k0)                                     # the same pushes
    assert l0.gt(0).all()
    assert_close(l1, l0, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(g1, g0, rtol=1e-5, atol=1e-7, what="grad")


@pytest.mark.parametrize("backend", FUSED)
def test_sparse_infonce_with_a_separate_key_pool(backend):
    """The negatives index keys (S, D) instead of pool: every backend against the reference;
    key_grad is refused with keys."""
    from pixcon.ops import sparse_infonce
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2, 6, 5, 4, generator=g)
    keys = torch.randn(30, 6, generator=g)
    pos = torch.randn(3, 6, generator=g)
    q, p = torch.tensor([0, 5, -1, 39, 12]), torch.tensor([0, 1, 2, 2, 0])
    neg = torch.randint(-1, 30, (5, 7), generator=g)
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    res = {}
    for be, d in (("reference", torch.device("cpu")), (backend, dev)):
        x = pool.to(d).requires_grad_()
        loss = sparse_infonce(x, q.to(d), p.to(d), neg.to(d), temperature=0.3,
                              pos_pool=pos.to(d), keys=keys.to(d), backend=be)
        res[be] = loss.detach().cpu(), torch.autograd.grad(
            (loss * torch.arange(1.0, 6, device=d)).sum(), x)[0].cpu()
    assert_close(res[backend][0], res["reference"][0], rtol=1e-5, atol=1e-6, what="loss")
    assert_close(res[backend][1], res["reference"][1], rtol=1e-5, atol=1e-6, what="grad")
    with pytest.raises(ValueError, match="key_grad"):
        sparse_infonce(pool, q, p, neg, temperature=0.3, pos_pool=pos, keys=keys, key_grad=True)
    with pytest.raises(ValueError, match="keys"):
        sparse_infonce(pool, q, p, neg + 30, temperature=0.3, pos_pool=pos, keys=keys,
                       check_values=True)


def test_unsupervised_loss_follows_the_official_formula():
    """Entropy at or above the drop_percent percentile (numpy's) is ignored; the CE over the
    kept pixels is weighted by B H W / #kept (specs/u2pl.md §4)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)
    teacher = 2 * torch.randn(2, 4, 5, 6, generator=g)
    pseudo = teacher.argmax(1)
    pseudo[0, 0] = 255
    got = u2pl_unsupervised_loss(logits, pseudo, teacher, 80.0)
    p = teacher.softmax(1)
    ent = -(p * torch.log(p + 1e-10)).sum(1)
    thresh = np.percentile(ent[pseudo != 255].numpy(), 80.0)
    target = pseudo.clone()
    target[(ent >= float(thresh)) & (pseudo != 255)] = 255
    kept = int((target != 255).sum())
    want = 2 * 5 * 6 / kept * F.cross_entropy(logits, target, ignore_index=255)
    assert 0 < kept < 59 and torch.allclose(got, want, rtol=1e-6)
    assert torch.autograd.grad(got, logits)[0].abs().sum() > 0


def test_u2pl_loss_module_keeps_its_bank_in_the_state_dict():
    from pixcon.nn import U2PLLoss
    emb, temb, probs, labels, rel, unrel = batch(seed=4)
    crit = U2PLLoss(5, 8, size=20, num_queries=4, num_negatives=3)
    loss = crit(emb.requires_grad_(), labels, probs, temb, num_labeled=2, alpha=20.0, seed=2)
    assert loss.item() >= 0 and crit.bank.counts.sum() > 0
    other = U2PLLoss(5, 8, size=20)
    other.load_state_dict(crit.state_dict())
    assert torch.equal(other.bank.keys, crit.bank.keys)
    with pytest.raises(ValueError, match="alpha"):
        crit(emb, labels, probs, temb, num_labeled=2)


def test_u2pl_loss_module_is_the_functional_loss_on_its_bank():
    """U2PLLoss by hand: its bank has the given sizes (cross_rank and group passed on); with
    alpha, the masks are u2pl_masks at the loss's own ignore_index; given both masks, those
    are used (one mask alone is not enough: the other is made from alpha); the loss keywords
    reach u2pl_loss."""
    from pixcon.nn import U2PLLoss
    emb, temb, probs, labels, rel, unrel = batch(seed=5)
    labels = torch.where(labels == 255, 0, labels)
    labels[0, :2] = 3                                   # ignore_index=3: the loss's own
    kw = dict(num_queries=4, num_negatives=3, temperature=0.3, ignore_index=3)
    crit = U2PLLoss(5, 8, sizes=(9, 10, 11, 12, 13), cross_rank=False, group="g", **kw)
    assert crit.bank.sizes.tolist() == [9, 10, 11, 12, 13]
    assert crit.bank.cross_rank is False and crit.bank.group == "g"
    assert U2PLLoss(5, 8).bank.sizes.tolist() == [30000] * 5
    assert U2PLLoss(5, 8, size=7).bank.sizes.tolist() == [7] * 5
    bank = UnreliableBank(2, 3, size=4)
    maps = torch.randn(2, 3, 5)                          # (B, D, HW): HW != D
    bank.push(maps, torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^UnreliableBank.push: rows have D = 4"):
        bank.push(torch.randn(2, 4, 5), torch.ones(2, 10, dtype=torch.bool))
    nan = torch.full((10, 3), float("nan"))
    with pytest.raises(ValueError, match=r"^UnreliableBank.push: rows to enqueue contain NaN"):
        bank.push(nan, torch.ones(2, 10, dtype=torch.bool))
    bank.push(nan, torch.ones(2, 10, dtype=torch.bool), check_values=False)   # not checked
    assert U2PLLoss(5, 8).bank.cross_rank is True
    r3, u3 = u2pl_masks(probs, labels, 2, 40.0, ignore_index=3)
    bank = UnreliableBank(5, 8, sizes=(9, 10, 11, 12, 13), cross_rank=False)
    got = crit(emb, labels, probs, temb, num_labeled=2, alpha=40.0, seed=1)
    want = u2pl_loss(emb, labels, probs, temb, bank, num_labeled=2, reliable=r3,
                     unreliable=u3, seed=1, **kw)
    assert torch.equal(got, want) and torch.equal(crit.bank.keys, bank.keys)
    got = crit(emb, labels, probs, temb, num_labeled=2, reliable=rel, unreliable=unrel, seed=2)
    want = u2pl_loss(emb, labels, probs, temb, bank, num_labeled=2, reliable=rel,
                     unreliable=unrel, seed=2, **kw)
    assert torch.equal(got, want)
    for masks in (dict(reliable=rel), dict(unreliable=unrel)):
        with pytest.raises(ValueError, match="alpha"):
            crit(emb, labels, probs, temb, num_labeled=2, **masks)
    plain = U2PLLoss(5, 8, size=20, cross_rank=False, num_queries=4, num_negatives=3)
    lab255 = labels.clone()
    lab255[0, :2] = 255                                  # the default ignore_index: 255
    r255, u255 = u2pl_masks(probs, lab255, 2, 40.0)
    twin = UnreliableBank(5, 8, size=20, cross_rank=False)
    assert torch.equal(plain(emb, lab255, probs, temb, num_labeled=2, alpha=40.0, seed=4),
                       u2pl_loss(emb, lab255, probs, temb, twin, num_labeled=2, reliable=r255,
                                 unreliable=u255, seed=4, num_queries=4, num_negatives=3))
    got = crit(emb, labels, probs, temb, num_labeled=2, alpha=40.0, reliable=rel, seed=3)
    want = u2pl_loss(emb, labels, probs, temb, bank, num_labeled=2, reliable=r3,
                     unreliable=u3, seed=3, **kw)
    assert torch.equal(got, want)


def test_trainer_u2pl_mode_trains_and_resumes_exactly(tmp_path):
    """--loss u2pl: U2PL's unsupervised loss and contrast on the embedded scenes; the queues go
    into the checkpoint, so a resumed run repeats an uninterrupted one."""
    import dataclasses

    from pixcon.train.loop import Config, Trainer

    from .test_train import TINY_CFG
    base = dict(TINY_CFG, steps=5, eval_every=5, mode="semi", loss="u2pl")
    whole = Trainer(Config(**base, out=str(tmp_path / "a")))
    whole.run()
    assert whole.history[-1]["contrast"] > 0 and whole.extra.bank.counts.sum() > 0
    cut = Config(**base, out=str(tmp_path / "b"), stop_at=3)
    Trainer(cut).run()
    resumed = Trainer(dataclasses.replace(cut, stop_at=None, resume=True))
    resumed.run()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    with pytest.raises(ValueError, match="semi"):
        Config(**dict(base, mode="sup")).validate()


@pytest.mark.interpret
def test_triton_push_equals_the_compaction(monkeypatch):
    """The push kernel (no host sync) writes what the nonzero compaction writes, in the
    launcher's GPU configuration too, rows given as (P, D) or (B, D, HW) maps."""
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(3, 6, 40, generator=g)                      # (B, D, HW): 120 pixels
    mask = torch.rand(4, 120, generator=g) < 0.3
    for config in ("interpreter", "gpu"):
        monkeypatch.setenv("PIXCON_LAUNCH_CONFIG", config)
        banks = []
        for be, r in (("reference", rows), ("triton", rows),
                      ("triton", rows.permute(0, 2, 1).reshape(-1, 6))):
            bank = UnreliableBank(4, 6, sizes=(10, 50, 7, 30))
            for _ in range(3):                                     # wraps the small rings
                bank.push(r, mask, backend=be)
            banks.append(bank)
        for b in banks[1:]:
            assert torch.equal(b.keys, banks[0].keys)
            assert torch.equal(b.counts, banks[0].counts) and torch.equal(b.ptr, banks[0].ptr)
        assert banks[0].counts.tolist() == [10, 50, 7, 30]


@pytest.mark.skipif(not pixcon.HAS_C, reason="the compiled CPU kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [5, 32])
def test_native_push_equals_the_compaction(dtype, D):
    """The compiled CPU push (csrc/cpu/bank.cpp) writes what the compaction writes, rows given
    as (P, D) or read in place from (B, D, HW) maps whose HW is not a multiple of its 16-pixel
    blocks, with the rings wrapping; "auto" on CPU tensors is that kernel. D = 32 in float32:
    the rows stored non-temporally (where the CPU has AVX-512)."""
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(3, D, 37, generator=g).to(dtype)            # (B, D, HW): 111 pixels
    mask = torch.rand(4, 111, generator=g) < 0.3
    mask[:, 17:50] = False                                          # whole blocks pushed by none
    banks = []
    for be, r in (("reference", rows), ("native", rows), ("auto", rows),
                  ("native", rows.permute(0, 2, 1).reshape(-1, D))):
        bank = UnreliableBank(4, D, sizes=(10, 50, 7, 30), dtype=dtype)
        with torch.profiler.profile() as prof:
            for _ in range(3):
                bank.push(r, mask, backend=be)
        ran = {e.name for e in prof.events()}
        assert ("pixcon::bank_push" in ran) == (be != "reference"), be
        banks.append(bank)
    for b in banks[1:]:
        assert torch.equal(b.keys, banks[0].keys)
        assert torch.equal(b.counts, banks[0].counts) and torch.equal(b.ptr, banks[0].ptr)
    assert banks[0].counts.tolist() == [10, 50, 7, 30] and banks[0].keys.abs().sum() > 0


def test_class_masks_by_hand_at_the_boundaries():
    """specs/u2pl.md §2 by hand, one image of four pixels, C = 4, low_rank 1, high_rank 3. An
    unlabelled pixel is a negative of the classes ranked in [low_rank, high_rank): rank 3 is
    not. An anchor needs its class's probability strictly above the threshold: a pixel at
    exactly 0.5 is not one."""
    prob = torch.tensor([[0.5, 0.25, 0.125, 0.125],     # ranks 0 1 2 3 (ties in class order)
                         [0.75, 0.125, 0.0625, 0.0625],
                         [0.0625, 0.0625, 0.125, 0.75],
                         [0.25, 0.5, 0.125, 0.125]])
    gt = torch.tensor([0, 0, 3, 1])
    yes = torch.ones(4, dtype=torch.bool)
    V, A, N = ref.class_masks(gt, prob, yes, yes, 0, 4, low_rank=1, high_rank=3,
                              anchor_threshold=0.5, negative_threshold=1.0, official=False)
    assert V.tolist() == [[True, False, False, False], [True, False, False, False],
                          [False, False, False, True], [False, True, False, False]]
    # strictly above 0.5: pixel 0 (0.5 for class 0) and pixel 3 (0.5 for class 1) are not
    assert A.tolist() == [[False] * 4, [True, False, False, False],
                          [False, False, False, True], [False] * 4]
    # ranks 1 and 2 of each pixel: classes 1, 2 / 1, 2 / 2, 0 (0.0625 ties: class 0 first) /
    # 0, 2; the class at rank 3 never
    assert N.tolist() == [[False, True, True, False], [False, True, True, False],
                          [True, False, True, False], [True, False, True, False]]


def test_labelled_negatives_stop_before_low_rank():
    """specs/u2pl.md §2, labelled pixels: a negative of class c when c is not the pixel's
    label and ranks strictly below low_rank in its teacher probabilities. One labelled image of
    two pixels, C = 4, low_rank 2: pixel 0 (label 0) ranks 0, 1, 2, 3 -> negative of class 1
    only (class 2 is at rank 2 = low_rank); pixel 1 (label 3, ranked 1) -> negative of the
    class at rank 0 only. Its own class never is."""
    prob = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.05, 0.35]])
    gt = torch.tensor([0, 3])
    yes = torch.ones(2, dtype=torch.bool)
    _, _, N = ref.class_masks(gt, prob, yes, yes, 1, 2, low_rank=2, high_rank=3,
                              anchor_threshold=0.0, negative_threshold=1.0, official=False)
    assert N.tolist() == [[False, True, False, False], [True, False, False, False]]


def test_bank_and_seeds_keep_their_types_and_names():
    """A float64 queue stays float64 after a push of float32 rows; its pointers and counts are
    int64; a bad seed's error names the op."""
    bank = UnreliableBank(2, 3, size=4, dtype=torch.float64)
    bank.push(torch.randn(5, 3), torch.ones(2, 5, dtype=torch.bool))
    assert bank.keys.dtype == torch.float64
    assert bank.counts.dtype == bank.ptr.dtype == bank.sizes.dtype == torch.int64
    emb, temb, probs, labels, rel, unrel = batch(seed=2)
    for bad, err in ((-1, ValueError), (2**63, ValueError), (1.5, TypeError)):
        with pytest.raises(err, match=r"^u2pl_loss: seed must be"):
            u2pl_loss(emb, labels, probs, temb, UnreliableBank(5, 8, size=10), num_labeled=2,
                      reliable=rel, unreliable=unrel, seed=bad)


def test_an_anchor_at_pixel_zero_keeps_its_negatives():
    """U2PL's sampling, by hand on its smallest case: class 0's only anchor is pixel 0, so every
    query of class 0 is pixel 0, and each of them draws its negatives from class 0's filled
    queue slots (an anchor index of 0 is an anchor, not "none"); class 1 has no anchor: -1."""
    from pixcon.core.u2pl import sample
    A = torch.zeros(5, 2, dtype=torch.bool)
    A[0, 0] = True
    bank = UnreliableBank(2, 3, sizes=(4, 4))
    bank.push(torch.randn(3, 3), torch.tensor([[True, True, True], [False, False, False]]))
    a, neg = sample(A, bank, 3, 2, 7, prim.reference_groups_sample)
    assert a.tolist() == [0, 0, 0, -1, -1, -1]
    assert ((neg[:3] >= 0) & (neg[:3] < 3)).all() and (neg[3:] == -1).all()


def test_rank_ties_go_in_class_order_at_voc_size():
    """ranks(): a pixel's classes in descending probability, ties in class order, at C = 21
    (torch's unstable sort reorders ties from 17 entries a row up): one class at 0.5, the other
    twenty tied, so class c > 0 ranks c."""
    from pixcon.core.u2pl import ranks
    prob = torch.full((30, 21), 0.025)
    prob[:, 0] = 0.5
    prob[7, 0], prob[7, 20] = 0.025, 0.5                   # pixel 7: class 20 first
    r = ranks(prob)
    assert r[0].tolist() == list(range(21))
    assert r[7].tolist() == list(range(1, 21)) + [0]


@pytest.mark.skipif(not pixcon.HAS_C, reason="the compiled CPU kernels are not built")
@pytest.mark.parametrize("P, C, seed", [(1, 1, 0), (257, 21, 1), (99, 33, 2), (40, 150, 3)])
def test_compiled_ranks_and_groups_equal_their_torch_forms(P, C, seed):
    """pixcon::class_ranks and pixcon::group_columns (the fused path's, compiled on the CPU)
    give exactly the torch forms' results: ranks with ties (probabilities from 4 levels, so most
    rows tie; -0.0 ties with 0.0), NaN (first, as torch.sort puts it), C above the counting
    kernel's 64 (a stable sort); groups of masks of every density, empty and full columns included, the
    permutation's tail too."""
    from pixcon.core import u2pl as core
    g = torch.Generator().manual_seed(seed)
    prob = torch.randint(0, 4, (P, C), generator=g).float() / 4
    prob[P // 2, C // 2] = float("nan")
    prob[::3, -1] = -0.0                                # ties with 0.0
    for dt in (torch.float32, torch.float64):
        assert torch.equal(torch.ops.pixcon.class_ranks(prob.to(dt)), core.ranks(prob.to(dt)))
    for density in (0.0, 0.2, 0.7, 1.0):
        mask = torch.rand(P, C, generator=g) < density
        mask[:, 0] = False
        mask[:, -1] = True
        got = torch.ops.pixcon.group_columns(mask)
        want = core.group_columns(mask)
        assert all(torch.equal(x, y) for x, y in zip(got, want)), density
    mask = torch.rand(C, P, generator=g) < 0.5          # a transposed view: read as (P, C)
    assert all(torch.equal(x, y) for x, y in zip(torch.ops.pixcon.group_columns(mask.T),
                                                 core.group_columns(mask.T)))


def test_a_float64_queue_with_float32_embeddings():
    """The queue's keys are read in the embeddings' compute dtype: a float64 bank fed float32
    teacher rows gives the float32 bank's losses, bit for bit, as float32."""
    emb, temb, probs, labels, rel, unrel = batch(seed=3)
    out = []
    for dt in (torch.float32, torch.float64):
        bank = UnreliableBank(5, 8, size=20, dtype=dt)
        out.append([u2pl_loss(emb, labels, probs, temb, bank, num_labeled=2, reliable=rel,
                              unreliable=unrel, num_queries=4, num_negatives=3, seed=s,
                              backend="reference") for s in (0, 1)])
    for a, b in zip(*out):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
