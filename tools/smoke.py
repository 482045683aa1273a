"""Every public op once, at a small size: the cases that launch every Triton kernel.

One list serves four checks:
- the race check under the interpreter (tests/test_order.py): each case's Triton outputs in grid,
  reversed and shuffled program order, bitwise equal;
- the GPU parity tests (tests/test_gpu.py): each case Triton against the reference on CUDA
  tensors, loss and gradients, with the tolerance the case states, and twice bitwise equal;
- compute-sanitizer (``python -m tools.smoke --device cuda``, run by ``./dev gpu`` under
  ``memcheck`` and ``racecheck``): one small launch of every kernel, named as it runs;
- the GPU command's dry run, which runs the same script under the interpreter.

A case is ``Case(name, make, run, rtol, atol)``: ``make(device, seed)`` builds its inputs,
``run(backend, inputs)`` returns a dict of detached output tensors (losses, gradients, indices).
Tolerances are float32's: the Triton kernels and the reference compute in float32 from the same
values in another summation order (1e-5 relative on one exp/log and D <= 32 products; 1e-4 on
gradients through a normalisation). Integer outputs (samples, distances) must be equal.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pixcon import ops
from pixcon.core import common as cm
from pixcon.synthetic import reco_batch


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable
    run: Callable
    rtol: float = 1e-5
    atol: float = 1e-6


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grads(loss, leaves):
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return {"loss": loss.detach(), **{f"grad{i}": g for i, g in enumerate(gs) if g is not None}}


def _leaf(t):
    return t.detach().clone().requires_grad_()


# --- the cases ---------------------------------------------------------------------------------
def _reco_make(dev, seed):
    emb, labels, probs = reco_batch(2, 16, 13, 11, num_classes=5, present=4, seed=seed)
    return dict(emb=emb.to(dev), labels=labels.to(dev), probs=probs.to(dev))


def _reco_run(be, x):
    e = _leaf(x["emb"])
    return _grads(ops.reco_loss(e, x["labels"], x["probs"], num_queries=8, num_negatives=16,
                                seed=5, backend=be), [e])


def _means_make(dev, seed):
    g = _gen(seed)
    return dict(emb=torch.randn(2, 12, 7, 9, generator=g).to(dev),
                lab=torch.randint(-1, 5, (2 * 7 * 9,), generator=g).to(dev))


def _means_run(be, x):
    s, n, m = ops.class_means(x["emb"], x["lab"], 5, backend=be)     # statistics: no gradient
    return {"sums": s, "counts": n, "means": m}


def _samplers_make(dev, seed):
    g = _gen(seed)
    C, P = 6, 300
    lab = torch.randint(-1, C, (P,), generator=g)
    hard = torch.rand(P, generator=g) < 0.5
    cdf = cm.relation_cdf(torch.randn(C, 6, generator=g),
                          torch.bincount(lab[lab >= 0], minlength=C) > 0, 0.5)
    return dict(lab=lab.to(dev), hard=hard.to(dev), cdf=cdf.to(dev),
                rows=torch.tensor([0, 1, 2, 3, -1, 5, 0]).to(dev))


def _samplers_run(be, x):
    q = ops.sample_hard_queries(x["lab"], x["hard"], 6, 17, 3, backend=be)
    n = ops.sample_negatives(x["rows"], x["cdf"], x["lab"], 23, 4, backend=be)
    r = ops.philox(torch.arange(1000, device=x["lab"].device), 7, 1, backend=be)
    return {"queries": q, "negatives": n, "philox": r}


def _infonce_make(dev, seed):
    g = _gen(seed)
    P, R, M, N, D = 90, 6, 12, 20, 24
    return dict(pool=torch.randn(P, D, generator=g).to(dev),
                pos=torch.randn(R, D, generator=g).to(dev),
                q=torch.randint(-1, P, (M,), generator=g).to(dev),
                p=torch.randint(0, R, (M,), generator=g).to(dev),
                neg=torch.randint(-1, P, (M, N), generator=g).to(dev))


def _infonce_run(be, x, key_grad=False):
    e, ps = _leaf(x["pool"]), _leaf(x["pos"])
    loss = ops.sparse_infonce(e, x["q"], x["p"], x["neg"], temperature=0.3, pos_pool=ps,
                              key_grad=key_grad, backend=be)
    w = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device)
    return _grads((loss * w).sum(), [e, ps])


def _edt_make(dev, seed):
    g = _gen(seed)
    return dict(x=torch.randint(0, 4, (2, 13, 17), generator=g).to(dev))


def _edt_run(be, x):
    return {"d2": ops.distance_transform(x["x"], labels=True, squared=True, backend=be),
            "d": ops.distance_transform(x["x"] > 0, backend=be)}


def _contextrast_make(dev, seed):
    g = _gen(seed)
    B, C = 2, 5
    labels = torch.randint(0, C, (B, 16, 20), generator=g)
    labels[0, :2] = 255
    logits = torch.randn(B, C, 16, 20, generator=g)
    embs = [torch.randn(B, 8, 8, 10, generator=g), torch.randn(B, 8, 4, 5, generator=g)]
    return dict(embs=[e.to(dev) for e in embs], labels=labels.to(dev), logits=logits.to(dev))


def _contextrast_run(be, x):
    embs = [_leaf(e) for e in x["embs"]]
    loss = ops.pixel_anchor_loss(embs, x["labels"], x["logits"], layer_weights=(0.3, 1.0),
                                 backend=be)
    sel, err = ops.bane_negatives(x["labels"], x["logits"], 5, backend=be)
    return {"selected": sel, "err": err, **_grads(loss, embs)}


def _cs_make(dev, seed):
    g = _gen(seed)
    emb = F.normalize(torch.randn(2, 16, 8, 10, generator=g), dim=1)
    labels = torch.randint(0, 5, (2, 8, 10), generator=g)
    labels[0, :2] = 255
    pred = torch.where(torch.rand(2, 8, 10, generator=g) < 0.6, labels,
                       torch.randint(0, 5, (2, 8, 10), generator=g))
    pred = torch.where(labels == 255, 0, pred)
    return dict(emb=emb.to(dev), labels=labels.to(dev), pred=pred.to(dev))


def _cs_run(be, x):
    e = _leaf(x["emb"])
    out = _grads(ops.pixel_contrast_loss(e, x["labels"], x["pred"], max_samples=40,
                                         max_views=6, seed=3, backend=be), [e])
    e2 = _leaf(x["emb"])
    dense = ops.dense_contrast_loss(e2, x["labels"], backend=be)
    out.update({f"dense_{k}": v for k, v in _grads(dense, [e2]).items()})
    return out


def _tiled_make(dev, seed):
    g = _gen(seed)
    M, N, D, C = 70, 130, 20, 4
    return dict(a=F.normalize(torch.randn(M, D, generator=g), dim=1).to(dev),
                ya=torch.randint(-1, C, (M,), generator=g).to(dev),
                k=F.normalize(torch.randn(N, D, generator=g), dim=1).to(dev),
                yk=torch.randint(0, C, (N,), generator=g).to(dev))


def _tiled_run(be, x):
    a, k = _leaf(x["a"]), _leaf(x["k"])
    bank, npos = ops.supervised_contrast(a, x["ya"], k, x["yk"], temperature=0.1, backend=be)
    a2 = _leaf(x["a"])
    inb, _ = ops.supervised_contrast(a2, x["ya"], temperature=0.1, backend=be)
    a3, k3 = _leaf(x["a"]), _leaf(x["k"])
    nl = ops.negative_logsumexp(a3, x["ya"], k3, x["yk"], temperature=0.1, backend=be)
    w = torch.linspace(0.5, 1.5, nl.numel(), device=nl.device)
    nl = torch.where(x["ya"] >= 0, nl, 0.0)               # an ignored anchor's NL is -inf
    out = {f"bank_{k_}": v for k_, v in _grads(bank.sum(), [a, k]).items()}
    out.update({f"inbatch_{k_}": v for k_, v in _grads(inb.sum(), [a2]).items()})
    out.update({f"nl_{k_}": v for k_, v in _grads((nl * w).sum(), [a3, k3]).items()})
    out["npos"] = npos
    return out


def _cac_make(dev, seed):
    g = _gen(seed)
    n, N, D, C = 40, 300, 16, 5
    return dict(f1=F.normalize(torch.randn(n, D, generator=g), dim=1).to(dev),
                f2=F.normalize(torch.randn(n, D, generator=g), dim=1).to(dev),
                l1=(3 * torch.randn(n, C, generator=g)).to(dev),
                l2=(3 * torch.randn(n, C, generator=g)).to(dev),
                bank=F.normalize(torch.randn(N, D, generator=g), dim=1).to(dev),
                lab=torch.randint(0, C, (N,), generator=g).to(dev))


def _cac_run(be, x):
    a, b = _leaf(x["f1"]), _leaf(x["f2"])
    loss = ops.directional_contrast_loss(a, b, x["l1"], x["l2"], x["bank"], x["lab"],
                                         backend=be)
    return _grads(loss, [a, b])


def _u2pl_make(dev, seed):
    g = _gen(seed)
    B, D, h, w, C = 4, 8, 6, 7, 5
    probs = (3 * torch.randn(B, C, h, w, generator=g)).softmax(1)
    labels = torch.randint(0, C, (B, h, w), generator=g)
    labels[2:] = probs[2:].argmax(1)
    rel, unrel = ops.u2pl_masks(probs, labels, 2, 20.0)
    return dict(emb=torch.randn(B, D, h, w, generator=g).to(dev),
                temb=torch.randn(B, D, h, w, generator=g).to(dev), probs=probs.to(dev),
                labels=labels.to(dev), rel=rel.to(dev), unrel=unrel.to(dev))


def _u2pl_run(be, x):
    from pixcon.nn import UnreliableBank
    bank = UnreliableBank(5, 8, size=12).to(x["emb"].device)
    out = {}
    for step in range(2):                     # the second call samples a filled bank
        e = _leaf(x["emb"])
        loss = ops.u2pl_loss(e, x["labels"], x["probs"], x["temb"], bank, num_labeled=2,
                             reliable=x["rel"], unreliable=x["unrel"], num_queries=6,
                             num_negatives=4, seed=step, backend=be)
        out.update({f"{k}{step}": v for k, v in _grads(loss, [e]).items()})
    out["bank"] = bank.keys.clone()
    return out


CASES = (
    Case("reco_loss", _reco_make, _reco_run, 1e-5, 1e-5),
    Case("class_means", _means_make, _means_run, 1e-5, 1e-5),
    Case("samplers + philox", _samplers_make, _samplers_run, 0.0, 0.0),
    Case("sparse_infonce", _infonce_make, _infonce_run, 1e-5, 1e-6),
    Case("sparse_infonce key_grad", _infonce_make,
         lambda be, x: _infonce_run(be, x, key_grad=True), 1e-5, 1e-6),
    Case("distance_transform", _edt_make, _edt_run, 0.0, 0.0),
    Case("pixel_anchor_loss + bane_negatives", _contextrast_make, _contextrast_run, 1e-4, 1e-6),
    Case("pixel_contrast_loss + dense_contrast_loss", _cs_make, _cs_run, 1e-5, 1e-6),
    Case("supervised_contrast + negative_logsumexp", _tiled_make, _tiled_run, 1e-5, 2e-5),
    Case("directional_contrast_loss", _cac_make, _cac_run, 1e-5, 1e-6),
    Case("u2pl_loss (bank push, keys= InfoNCE)", _u2pl_make, _u2pl_run, 1e-5, 1e-6),
)


def run_case(case: Case, backend: str, device, seed: int = 0) -> dict:
    return case.run(backend, case.make(torch.device(device), seed))


def parity(case: Case, device, seed: int = 1) -> list[str]:
    """What differs between the case's Triton and reference outputs on ``device`` (at the case's
    tolerance; integers exactly) and between two Triton runs (bitwise): an empty list when
    nothing does."""
    ref = run_case(case, "reference", device, seed)
    got = run_case(case, "triton", device, seed)
    again = run_case(case, "triton", device, seed)
    bad = [] if got.keys() == ref.keys() else [f"outputs {sorted(got)} vs {sorted(ref)}"]
    for k in ref.keys() & got.keys():
        a, b = got[k].detach().cpu(), ref[k].detach().cpu()
        if b.dtype.is_floating_point:
            err = (a.double() - b.double()).abs() - case.atol - case.rtol * b.double().abs()
            if a.shape != b.shape or bool((err > 0).any()) or bool(a.isnan().any()):
                bad.append(f"{k}: off by up to {float(err.max()) if err.numel() else 0:.3g} "
                           f"beyond rtol={case.rtol}, atol={case.atol}")
        elif not torch.equal(a, b):
            bad.append(f"{k}: integers differ")
        if not torch.equal(again[k], got[k]):
            bad.append(f"{k}: two Triton runs differ")
    return bad


def main(argv=None):
    from pixcon._cli import HelpFormatter, check_device
    ap = argparse.ArgumentParser(prog="python -m tools.smoke", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parity", action="store_true",
                    help="also check each case against the reference (what tests/test_gpu.py "
                         "does, for a machine without pytest)")
    args = ap.parse_args(argv)
    check_device("python -m tools.smoke", args.device)
    from tools.aot import Recorder
    rec = Recorder(execute=True)              # names every kernel as it launches
    with rec.active():
        for case in CASES:
            out = run_case(case, "triton", args.device, args.seed)
            if torch.device(args.device).type == "cuda":
                torch.cuda.synchronize()
            print(f"smoke: {case.name}: {len(out)} outputs", flush=True)
    names = sorted({launch["kernel"].split(":")[-1] for launch in rec.launches})
    print(f"smoke: kernels: {', '.join(names)}", flush=True)
    failed = 0
    for case in CASES if args.parity else ():
        bad = parity(case, args.device, args.seed)
        failed += bool(bad)
        print(f"smoke: parity {case.name}: " + ("; ".join(bad) if bad else "ok"), flush=True)
    if args.parity:
        print(f"smoke: parity: {len(CASES) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
