"""pixcon under torch.distributed: two gloo processes on the CPU (issue 13).

Each test spawns two processes that run a worker of this module and save what they saw; the
assertions run here, against single-process computations on the concatenated batch. Tolerances:
float64 throughout, so 1e-10 (sums in another order) unless stated.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pixcon import distributed as pdist
from pixcon import ops
from pixcon import reference
from pixcon.nn import NegativeBank, PixelMemoryBank
from pixcon.ops import primitives as prim
from pixcon.reference import common as cm
from pixcon.reference import contextrast as ref_ctx

WORLD = 2
C = 4
ROOT = Path(__file__).resolve().parents[1]


# --- harness ---------------------------------------------------------------------------------
def _entry(rank, name, init, out, args):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(1000 + rank)
        torch.save(globals()[name](rank, *args), f"{out}.{rank}")
    finally:
        pdist.shutdown()     # barrier first: a rank leaving while the other talks aborts both
    pdist.exit_now(0)        # saved and shut down: no teardown for gloo's threads to abort


def spawn(tmp_path, name, *args):
    """Run worker ``name`` on two gloo ranks; its return value per rank."""
    import torch.multiprocessing as mp
    out = tmp_path / "out"
    mp.spawn(_entry, args=(name, f"file://{tmp_path / 'init'}", str(out), args), nprocs=WORLD,
             join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def batch(rank, step=0, B=2, D=8, h=5, w=6, ignored=False):
    """Rank r's batch: emb (B, D, h, w) float64, labels (B, h, w) in 0..C-1 or 255, probs."""
    g = torch.Generator().manual_seed(100 * rank + step)
    emb = torch.randn(B, D, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(C, (B, h, w), generator=g)
    labels[torch.rand(B, h, w, generator=g) < 0.15] = 255
    if ignored:
        labels.fill_(255)
    probs = torch.softmax(3 * torch.randn(B, C, h, w, generator=g, dtype=torch.float64), dim=1)
    return emb, labels, probs


def both(step=0, **kw):
    """The two ranks' batches concatenated (rank 0 first)."""
    parts = [batch(r, step, **kw) for r in range(WORLD)]
    return tuple(torch.cat(x) for x in zip(*parts))


# --- banks -----------------------------------------------------------------------------------
def _banks(rank):
    bank = PixelMemoryBank(C, dim=8, memory_size=64, pixel_update_freq=3)
    drawn = PixelMemoryBank(C, dim=8, memory_size=64, pixel_update_freq=3)
    for step in range(3):
        emb, labels, _ = batch(rank, step)
        bank.update(emb, labels, seed=10 + rank + step)        # the ranks agree on the largest
        drawn.update(emb, labels)                              # seeds drawn per rank
    neg = NegativeBank(step_save=1)
    emb, labels, _ = batch(rank)
    neg.update(emb, emb + 1, labels, labels)
    return {"bank": bank.state_dict(), "drawn": drawn.state_dict(), "neg": neg.negatives()}


def test_banks_hold_the_same_entries_on_both_ranks(tmp_path):
    r0, r1 = spawn(tmp_path, "_banks")
    for key in ("bank", "drawn"):
        for name, t in r0[key].items():
            assert torch.equal(t, r1[key][name]), (key, name)
    assert torch.equal(r0["neg"][0], r1["neg"][0]) and torch.equal(r0["neg"][1], r1["neg"][1])
    # equal to one process updating with the concatenated batches, from rank 0's initial queues
    torch.manual_seed(1000)
    single = PixelMemoryBank(C, dim=8, memory_size=64, pixel_update_freq=3)
    for step in range(3):
        emb, labels, _ = both(step)
        single.update(emb, labels, seed=11 + step)
    for name, t in single.state_dict().items():
        assert torch.equal(t, r0["bank"][name]), name
    assert int(single.pixel_ptr.sum()) > 0
    # NegativeBank: rank 0's rows, then rank 1's
    f0, f1 = (cm.pixel_rows(batch(r)[0]) for r in range(WORLD))
    assert torch.equal(r0["neg"][0], torch.cat([f0, f0 + 1, f1, f1 + 1]).float()
                       if r0["neg"][0].dtype == torch.float32 else torch.cat([f0, f0 + 1, f1, f1 + 1]))


def _global_batch(rank):
    """A batch of 2 images per rank fits memory_size 10 with freq 3 (6 slots) alone, but the
    global batch of 4 (12 slots) does not: a cross-rank bank refuses it on every rank, a
    rank-local one (cross_rank=False) takes it, and so does one whose group is its own rank."""
    import torch.distributed as dist
    emb, labels, _ = batch(rank)
    own = [dist.new_group([r]) for r in range(WORLD)][rank]      # every rank makes both
    out = {}
    for name, kw in (("world", dict(cross_rank=True)), ("local", dict(cross_rank=False)),
                     ("own group", dict(cross_rank=True, group=own))):
        bank = PixelMemoryBank(C, dim=8, memory_size=10, pixel_update_freq=3, **kw)
        try:
            bank.update(emb, labels, seed=1)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def test_the_global_batch_must_fit_a_cross_rank_bank(tmp_path):
    for r in spawn(tmp_path, "_global_batch"):
        assert "a batch of 4 images" in r["world"] and "more than memory_size = 10" in r["world"]
        assert r["local"] is None and r["own group"] is None


def _bad_update(rank):
    """Rank 1's input is invalid (or of another shape): every rank must raise, none hang."""
    out = {}
    bank = PixelMemoryBank(C, dim=8, memory_size=64, pixel_update_freq=3)
    neg = NegativeBank(step_save=1)
    emb, labels, _ = batch(rank)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    cases = {
        "bank_dim": lambda: bank.update(emb if rank == 0 else emb[:, :5], labels),
        "bank_nan": lambda: bank.update(emb if rank == 0 else emb * float("nan"), labels),
        "bank_shape": lambda: bank.update(emb[:1 + rank], labels[:1 + rank]),
        "neg_labels": lambda: neg.update(emb, emb, labels, labels if rank == 0 else labels[:1]),
        "neg_shape": lambda: neg.update(emb[:1 + rank], emb[:1 + rank], labels[:1 + rank],
                                        labels[:1 + rank]),
    }
    for name, call in cases.items():
        try:
            call()
            out[name] = None
        except Exception as e:                 # noqa: BLE001 - the type is what is checked
            out[name] = (type(e).__name__, str(e))
    out["unchanged"] = all(torch.equal(v, bank.state_dict()[k]) for k, v in before.items())
    out["neg_len"] = len(neg)
    # the process group still works afterwards: a valid update goes through on both ranks
    bank.update(emb, labels, seed=3)
    out["after"] = bank.state_dict()
    return out


def test_invalid_bank_update_on_one_rank_raises_on_every_rank(tmp_path):
    r0, r1 = spawn(tmp_path, "_bad_update")
    for name in ("bank_dim", "bank_nan", "neg_labels"):
        assert r1[name][0] == "ValueError", (name, r1[name])
        assert r0[name][0] == "RankError" and "rank 1" in r0[name][1], (name, r0[name])
    for name in ("bank_shape", "neg_shape"):
        for r in (r0, r1):
            assert r[name][0] == "RankError" and "same shapes" in r[name][1], (name, r[name])
    for r in (r0, r1):
        assert r["unchanged"] and r["neg_len"] == 0
    for k, v in r0["after"].items():
        assert torch.equal(v, r1["after"][k]), k


def _bad_loss_input(rank):
    """The cross-rank losses with rank 1's input invalid (NaN, another class count, another
    D, a wrong label): every rank raises at once, and the group still works afterwards."""
    import time
    emb, labels, probs = batch(rank)
    nan = emb * float("nan")
    pred = probs.argmax(1)
    cases = {
        "reco_nan": lambda: ops.reco_loss(emb if rank == 0 else nan, labels, probs,
                                          num_queries=4, num_negatives=5, seed=1,
                                          cross_rank=True),
        "reco_classes": lambda: ops.reco_loss(
            emb, labels, probs if rank == 0 else torch.cat([probs, probs[:, :1]], 1),
            num_queries=4, num_negatives=5, seed=1, cross_rank=True),
        "ctx_nan": lambda: ops.pixel_anchor_loss([emb if rank == 0 else nan], labels, pred,
                                                 num_classes=C, layer_weights=(1.0,),
                                                 cross_rank=True),
        "ctx_label": lambda: ops.pixel_anchor_loss(
            [emb], labels if rank == 0 else labels.clamp(max=C + 3), pred, num_classes=C,
            layer_weights=(1.0,), cross_rank=True),
        "ctx_dim": lambda: ops.pixel_anchor_loss([emb if rank == 0 else emb[:, :5]], labels,
                                                 pred, num_classes=C, layer_weights=(1.0,),
                                                 cross_rank=True),
        "dense_nan": lambda: ops.dense_contrast_loss(emb if rank == 0 else nan, labels,
                                                     cross_rank=True),
    }
    out = {}
    for name, call in cases.items():
        t0 = time.monotonic()
        try:
            call()
            out[name] = None
        except Exception as e:                 # noqa: BLE001 - the type is what is checked
            out[name] = (type(e).__name__, str(e), time.monotonic() - t0)
    out["after"] = float(ops.dense_contrast_loss(emb, labels, cross_rank=True))  # global
    return out


def test_bad_loss_input_on_one_rank_raises_on_every_rank_within_seconds(tmp_path):
    r0, r1 = spawn(tmp_path, "_bad_loss_input")
    for name in ("reco_nan", "ctx_nan", "ctx_label", "dense_nan"):
        assert r1[name][0] == "ValueError", (name, r1[name])
        assert r0[name][0] == "RankError" and "rank 1" in r0[name][1], (name, r0[name])
    for name in ("reco_classes", "ctx_dim"):          # a count mismatch: RankError on both
        for r in (r0, r1):
            assert r[name][0] == "RankError" and "same shapes" in r[name][1], (name, r[name])
    for r in (r0, r1):
        for name, res in r.items():
            if name != "after":
                assert res[2] < 10, (name, res)       # raised together, nobody waited it out
    assert r0["after"] == r1["after"]                  # the group still works, one global value


def _timeout(rank):
    """Rank 1 reaches the collective 3 s late; rank 0 waits 1 s: a CollectiveTimeout that names
    the op there, and rank 1's late collective still completes (gloo pairs it with the
    abandoned one), so the group lives on."""
    import time
    pdist.set_timeout(1 if rank == 0 else 30)
    x = torch.ones(3)
    out = {}
    t0 = time.monotonic()
    if rank == 1:
        time.sleep(3)
    try:
        pdist.all_reduce_sum(x, op="my_loss")
        out["first"] = None
    except Exception as e:                      # noqa: BLE001 - the type is what is checked
        out["first"] = (type(e).__name__, str(e), isinstance(e, pdist.RankError))
    out["waited"] = time.monotonic() - t0
    pdist.set_timeout(30)
    out["next"] = pdist.all_reduce_sum(torch.full((2,), rank + 1.0), op="next").tolist()
    return out


def test_collective_timeout_names_the_op_and_the_group_lives_on(tmp_path):
    r0, r1 = spawn(tmp_path, "_timeout")
    name, msg, is_rank_error = r0["first"]
    assert name == "CollectiveTimeout" and is_rank_error, r0
    assert "my_loss" in msg and "1 s" in msg and "set_timeout" in msg, msg
    assert r0["waited"] < 2.5, r0
    assert r1["first"] is None
    assert r0["next"] == r1["next"] == [3.0, 3.0]


def test_timeout_setting_is_validated():
    before = pdist.get_timeout()
    for bad in (0, -1, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="set_timeout: seconds"):
            pdist.set_timeout(bad)
    assert pdist.get_timeout() == before


# --- cross-rank statistics -------------------------------------------------------------------
def _stats(rank):
    emb, labels, probs = batch(rank)
    lab = cm.pixel_labels(labels, emb.shape[-2:], C, 255)
    out = {"means": {b: prim.class_means(emb, lab, C, backend=b, cross_rank=True)
                     for b in ("reference", "native")}}
    for b in ("reference", "native"):
        for cross in (False, True):
            out[("reco", b, cross)] = ops.reco_loss(
                emb, labels, probs, num_queries=5, num_negatives=7, seed=3, reduction="none",
                backend=b, cross_rank=cross)
    embs = [emb.clone().requires_grad_(), F.avg_pool2d(emb, 2).requires_grad_()]
    pred = probs.argmax(1)
    for b in ("reference", "native", "triton"):  # triton: under the interpreter on CPU
        loss = ops.pixel_anchor_loss(embs, labels, pred, num_classes=C, layer_weights=(0.5, 1.0),
                                     backend=b, cross_rank=True)
        grads = torch.autograd.grad(loss, embs)
        out[("ctx", b)] = (loss.detach(), [g.clone() for g in grads])
    out["ctx_local"] = float(ops.pixel_anchor_loss(embs, labels, pred, num_classes=C,
                                                   layer_weights=(0.5, 1.0)))
    return out


def _other_rank_stats(rank, per_call):
    """stats= for a reference run on rank ``rank``'s batch alone: adds the other rank's class
    sums and counts, which ``per_call`` yields in the order the reference asks for them."""
    it = iter(per_call)

    def stats(sums, counts):
        s, n = next(it)
        return sums + s, counts + n
    return stats


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("stats"), "_stats")


def test_cross_rank_statistics_are_those_of_the_concatenated_batch(stats_run):
    res = stats_run
    emb, labels, _ = both()
    lab = cm.pixel_labels(labels, emb.shape[-2:], C, 255)
    sums, counts, means = prim.class_means(emb, lab, C, backend="reference")
    for r in res:
        for b, (s, n, m) in r["means"].items():
            assert torch.equal(n, counts), b
            torch.testing.assert_close(s, sums, rtol=0, atol=1e-10)
            torch.testing.assert_close(m, means, rtol=0, atol=1e-12)
    # ReCo: each rank's per-query losses with the global means as positives and relation graph
    for rank, r in enumerate(res):
        e_o, l_o, _ = batch(1 - rank)
        other = cm.class_sums(cm.pixel_rows(e_o), cm.pixel_labels(l_o, e_o.shape[-2:], C, 255), C)
        e, l, p = batch(rank)
        want = reference.reco.reco_loss(e, l, p, num_queries=5, num_negatives=7, seed=3,
                                        reduction="none", stats=_other_rank_stats(rank, [other]))
        local = reference.reco.reco_loss(e, l, p, num_queries=5, num_negatives=7, seed=3,
                                         reduction="none")
        for b in ("reference", "native"):
            torch.testing.assert_close(r[("reco", b, True)], want, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(r[("reco", b, False)], local, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(want, local)          # the other rank's pixels moved the means


def _ctx_oracle(rank):
    """Contextrast with cross-rank anchors, in one process: L_0 + L_1, each rank's loss with the
    other rank's differentiable class sums added; gradients w.r.t. both ranks' embeddings."""
    leaves, layers = [], []
    for r in range(WORLD):
        emb, labels, probs = batch(r)
        embs = [emb.clone().requires_grad_(), F.avg_pool2d(emb, 2).requires_grad_()]
        leaves.append(embs)
        layers.append((embs, labels, probs.argmax(1)))

    def sums_of(r):
        embs, labels, pred = layers[r]
        out = []
        for e in embs:
            z, gt, _ = ref_ctx.layer_inputs(e, labels, pred, C, 255, True)
            onehot = F.one_hot(gt.clamp(min=0), C).to(z.dtype) * (gt >= 0)[:, None].to(z.dtype)
            out.append((onehot.T @ z, onehot.sum(0)))
        return out

    total = 0
    for r in range(WORLD):
        embs, labels, pred = layers[r]
        total = total + ref_ctx.pixel_anchor_loss(
            embs, labels, pred, C, layer_weights=(0.5, 1.0),
            stats=_other_rank_stats(r, sums_of(1 - r)))
    grads = torch.autograd.grad(total, leaves[0] + leaves[1])
    return grads[:2] if rank == 0 else grads[2:]


def test_contextrast_cross_rank_anchors_values_and_gradients(stats_run):
    res = stats_run
    for rank, r in enumerate(res):
        want_grads = _ctx_oracle(rank)
        ref_loss, ref_grads = r[("ctx", "reference")]
        assert abs(float(ref_loss) - r["ctx_local"]) > 1e-6     # the global anchors moved it
        for g, w in zip(ref_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
        for b in ("native", "triton"):     # the fused backward sums dS over ranks itself
            fused_loss, fused_grads = r[("ctx", b)]
            torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-9, atol=1e-9)
            for f, w in zip(fused_grads, want_grads):
                torch.testing.assert_close(f, w, rtol=1e-8, atol=1e-10, msg=b)


# --- DDP -------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return torch.nn.Conv2d(8, 6, 1).double()


def _dense_ddp(rank, backend):
    """DDP over a 1x1 conv, dense contrast with cross-rank keys: loss and averaged gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model()
    net = DDP(model)
    emb, labels, _ = batch(rank)
    loss = ops.dense_contrast_loss(F.normalize(net(emb), dim=1), labels, cross_rank=True,
                                   backend=backend)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["native", "reference",
                                     pytest.param("triton", marks=pytest.mark.interpret)])
def test_dense_cross_rank_under_ddp_is_the_concatenated_batch(tmp_path, backend):
    """The math says they are equal: every rank's value is the global mean (numerator and count
    all-reduced), keys carry gradient back to their rank, DDP averages."""
    res = spawn(tmp_path, "_dense_ddp", backend)
    model = _model()
    emb, labels, _ = both()
    loss = ops.dense_contrast_loss(F.normalize(model(emb), dim=1), labels, backend=backend)
    loss.backward()
    for r_loss, r_grads in res:
        torch.testing.assert_close(r_loss, loss.detach(), rtol=1e-10, atol=1e-12)
        for g, p in zip(r_grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)
    assert res[0][0] > 0


def _degenerate_ddp(rank):
    """Every loss on a batch where nothing contributes (rank 1: all labels ignored; CAC: no
    pixel selected on either rank), two DDP steps without find_unused_parameters: a loss that
    were not connected to the graph would fail the second step."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    emb, labels, probs = batch(rank, ignored=rank == 1)
    emb = emb.float()
    flat = torch.zeros(2 * 30, C)                         # confidence 1/C < gamma: no pixel
    losses = {
        "reco": lambda z: ops.reco_loss(z, labels, probs.float(), num_queries=4, num_negatives=4),
        "reco_cross": lambda z: ops.reco_loss(z, labels, probs.float(), num_queries=4,
                                              num_negatives=4, cross_rank=True),
        "contrastiveseg": lambda z: ops.pixel_contrast_loss(z, labels, probs.argmax(1),
                                                            max_samples=64, max_views=4),
        "dense_cross": lambda z: ops.dense_contrast_loss(z, labels, cross_rank=True),
        "contextrast": lambda z: ops.pixel_anchor_loss([z], labels, probs, layer_weights=(1.0,)),
        "contextrast_cross": lambda z: ops.pixel_anchor_loss(
            [z], labels, probs, layer_weights=(1.0,), cross_rank=True),
        "cac": lambda z: ops.directional_contrast_loss(
            *(z.permute(0, 2, 3, 1).reshape(-1, 6),) * 2, flat, flat,
            z.detach().permute(0, 2, 3, 1).reshape(-1, 6), torch.arange(60) % C),
    }
    out = {}
    for name, fn in losses.items():
        torch.manual_seed(0)
        model = torch.nn.Conv2d(8, 6, 1)
        net = DDP(model)                                  # find_unused_parameters=False
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        values = []
        for _ in range(2):
            opt.zero_grad()
            loss = fn(F.normalize(net(emb), dim=1))
            loss.backward()
            opt.step()
            values.append(float(loss))
        out[name] = (values, all(p.grad is not None for p in model.parameters()))
    return out


def test_degenerate_batches_train_under_ddp_without_unused_parameters(tmp_path):
    r0, r1 = spawn(tmp_path, "_degenerate_ddp")
    for name in r1:
        assert r0[name][1] and r1[name][1], name
    for name in ("reco", "contrastiveseg", "contextrast"):
        assert r1[name][0] == [0.0, 0.0], name             # nothing valid on rank 1
        assert r0[name][0][0] > 0, name
    assert r0["cac"][0] == r1["cac"][0] == [0.0, 0.0]
    assert r0["dense_cross"][0] == r1["dense_cross"][0]   # the global value on both ranks
    assert r0["dense_cross"][0][0] > 0


# --- the trainer under torchrun --------------------------------------------------------------
def torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.parametrize("loss", ["reco", "contextrast", "cac"])
def test_trainer_under_torchrun_ends_with_identical_weights(tmp_path, loss):
    torchrun(ROOT / "tests" / "_torchrun_train.py", tmp_path, loss)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert (r0["rank"], r0["world"], r1["rank"], r1["world"]) == (0, 2, 1, 2)
    for part in ("student", "teacher", "extra"):
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), (part, k)
    moved = [k for k, v in r0["init"].items() if v.is_floating_point()
             and not torch.equal(v, r0["student"][k])]
    assert len(moved) > 10                                  # it trained
    assert r0["losses"] != r1["losses"]                     # on different data per rank
    if loss == "cac":                 # the negative bank: both ranks' rows, the same everywhere
        assert all(torch.equal(a, b) for a, b in zip(r0["bank"], r1["bank"]))
        assert r0["bank"][0].shape[0] == 2 * WORLD * 2 * 2 * 4 * 4   # steps, ranks, views, B, hw


def test_cli_under_torchrun_writes_one_report(tmp_path):
    res = torchrun("-m", "pixcon.train", "run", "--tiny", "--steps", "2", "--eval-every", "2",
                   "--mode", "sup", "--out", tmp_path, "--quiet")
    assert res.stdout.count("final mIoU") == 1               # rank 0 reports
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["steps_done"] == 2 and rep["final_miou"] is not None
