"""u2pl_loss (U2PL's contrastive loss with unreliable negatives) benchmark: official-style vs
reference vs native (the CPU default) vs fused (Triton), forward+backward, with the queues full.

    python benchmarks/bench_u2pl.py              # GPU: VOC; CPU: reduced
    python benchmarks/bench_u2pl.py --size tiny  # what CI runs

"voc": U2PL's VOC setting: 2 labelled + 2 unlabelled images a GPU, 513 crops, the
representation at stride 4 (129 x 129), D = 256, 21 classes, queues of 30,000 keys (50,000 for
class 0), 256 anchors x 50 negatives (specs/u2pl.md §2). Each step pushes the batch's negatives
into full queues first, as the official code does. Metrics as bench_reco.
"""
from __future__ import annotations

import inspect
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchkit, baselines
import benchkit as pb  # noqa: E402
from pixcon.nn import UnreliableBank
from pixcon.ops import u2pl_loss, u2pl_masks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import u2pl_official_style  # noqa: E402

SIZES = {  # B (labelled + unlabelled), num_labeled, D, h, w, C, queue sizes, Q, N
    "voc": (4, 2, 256, 129, 129, 21, (50000,) + (30000,) * 20, 256, 50),
    "cpu": (4, 2, 256, 65, 65, 21, (50000,) + (30000,) * 20, 256, 50),
    "tiny": (2, 1, 8, 12, 12, 4, (50,) * 4, 8, 5),
}
PROVIDERS = ("official-style", "reference", "native", "fused")
BACKEND = {"reference": "reference", "native": "native", "fused": "triton"}


def make_inputs(size, device, seed=0):
    B, L, D, h, w, C, sizes, Q, N = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, C, (B, 1, max(h // 16, 2), max(w // 16, 2)), generator=g)
    gt = F.interpolate(coarse.float(), size=(h, w)).long()[:, 0]
    logits = 4 * F.one_hot(gt, C).permute(0, 3, 1, 2).float() + 2 * torch.randn(B, C, h, w,
                                                                                 generator=g)
    probs = logits.softmax(1)
    labels = torch.where(torch.arange(B)[:, None, None] < L, gt, probs.argmax(1))
    emb = torch.randn(B, D, h, w, generator=g)
    temb = emb + 0.1 * torch.randn(B, D, h, w, generator=g)
    queue = F.normalize(torch.randn(sum(sizes), D, generator=g), dim=1)
    rel, unrel = u2pl_masks(probs, labels, L, 20.0)
    dev = torch.device(device)
    return (emb.to(dev).requires_grad_(), labels.to(dev), probs.to(dev), temb.to(dev),
            rel.to(dev), unrel.to(dev), queue)


def _full_bank(C, D, sizes, queue, device):
    bank = UnreliableBank(C, D, sizes=sizes).to(device)
    bank.keys.copy_(queue.to(device))
    bank.counts.copy_(bank.sizes)
    return bank


def make_step(provider, inputs, size):
    B, L, D, h, w, C, sizes, Q, N = SIZES[size]
    emb, labels, probs, temb, rel, unrel, queue = inputs
    if provider == "official-style":
        offs = torch.cumsum(torch.tensor((0,) + sizes[:-1]), 0).tolist()
        queues = [queue[o:o + s].clone() for o, s in zip(offs, sizes)]
        gt = torch.where(labels == 255, -1, labels)

        def loss_fn():
            return u2pl_official_style(emb, gt, probs, rel[:, None].float(),
                                       unrel[:, None].float(), temb, queues, num_labeled=L,
                                       sizes=sizes, num_queries=Q, num_negatives=N)
        keys = []
    else:
        bank = _full_bank(C, D, sizes, queue, emb.device)
        keys = [bank.keys]

        def loss_fn():
            return u2pl_loss(emb, labels, probs, temb, bank, num_labeled=L, reliable=rel,
                             unreliable=unrel, num_queries=Q, num_negatives=N, seed=3,
                             backend=BACKEND[provider], check_values=False)
    return loss_fn, pb.fwd_bwd_step(emb, loss_fn), keys


def pushed_rows(inputs, size):
    """The (class, pixel) pairs a step pushes into the queues at these inputs (the negative
    candidates of u2pl_loss's defaults): the floor's push bytes (benchmarks/floor.py)."""
    from pixcon.core import common as cm
    from pixcon.core import u2pl as steps
    B, L, D, h, w, C, sizes, Q, N = SIZES[size]
    emb, labels, probs, temb, rel, unrel, queue = inputs
    gt = cm.pixel_labels(labels, (h, w), C, 255)
    prob = probs.permute(0, 2, 3, 1).reshape(-1, C).float()
    default = {k: v.default for k, v in inspect.signature(u2pl_loss).parameters.items()}
    masks = steps.class_masks(gt, prob, rel.reshape(-1), unrel.reshape(-1), L, h * w,
                              **{k: default[k] for k in ("low_rank", "high_rank", "official",
                                                         "anchor_threshold",
                                                         "negative_threshold")})
    return int(masks[2].sum())


def run(size="cpu", providers=PROVIDERS, device=None, reps=3, out=None, verbose=True):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = pb.metadata(device)
    B, L, D, h, w, C, sizes, Q, N = SIZES[size]
    inputs = make_inputs(size, device)
    pushed = pushed_rows(inputs, size)
    rows = []
    for provider in providers:
        if not pb.can_run(provider, device, meta):
            continue
        if verbose:
            print(f"[{size}] {provider} ...", file=sys.stderr, flush=True)
        loss_fn, step, keys = make_step(provider, inputs, size)
        ms, peak, saved, loss = pb.measure(step, loss_fn, device, reps,
                                           [inputs[0], inputs[3]] + keys)
        rows.append({"op": "u2pl_loss", "provider": provider, "size": size,
                     "shape": [B, D, h, w], "num_classes": C, "num_labeled": L,
                     "queue_keys": sum(sizes), "num_queries": Q, "num_negatives": N,
                     "pushed": pushed, **pb.step_metrics(ms, peak, saved, loss), **meta})
    if out:
        pb.write_results(rows, out, f"u2pl-{size}", markdown(rows))
    return rows


def markdown(rows) -> str:
    m = rows[0]
    lines = [pb.title("u2pl_loss", m), "",
             "| size | provider | fwd+bwd ms | peak extra MiB | saved for bwd MiB | loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        B, D, h, w = r["shape"]
        lines.append(f"| {r['size']} {B}x{D}x{h}x{w}, {r['queue_keys']} queued | "
                     f"{r['provider']} | {r['fwd_bwd_ms']:.2f} | {peak} | {r['saved_mib']:.2f} | "
                     f"{r['loss']:.5f} |")
    lines += ["", "The losses differ: official-style draws with torch's generator and reads the "
              "labels as the official code does (its one-hot puts every image into image 0, "
              "specs/u2pl.md §3); pixcon draws from Philox and reads them as the paper does."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    pb.single_size_main(__doc__, SIZES, PROVIDERS, "voc", run, markdown, argv)


if __name__ == "__main__":
    main()
