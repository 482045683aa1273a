"""pixel_contrast_loss (ContrastiveSeg) and dense_contrast_loss benchmark: official-style vs
reference vs the CPU default (native: the compiled tiled contrast) vs fused (Triton),
forward+backward time, peak extra memory and bytes saved for backward.

    python benchmarks/bench_contrastiveseg.py                  # GPU: Cityscapes; CPU: reduced
    python benchmarks/bench_contrastiveseg.py --size tiny      # seconds; what CI runs
    python benchmarks/bench_contrastiveseg.py --dense 16384 65536 131072 --providers native

Metrics: fwd_bwd_ms (median); peak_extra_mib (peak of memory allocated during forward+backward
above what existed before: CUDA allocator statistics, on CPU the live tensor bytes counted op by
op, see pixcon.measure.peak_extra_bytes; it includes emb's gradient, which any loss must produce,
reported as grad_mib); saved_mib (what autograd keeps for backward beyond the inputs).

Setting "cityscapes" is specs/contrastiveseg.md §5 and §9: emb 8x256x128x256 fp32 (unit norm),
19 classes, max_samples 1024, max_views 100, in-batch and with a 19 x 10000 x 256 bank (R =
5000 per queue). "cpu" is the same at 4x256x64x128 with a 19 x 2000 bank. Dense mode: N
pixels at D = 256 (19 classes), no sampling; official-style has no dense mode (no paper code
runs it) and the plain reference refuses N above 8192, so the rows compare pixcon's tiles with
a plain torch.matmul of the same total FLOPs (``matmul_ms``: the machine's GEMM rate).
Writes <out>/<date>-<device>-contrastiveseg-<size>.{json,md}.
"""
from __future__ import annotations

import os
import sys

import torch

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchkit, baselines
import benchkit as pb  # noqa: E402
from pixcon.reference.contrastiveseg import DENSE_LIMIT
from pixcon.ops import dense_contrast_loss, pixel_contrast_loss
from pixcon.synthetic import reco_batch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import contrastiveseg_official_style  # noqa: E402

SIZES = {  # B, D, h, w, C, max_samples, max_views, bank R per queue
    "cityscapes": (8, 256, 128, 256, 19, 1024, 100, 5000),
    "cpu": (4, 256, 64, 128, 19, 1024, 100, 1000),
    "tiny": (2, 8, 12, 12, 4, 40, 5, 10),
}
PROVIDERS = ("official-style", "reference", "native", "fused")
BACKEND = {"reference": "reference", "native": "native", "fused": "triton"}


def inputs(size, device, seed=0):
    B, D, h, w, C, M, V, R = SIZES[size]
    emb, labels, probs = reco_batch(B, D, h, w, num_classes=C, present=C, device=device,
                                    seed=seed)
    emb = F.normalize(emb, dim=1).requires_grad_()
    pred = probs.argmax(dim=1)
    g = torch.Generator().manual_seed(seed + 1)
    queue = F.normalize(torch.randn(C, 2 * R, D, generator=g), dim=2).to(device)
    return emb, labels, pred, queue


def make_step(provider, emb, labels, pred, queue, M, V, use_bank, seed=0):
    C, R2, D = queue.shape
    if provider == "official-style":
        def loss_fn():
            return contrastiveseg_official_style(emb, labels, pred, max_samples=M, max_views=V,
                                                 queue=queue if use_bank else None)
    else:
        memory = None
        if use_bank:
            labels_k = torch.arange(C, device=queue.device).repeat_interleave(R2)
            memory = (queue.reshape(-1, D), labels_k)

        def loss_fn():
            return pixel_contrast_loss(emb, labels, pred, max_samples=M, max_views=V,
                                       memory=memory, seed=seed, backend=BACKEND[provider],
                                       check_values=False)

    return loss_fn, pb.fwd_bwd_step(emb, loss_fn)


def _usable(provider, device, meta):
    if provider == "fused":
        return device.type == "cuda" or meta["triton_interpret"]
    if provider == "native":
        return device.type == "cpu"
    return True


def run(size="cpu", providers=PROVIDERS, device=None, reps=3, out=None, verbose=True,
        bank=(False, True)):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    B, D, h, w, C, M, V, R = SIZES[size]
    meta = pb.metadata(device)
    emb, labels, pred, queue = inputs(size, device)
    rows = []
    for use_bank in bank:
        for provider in providers:
            if not _usable(provider, device, meta):
                continue
            keys = C * 2 * R if use_bank else M
            if provider == "reference" and M * keys > DENSE_LIMIT:
                if verbose:   # the plain reference refuses matrices this large (use the tiles)
                    print(f"[{size} bank={use_bank}] reference: skipped ({M} x {keys} logits)",
                          file=sys.stderr, flush=True)
                continue
            if verbose:
                print(f"[{size} bank={use_bank}] {provider} ...", file=sys.stderr, flush=True)
            loss_fn, step = make_step(provider, emb, labels, pred, queue, M, V, use_bank)
            ms, peak, saved, loss = pb.measure(step, loss_fn, device, reps,
                                               [emb, labels, pred, queue])
            rows.append({
                "op": "pixel_contrast_loss", "provider": provider, "size": size,
                "bank": f"{C}x{2 * R}" if use_bank else "none", "shape": [B, D, h, w],
                "num_classes": C, "max_samples": M, "max_views": V,
                "loss": loss, "fwd_bwd_ms": round(ms, 3),
                "peak_extra_mib": None if peak is None else round(peak / 2**20, 2),
                "peak_rss_mib": pb.last_rss_mib(),
                "grad_mib": round(emb.numel() * emb.element_size() / 2**20, 2),
                "saved_mib": round(saved / 2**20, 3), **meta})
    if out:
        pb.write_results(rows, out, f"contrastiveseg-{size}", markdown(rows))
    return rows


def run_dense(sizes, providers=("native", "fused"), device=None, reps=1, out=None, verbose=True,
              D=256, C=19):
    """Dense mode at N pixels (N = B x 128 x 128 with B = N / 16384, or one image of N pixels)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = pb.metadata(device)
    rows = []
    for N in sizes:
        side = 128 if N % 16384 == 0 else 1
        B, h, w = (N // 16384, 128, 128) if side == 128 else (1, 1, N)
        emb, labels, _ = reco_batch(B, D, h, w, num_classes=C, present=C, device=device, seed=N)
        emb = F.normalize(emb, dim=1).requires_grad_()
        valid = int((labels != 255).sum())
        a, k = torch.randn(min(N, 2048), D, device=device), torch.randn(N, D, device=device)
        matmul_ms = pb.time_ms(lambda: a @ k.T, device, warmup=1, reps=3) * N / a.shape[0]
        for provider in providers:
            if not _usable(provider, device, meta):
                continue
            if verbose:
                print(f"[dense N={N}] {provider} ...", file=sys.stderr, flush=True)

            def loss_fn():
                return dense_contrast_loss(emb, labels, backend=BACKEND[provider],
                                           check_values=False)

            step = pb.fwd_bwd_step(emb, loss_fn)

            losses = []
            ms = pb.time_ms(lambda: losses.append(float(step().detach())), device, warmup=0,
                            reps=reps)                                # minutes at 131k on CPU
            peak = pb.peak_extra_bytes(step, device)
            saved = pb.saved_bytes(loss_fn, [emb, labels])
            # forward: 1 + 1/C logit GEMMs; backward: 1 recompute + 2 gradient GEMMs
            gemms = 1 + 1 / C + 3
            rows.append({
                "op": "dense_contrast_loss", "provider": provider, "size": f"N={N}",
                "pixels": N, "valid_pixels": valid, "dim": D, "num_classes": C,
                "loss": losses[-1], "fwd_bwd_ms": round(ms, 1),
                "matmul_ms": round(matmul_ms, 1),
                "gemm_rate_vs_matmul": round(gemms * matmul_ms * (valid / N) ** 2 / ms, 3),
                "peak_extra_mib": None if peak is None else round(peak / 2**20, 2),
                "peak_rss_mib": pb.last_rss_mib(),
                "saved_mib": round(saved / 2**20, 3), **meta})
    if out and rows:
        pb.write_results(rows, out, "dense-contrast", markdown_dense(rows))
    return rows


def markdown(rows) -> str:
    if not rows:
        return "(no rows)\n"
    m = rows[0]
    lines = [pb.title("pixel_contrast_loss", m), "",
             "| size | bank | provider | fwd+bwd ms | speed-up vs official | peak extra MiB "
             "(incl. grad) | grad MiB | saved for bwd MiB | loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((x for x in rows if x["provider"] == "official-style"
                     and x["bank"] == r["bank"]), None)
        sp = f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x" if base else "-"
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        lines.append(f"| {r['size']} {tuple(r['shape'])} | {r['bank']} | {r['provider']} | "
                     f"{r['fwd_bwd_ms']:.1f} | {sp} | {peak} | {r['grad_mib']:.1f} | "
                     f"{r['saved_mib']:.2f} | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def markdown_dense(rows) -> str:
    m = rows[0]
    lines = [pb.title("dense_contrast_loss", m), "",
             "| N pixels | provider | fwd+bwd s | GEMM rate vs torch.matmul | peak extra MiB | "
             "saved for bwd MiB | N x N fp32 would be MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        lines.append(f"| {r['pixels']} | {r['provider']} | {r['fwd_bwd_ms'] / 1e3:.1f} | "
                     f"{r['gemm_rate_vs_matmul']:.0%} | {peak} | {r['saved_mib']:.1f} | "
                     f"{r['valid_pixels'] ** 2 * 4 / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = pb.parser(__doc__, SIZES, "cityscapes (GPU default), cpu (CPU default) or tiny",
                   providers=PROVIDERS)
    ap.add_argument("--dense", nargs="*", type=int, default=None,
                    help="run the dense mode at these pixel counts instead")
    a = ap.parse_args(argv)
    if a.dense is not None:
        provs = [p for p in a.providers if p in ("native", "fused")]
        rows = run_dense(a.dense or [16384, 65536, 131072], provs, reps=a.reps, out=a.out)
        print(markdown_dense(rows))
        return
    size = a.size or ("cityscapes" if torch.cuda.is_available() else "cpu")
    rows = run(size, a.providers, reps=a.reps, out=a.out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
