"""A first-principles cost model of every fused op at the papers' settings: per kernel, the bytes
it must move, the bytes it moves as written, its FLOPs and the unit that runs them; per op, the
floor and the estimated time on an H100 and an A100, next to an estimate of the official-style
code (the cost structure of benchmarks/baselines.py). Estimates, not measurements: no GPU has
run them; the benchmark suite records measured times beside them when one does.

    time(kernel) = max(max(bytes / bandwidth, FLOPs / (rate of its unit x efficiency)) / fill,
                       waves x latency) + launches x LAUNCH_S
    waves        = ceil(programs / (SMs x programs per SM)); latency: one program's chain of
                   dependent steps (programs sharing an SM overlap theirs)
    fill         = programs / (SMs x the programs the busiest SM runs): each program gets its
                   SM's share of bandwidth and rate, divided among the programs there at once
                   (a 16-program grid on 132 SMs gets 16/132 of the GPU; torch's own kernels,
                   whose grids are not modelled, 1)
    programs per SM: from pixcon_kernels/RESOURCES.md (the compile check's theoretical
                   occupancy of the kernel on that GPU's architecture: registers, shared memory
                   and warps), i.e. occupancy x 64 warps / the launch's warps
    floor(op)    = max(must bytes / bandwidth, must FLOPs / best rate)   (no launch cost)

The grids are the launchers' own (``pixel_tiles``, ``tiled.launch_plan``, the EDT's row and
column blocks). The official-style estimate uses the same model: its GEMMs run at
OFFICIAL_GEMM_EFFICIENCY of the unit's peak (cuBLAS on large fp32 matrices), its elementwise
passes at full bandwidth over every matrix it materialises.

"must" counts what any implementation of the step has to do: every input read once, every
output written once, each gathered row read once per use (ReCo's negatives: no cache reuse is
assumed, the rows being spread over a 134 MB map), each GEMM the math needs once. "moved as
written" follows the kernels and launchers in this folder: which tensors they read and write,
how many times (a tile reloaded per D block counts again), at 32-byte sector granularity for
gathers. All figures fp32 inputs unless a row says otherwise.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

GPUS = {  # nominal peaks (NVIDIA datasheets), dense; "int": 32-bit integer ops
    "H100": dict(name="H100 SXM", bw=3.35e12, fma=67e12, tf32=494.7e12, bf16=989.4e12,
                 int=33.5e12, fp64=67e12, sms=132),
    "A100": dict(name="A100 SXM 80GB", bw=2.039e12, fma=19.5e12, tf32=156e12, bf16=312e12,
                 int=19.5e12, fp64=19.5e12, sms=108),
}
LAUNCH_S = 3e-6          # launch and tail of one kernel (or one small torch op)
SYNC_S = 10e-6           # a host sync (.item(), nonzero, a host-made index copied over): the
                         # queue drains, a round trip, the next launch starts cold (stated)
OFFICIAL_GEMM_EFFICIENCY = 0.7   # cuBLAS fp32 GEMMs: a stated share of the peak, not measured
ARCH = {"H100": "sm_90", "A100": "sm_80"}
RESOURCES = Path(__file__).resolve().parents[1] / "pixcon_kernels" / "RESOURCES.md"
F32, I32, I64, SECTOR = 4, 4, 8, 32
# the papers' settings (the same numbers as the benchmarks' SIZES, tested to stay so)
RECO_VOC = dict(B=20, D=256, h=81, w=81, C=21, K=21, Q=256, N=512)
CONTEXTRAST_HRNET = dict(B=8, D=256, layers=((128, 256), (64, 128), (32, 64), (16, 32)), C=19)
CONTRASTIVESEG_CS = dict(B=8, D=256, h=128, w=256, C=19, M=1024, bank=19 * 10000)
CAC_CS = dict(n=8100, N=129600, D=128)
DENSE = dict(n=131072, D=256, C=19)
EDT = dict(B=8, H=512, W=512)
U2PL_VOC = dict(B=4, D=256, h=129, w=129, C=21, Q=256, N=50,
                pushed=186_524)      # the pairs bench_u2pl's VOC inputs push (pushed_rows)


def gpu_key(gpu: dict) -> str:
    return next(k for k, g in GPUS.items() if g is gpu or g == gpu)


@functools.lru_cache(maxsize=None)
def _occupancy(kernel: str, arch: str) -> float:
    """The kernel's theoretical occupancy on ``arch`` (the summary of RESOURCES.md: the worst
    case over its compiled GPU settings)."""
    pat = re.compile(rf"^\| `{re.escape(kernel)}` \| {arch} \| \d+ \| \d+ \| \d+ \| \d+ "
                     rf"\| ([\d.]+) \|", re.M)
    m = pat.search(RESOURCES.read_text())
    if m is None:
        raise KeyError(f"tools/cost.py: {kernel} ({arch}) is not in {RESOURCES.name}: "
                       "run ./dev kernels")
    return float(m.group(1))


def programs_per_sm(kernel: str, arch: str, warps: int) -> int:
    """Programs of ``warps`` warps one SM holds: occupancy x 64 warps / warps (at least 1)."""
    return max(1, round(_occupancy(kernel, arch) * 64 / warps))


def rate(gpu: dict, unit: str) -> float:
    """FLOP rate of a unit: fma = fp32 CUDA cores; tf32x3 = three TF32 tensor-core products
    per fp32 product (fp32-level accuracy); bf16 tensor cores; int; fp64."""
    return gpu["tf32"] / 3 if unit == "tf32x3" else gpu[unit]


@dataclass
class Kernel:
    name: str
    must: float          # bytes any implementation of this step moves
    moved: float         # bytes as written
    flops: float
    unit: str = "fma"
    launches: int = 1
    note: str = ""
    latency: float = 0.0  # seconds of dependent steps no parallelism hides (a lower bound)
    must_flops: float | None = None    # FLOPs the step needs (default: as written)
    programs: int | None = None   # the grid (None: not modelled, taken as filling the GPU)
    per_sm: int | None = None     # programs one SM holds at once; None: from RESOURCES.md
    triton: str | None = None     # the Triton kernel whose resources set per_sm
    warps: int = 4                # its launch's warps
    efficiency: float = 1.0       # share of the unit's peak its FLOPs run at
    gathered: float = 0.0         # of ``must``, the bytes read as random rows (a CPU reads
                                  # them at its random-row rate, not its streaming rate)

    def slots(self, gpu: dict) -> int:
        """Programs one SM of ``gpu`` holds at once."""
        if self.per_sm is not None:
            return self.per_sm
        if self.triton is None:
            return 1
        return programs_per_sm(self.triton, ARCH[gpu_key(gpu)], self.warps)

    def waves(self, gpu: dict) -> int | None:
        if self.programs is None:
            return None
        return max(-(-self.programs // (gpu["sms"] * self.slots(gpu))), 1)

    def fill(self, gpu: dict) -> float:
        """The share of the GPU's throughput the grid keeps busy: each program gets its SM's
        share of bandwidth and rate, divided among the programs running there at once, so the
        time is set by the busiest SM: (slots x full waves + its share of the last wave)
        programs' work. fill = programs / (SMs x that) (1 where the grid is not modelled)."""
        if self.programs is None:
            return 1.0
        S, k, n = gpu["sms"], self.slots(gpu), max(self.programs, 1)
        full, rest = divmod(n, S * k)
        return n / (S * (full * k + -(-rest // S)))

    def time(self, gpu: dict) -> float:
        """max(work / fill, waves x the chain of dependent steps of one program) + launches;
        programs sharing an SM overlap their chains, each wave waits for its own."""
        compute = self.flops / (rate(gpu, self.unit) * self.efficiency)
        work = max(self.moved / gpu["bw"], compute) / self.fill(gpu)
        return max(work, (self.waves(gpu) or 1) * self.latency) + self.launches * LAUNCH_S

    def needed_flops(self) -> float:
        return self.flops if self.must_flops is None else self.must_flops


@dataclass
class Op:
    name: str
    setting: str
    kernels: list[Kernel]
    official: list[Kernel] = field(default_factory=list)
    must_flops_unit: str = "fma"
    note: str = ""
    gap: str = ""          # why the estimate is more than 2x the floor (one line), if it is

    def estimate(self, gpu: dict) -> float:
        return sum(k.time(gpu) for k in self.kernels)

    def floor(self, gpu: dict) -> float:
        must = sum(k.must for k in self.kernels)
        flops = sum(k.needed_flops() for k in self.kernels if k.unit != "int")
        return max(must / gpu["bw"], flops / rate(gpu, self.must_flops_unit))

    def gathered(self) -> float:
        """Bytes of the floor's ``must`` that are random-row reads."""
        return sum(k.gathered for k in self.kernels)

    def official_estimate(self, gpu: dict) -> float | None:
        return sum(k.time(gpu) for k in self.official) if self.official else None


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _cdiv(a, b):
    return -(-a // b)


def _class_sums_grid(P, HW, C, D):
    """pixcon_kernels.segment.class_sums' GPU grid: (pixel-tile programs, class blocks, D
    blocks)."""
    from pixcon_kernels._utils import pixel_tiles
    G = pixel_tiles(P, HW, 32, min(512, (8 << 20) // max(C * D, 1)))[2]
    return G * _cdiv(C, 64) * _cdiv(D, 64)


def _anchor_grid(P, HW, C, D):
    """pixcon_kernels.anchor's GPU layout (64-pixel tiles over at most 264 programs, 32-class
    blocks, 32-wide D chunks): (tiles T, programs G, terms programs G2, class blocks)."""
    from pixcon_kernels._utils import pixel_tiles
    T, _, G, per = pixel_tiles(P, HW, 64, 264)
    return T, G, _cdiv(max(P, 1), per * 64), _cdiv(C, 32)


def reco(B, D, h, w, C, K, Q, N, elt=F32) -> Op:
    """ReCo (pixcon_kernels.reco + segment): one read of emb for class sums and contiguous
    rows; in-kernel negatives; backward a scale and a scatter."""
    P, M = B * h * w, K * Q
    E = P * D * elt
    rows = M * (N + 1) * D * elt                     # gathered rows (queries + negatives)
    ks = [
        Kernel("_class_sums_kernel (rows=True)", E + P * I32, 2 * E + P * I32
               + 2 * 512 * C * D * F32, 2.0 * P * _pow2(C) * D, "fma", must_flops=2.0 * P * D,
               programs=_class_sums_grid(P, h * w, C, D), triton="_class_sums_kernel",
               note="reads emb once (pixel-contiguous tiles), writes the rows; one-hot FMA dot"),
        Kernel("torch glue (labels, hard mask, sort by class, query sampler, relation cdf)",
               P * (I32 + F32), P * C * F32 + 16 * P * I64, 0.0, "fma", launches=25,
               note="P-length passes; probs read once for the hard mask"),
        Kernel("_reco_infonce_kernel", rows + M * D * F32,
               rows + M * N * SECTOR + M * (D + 4) * F32, 6.0 * M * (N + 1) * D, "fma",
               programs=M, triton="_reco_infonce_kernel", gathered=rows,
               note="a gathered row is read once; + one 32-byte sector of `order` per negative"),
        Kernel("backward: scale, scatter into a zero map", E + M * D * F32,
               E + 3 * M * D * F32, 2.0 * M * D, "fma", launches=4,
               note="the embedding's gradient is written once (zeros + rows)"),
    ]
    official = [  # fp32 matmuls at torch's default precision (no TF32): CUDA cores
        Kernel("permute emb to rows, class means, masks", 0, 3 * E + P * C * F32 * 3, 0.0,
               launches=40),
        Kernel("per class: gather Q x (1+N) x D keys, cat, cosine, logsumexp", 0, 4 * rows,
               4.0 * M * (N + 1) * D, launches=20 * K, efficiency=OFFICIAL_GEMM_EFFICIENCY),
        Kernel("backward: cosine and gather grads, index_put", 0, 2 * rows + 2 * E,
               4.0 * M * (N + 1) * D, launches=10 * K, efficiency=OFFICIAL_GEMM_EFFICIENCY),
    ]
    return Op("reco_loss", f"VOC {B}x{D}x{h}x{w}, K={K}, Q={Q}, N={N}", ks, official)


def contextrast(B, D, layers, C, elt=F32) -> Op:
    """Contextrast L_PA (pixcon_kernels.anchor + segment + edt), every layer of the pyramid.
    The FLOPs a step must do: one dot product a pixel with its own class's anchor per pass (the
    loss reads the other logits only at BANE's negatives, a data-dependent tenth of the pixels
    not counted here: a lower bound, which the CPU kernels' sparse tiles follow); the Triton
    kernels compute every pixel's C logits."""
    ks, off = [], []
    Cp = _pow2(C)
    for (h, w) in layers:
        P = B * h * w
        E, S = P * D * elt, P * C * F32
        lab = 3 * P * I32
        tag = f"{h}x{w}"
        T, G, G2, ncb = _anchor_grid(P, h * w, C, D)
        a8 = dict(warps=8)
        ks += [
            Kernel(f"_inv_norm_kernel {tag}", 0, E + P * F32, 2.0 * P * D, programs=T,
                   triton="_inv_norm_kernel", **a8),
            Kernel(f"_class_sums_kernel (scale) {tag}", E + P * I32, E + 2 * P * F32
                   + 2 * 264 * C * D * F32, 2.0 * P * Cp * D, must_flops=2.0 * P * D,
                   programs=_class_sums_grid(P, h * w, C, D), triton="_class_sums_kernel"),
            Kernel(f"BANE error map and selection {tag}", 2 * P * I64, 10 * P * I64, 0.0,
                   "int", launches=12, note="torch: one sort by (class, distance)"),
            Kernel(f"_logits_kernel {tag}", E + lab, E + lab + S, 2.0 * P * Cp * D, "tf32x3",
                   must_flops=2.0 * P * D, programs=G * ncb, triton="_logits_kernel", **a8,
                   note="S = z . a / t stored once"),
            Kernel(f"_terms_kernel {tag}", 0, S + P * I32, 10.0 * P * Cp, programs=G2 * ncb,
                   triton="_terms_kernel", **a8),
            Kernel(f"_da_kernel {tag}", E + lab, E + lab + (D // 32) * S, 2.0 * P * Cp * D,
                   "tf32x3", must_flops=2.0 * P * D, programs=G * ncb * _cdiv(D, 32),
                   triton="_da_kernel", **a8, note="S reread per 32-wide D block"),
            Kernel(f"_dx_kernel {tag}", E, 3 * E + S + lab, 2.0 * P * Cp * D + 4.0 * P * D,
                   "tf32x3", must_flops=2.0 * P * D, programs=T, triton="_dx_kernel", **a8,
                   note="writes the NCHW gradient once, class sums' term folded in (x read "
                        "twice)"),
        ]
        off += [
            Kernel(f"normalise, permute, one-hot anchors, logits {tag}", 0, 6 * E + 4 * S,
                   2 * 2.0 * P * C * D, "fma", launches=20, efficiency=OFFICIAL_GEMM_EFFICIENCY),
            Kernel(f"BANE on the host (SciPy EDT per class), masks {tag}", 0, 2 * P * I64
                   + 6 * S, 0.0, launches=10 + C),
            Kernel(f"backward: logits, normalise, permute grads {tag}", 0, 6 * E + 3 * S,
                   2 * 2.0 * P * C * D, "fma", launches=20, efficiency=OFFICIAL_GEMM_EFFICIENCY),
        ]
    ks += edt_kernels([(B, h, w) for h, w in layers], I64,
                      "EDT of every layer's error map (one ragged launch)")
    layers_s = ", ".join(f"{h}x{w}" for h, w in layers)
    return Op("pixel_anchor_loss", f"B={B}, D={D}, C={C}, layers {layers_s}", ks, off,
              must_flops_unit="tf32x3",
              note="official-style BANE runs SciPy on the host: its time is not modelled",
              gap="its Triton kernels compute every pixel's C logits and keep S (P x C) for "
                  "backward, rereading it; the CPU's sparse tiles (a pixel's own class and "
                  "BANE's negatives only, nothing kept) are the way to about 2x")


def _tiled(name, setting, M, N, D, sweeps_fwd, grad_gemms, recomputes, elt=F32,
           glue=None, official=None, key_grad=True, precision="fp32") -> Op:
    """The tiled contrast (pixcon_kernels.tiled): key tiles streamed past anchor tiles that run
    concurrently (the key tile in L2 serves them all: keys counted once per sweep); the keys are
    split across programs (the launcher's own plan, ``tiled.launch_plan``: the grids below),
    whose partials (a few floats per anchor and split, D per anchor and split in the backward)
    are merged by torch: counted as the gradient's bytes once more. The gradient programs hold
    at most 256 columns of D: above that the logits are recomputed once per D block.
    Programs per SM from RESOURCES.md: the forward kernels 2 (4 warps, up to 255 registers),
    the gradient kernels 1 (8 warps, about 240), read from the table. precision: the opt-in
    products of fp32 rows (one TF32 product, or bf16 operands, instead of three TF32)."""
    from pixcon_kernels.tiled import launch_plan
    plan = launch_plan(M, N, D, elt == 8, gpu=True)
    G = 2.0 * M * N * D
    unit = {"fp32": "tf32x3", "tf32": "tf32", "bf16": "bf16"}[precision] if elt == F32 \
        else "bf16"
    A, Kb = M * D * elt, N * D * elt
    nd = plan["d_blocks"]
    rec = recomputes + (nd - 1) * (2 if key_grad else 1)
    ks = list(glue or []) + [
        Kernel("_tiled_lse_kernel + _tiled_pos_kernel", A + Kb + 3 * M * F32,
               A + sweeps_fwd * Kb + 3 * M * F32 * plan["fwd_splits"],
               sweeps_fwd * G, unit, launches=2, must_flops=G, programs=plan["fwd_programs"],
               triton="_tiled_lse_kernel", note=f"{sweeps_fwd:.2f} sweeps over the keys, "
                              f"{plan['fwd_splits']} key splits"),
        Kernel("_tiled_bwd_da_kernel + _tiled_bwd_dk_kernel", A + Kb + M * D * F32,
               A + (rec + grad_gemms) * Kb + 2 * M * D * F32 * plan["bwd_splits"],
               (rec + grad_gemms) * G, unit, launches=grad_gemms,
               must_flops=grad_gemms * G, programs=plan["bwd_programs"],
               triton="_tiled_bwd_da_kernel", warps=8,
               note=f"logits recomputed {rec}x, {plan['bwd_splits']} key splits"),
    ]
    return Op(name, setting, ks, official or [], must_flops_unit=unit)


def contrastiveseg(B, D, h, w, C, M, bank, elt=F32) -> list[Op]:
    """ContrastiveSeg at its Cityscapes setting, in-batch and with its bank. The fused path
    samples its M anchors from the labels and predictions at feature resolution and gathers
    only their rows (never the whole embedding): torch glue on the GPU (the sampler's two
    stable sorts of P int64 (key, index) pairs, 8 radix passes each reading and writing 32 B a
    pixel, about 12 more P-length passes; the rows' D elements each a 32-byte sector of the
    NCHW map). The official code samples per image (a unique(), a count read back per class)
    and per kept (image, class) (two nonzero() and two CPU randperm() copied over, a row
    copy): every class present in every image (the benchmark's labels), B C pairs, about 16
    launches and 4 host syncs each."""
    P = B * h * w
    E = P * D * elt
    rows = M * D * elt
    glue = [Kernel("torch glue (anchor sampling: two sorts of the pixels; gather M rows)",
                   2 * P * I64 + rows, 2 * P * I64 + 2 * 8 * P * 32 + 12 * 2 * P * I64
                   + M * D * SECTOR, 0.0, launches=30, gathered=rows)]
    sampler = Kernel("official sampler: per image unique() and class counts read back, per "
                     "(image, class) nonzero() x 2, randperm() x 2 on the host, row copy", 0,
                     2 * E + B * C * 4 * P // B * I64, 0.0, launches=B * (5 + 2 * C) + 16 * B * C,
                     latency=(B * (1 + C) + 4 * B * C) * SYNC_S)
    ops = []
    for N, tag, key_grad in ((M, "in-batch", True), (bank, f"bank {C}x{bank // C}", False)):
        official = [sampler,
                    Kernel("anchors x keys logits, masks, softmax, grads (materialised)", 0,
                           10 * M * N * F32 + (M + N) * D * F32, 3 * 2.0 * M * N * D,
                           "fma", launches=40, efficiency=OFFICIAL_GEMM_EFFICIENCY)]
        ops.append(_tiled("pixel_contrast_loss", f"Cityscapes {tag}: {M} anchors x {N} keys, "
                          f"D={D}", M, N, D, 1 + 1 / C, 2 if key_grad else 1, 2 if key_grad
                          else 1, elt, glue, official, key_grad=key_grad))
    ops[0].gap = ("the anchor sampler is torch glue on the GPU (two sorts of every pixel, 30 "
                  "launches: 0.15 of its 0.18 ms); a Triton sampler choosing per (image, class) "
                  "without a sort, as the CPU kernel does, is the way to its floor")
    return ops


def cac(n, N, D, elt=F32) -> Op:
    official = [Kernel("anchors x negatives logits, exp, sums, grads (materialised)", 0,
                       8 * n * N * F32 + (n + N) * D * F32, 3 * 2.0 * n * N * D, "fma",
                       launches=30, efficiency=OFFICIAL_GEMM_EFFICIENCY)]
    return _tiled("directional_contrast_loss", f"Cityscapes {n} anchors x {N} negatives, D={D}",
                  n, N, D, 1, 1, 1, elt, official=official, key_grad=False)


def dense(n, D, C, elt=F32, precision="fp32") -> Op:
    tag = "" if precision == "fp32" else f", precision={precision}"
    op = _tiled("dense_contrast_loss", f"{n} pixels, D={D}, in-batch{tag}", n, n, D, 1 + 1 / C,
                2, 2, elt, precision=precision)
    op.note = (f"no official code runs it: the n x n logits alone are {n * n * F32 / 2**30:.0f} "
               f"GiB")
    return op


def u2pl(B, D, h, w, C, Q, N, pushed, elt=F32) -> Op:
    """U2PL (pixcon.ops.u2pl on the sparse InfoNCE kernels): the (pixels x classes) masks from a
    sort of the teacher probabilities, the push of ``pushed`` negative rows into the queues,
    the teacher class means (one GEMM), the samplers, and the sparse InfoNCE reading the bank's
    rows in place once, in the forward, which keeps each query's direction; the backward is a
    scale and a scatter. ``pushed``: rows queued a step (the benchmark's VOC inputs: 186,524,
    about 2.8 a pixel)."""
    P, M = B * h * w, C * Q
    E = P * D * elt
    rows = M * (N + 1) * D * elt
    ks = [
        Kernel("torch glue (ranks: sort of the teacher probs, class masks, sampler groups)",
               P * C * F32, 6 * P * C * F32 + 4 * P * C * I64, 0.0, "fma", launches=40),
        Kernel("_bank_push_kernel (+ ranks in class, slots: torch)", 2 * pushed * D * F32,
               2 * pushed * D * F32 + 3 * P * C * I64, 0.0, "fma", launches=10,
               programs=C * _cdiv(P, 64) * _cdiv(D, 128), triton="_bank_push_kernel"),
        Kernel("teacher class means (one GEMM)", E, E + P * C * F32, 2.0 * P * C * D, "tf32x3"),
        Kernel("_sample_in_groups_kernel", M * (N + 1) * I32, M * (N + 1) * (I32 + SECTOR), 0.0,
               "int", launches=2, programs=_cdiv(M * (N + 1), 256),
               triton="_sample_in_groups_kernel"),
        Kernel("_infonce_fwd_kernel (KEEP_DIR)", rows + 2 * M * D * F32,
               rows + M * N * SECTOR + M * D * F32, 6.0 * M * (N + 1) * D, "fma",
               programs=M, triton="_infonce_fwd_kernel", gathered=rows,
               note="whole-row key tiles, each read once; keeps each query's direction v"),
        Kernel("backward from the kept direction (scale, scatter into a zero map)",
               E + 3 * M * D * F32, E + 5 * M * D * F32, 8.0 * M * D, "fma", launches=8,
               note="reads v, the query rows and positives; the embedding's gradient written "
                    "once; no key read again"),
    ]
    official = [
        Kernel("per class: masked-select copies, mean, sort of the probs", 0,
               C * (3 * E + P * C * F32), 0.0, launches=20 * C),
        Kernel("queues: concatenate on the host, copy each class's queue to the GPU", 0,
               2 * (30000 * C + 20000) * D * F32, 0.0, launches=4 * C),
        Kernel("per class: gather Q x N x D negatives, cosine, CE, backward", 0, 4 * rows,
               8.0 * M * (N + 1) * D, launches=20 * C, efficiency=OFFICIAL_GEMM_EFFICIENCY),
    ]
    return Op("u2pl_loss", f"VOC {B}x{D}x{h}x{w}, C={C}, Q={Q}, N={N}", ks, official)


CLOCK = 1.755e9          # H100 SXM boost clock, for the EDT's dependent steps
EDT_STEP_OPS = 30        # integer ops of one lane's outward step (two sides: address, two loads,
                         # compare, selects, add, min) ~ its 2 x (label + 4) bytes from L1
EDT_STEP_CYCLES = 150    # one step's dependent chain: L1 hits, the min, the warp's vote
EDT_PROLOGUE_CYCLES = 1500   # a row program's table, labels and G^2 loads (dependent) and store
EDT_TILE_CYCLES = 2000   # a column-pass scan step: two loads, a scan, two barriers
EDT_LOOK_CYCLES = 1000   # a look past a segment's end: two loads and a reduction


@functools.lru_cache(maxsize=None)
def edt_row_steps(maps: tuple, C: int, seed: int = 0) -> tuple[float, float]:
    """(lane-steps, a program's mean steps) of the row pass on bench_edt's maps of these
    shapes (C = 0: its binary speckle-with-blobs masks; C > 0: its multi-label error-like maps):
    each program walks d = 1 .. its farthest pixel's ceil(D) (an upper bound within one step;
    a pixel with no boundary in its map walks to its row's far end), all its lanes along. The
    distances come from pixcon's own CPU transform of those maps: the work is data-dependent,
    so the model measures the data it is quoted for."""
    import torch
    from benchmarks.bench_edt import make_maps
    from pixcon.ops import distance_transform
    from pixcon_kernels.edt import row_tile
    Wm = max(W for _, _, W in maps)
    R, X = row_tile(Wm)
    lane_steps, programs = 0.0, 0
    for B, H, W in maps:
        m = make_maps(B, H, W, C, seed)
        d = distance_transform(m, labels=C > 0, background=-1 if C else None)
        far = torch.maximum(torch.arange(W), W - 1 - torch.arange(W)).float()
        d = torch.where(torch.isinf(d), far.expand_as(d), d).ceil()
        # pad to whole tiles: rows of all maps run on one grid, columns to X
        rows = d.reshape(B * H, W)
        rows = torch.nn.functional.pad(rows, (0, -W % X, 0, -(B * H) % R))
        t = rows.reshape(-1, R, rows.shape[1] // X, X).amax(dim=(1, 3))
        lane_steps += float(t.sum()) * R * X
        programs += t.numel()
    return lane_steps, lane_steps / (R * X * programs)


@functools.lru_cache(maxsize=None)
def edt_col_chain(maps: tuple, C: int, seed: int = 0) -> tuple[int, float, int]:
    """(column-pass programs, the longest program's chain in cycles, rows a program) on
    bench_edt's maps of
    these shapes: a program (map, 32 columns, the launcher's col_segment rows) scans its tiles
    down and up (EDT_TILE_CYCLES each) after looking past each end, a 32-row tile at a time,
    until every one of its columns has found a row where the label changes (EDT_LOOK_CYCLES
    each; a column without one looks to the map's edge). Measured on the maps: data-dependent."""
    import torch
    from benchmarks.bench_edt import make_maps
    from pixcon_kernels.edt import col_segment
    T = 32
    programs, longest = 0, 0.0
    seg = col_segment(sum(B * -(-W // T) for B, _, W in maps), max(H for _, H, _ in maps))
    for B, H, W in maps:
        lab = make_maps(B, H, W, C, seed).to(torch.int64)
        y = torch.arange(H).view(1, H, 1)
        ch_up = torch.zeros(B, H, W, dtype=torch.bool)       # L(y) != L(y - 1)
        ch_up[:, 1:] = lab[:, 1:] != lab[:, :-1]
        ch_dn = torch.zeros(B, H, W, dtype=torch.bool)       # L(y) != L(y + 1)
        ch_dn[:, :-1] = lab[:, :-1] != lab[:, 1:]
        last = torch.where(ch_up, y, -1).cummax(dim=1).values          # at or above y
        nxt = torch.where(ch_dn, y, H).flip(1).cummin(dim=1).values.flip(1)   # at or below
        nb = -(-W // T)
        for lo in range(0, H, seg):
            hi = min(lo + seg, H)
            up = last[:, lo - 1] if lo > 0 else torch.full((B, W), lo)
            up = torch.where(up < 0, torch.zeros_like(up), up)   # none: look to the top
            looks_up = -(-(lo - up) // T) if lo > 0 else torch.zeros_like(up)
            dn = nxt[:, hi] if hi < H else torch.full((B, W), H)
            looks_dn = -(-(dn - hi + 1) // T) if hi + 1 < H else torch.zeros_like(dn)
            looks = torch.nn.functional.pad(looks_up + looks_dn, (0, nb * T - W))
            worst = looks.view(B, nb, T).amax(dim=2)
            chain = 2 * (-(-(hi - lo) // T)) * EDT_TILE_CYCLES + worst * EDT_LOOK_CYCLES
            programs += worst.numel()
            longest = max(longest, float(chain.max()))
    return programs, longest, seg


def edt_kernels(maps, elt, what=None, C=19) -> list[Kernel]:
    """The EDT's two passes over maps [(B, H, W), ...] in one ragged launch each
    (pixcon_kernels.edt): the column pass one program (4 warps) per map, 32 columns and
    COL_SEGMENT rows, walking 2 x COL_SEGMENT / 32 dependent 32-row tile steps (~2000 cycles
    each: two loads, a scan, two barriers) after its looks past the segment's ends
    (``edt_col_chain``: the longest program's chain, measured on the maps); the row pass
    parallel over pixels, one warp of 2 x 32 pixels a program (``edt.row_tile``), each
    program walking as many outward steps as its farthest pixel's distance on bench_edt's maps
    of these shapes (``edt_row_steps``), each step's neighbours read from L1; its chain is the
    prologue's dependent loads and its steps (a slot runs its wave's programs one after another:
    the mean program's chain per wave). The row pass must read the labels and G^2 and write the
    distances: its own floor."""
    from pixcon_kernels.edt import row_tile
    P = sum(B * H * W for B, H, W in maps)
    Hm, Wm = max(H for _, H, _ in maps), max(W for _, _, W in maps)
    cols, col_chain, seg = edt_col_chain(tuple(maps), C)
    R, X = row_tile(Wm)
    rows = _cdiv(sum(B * H for B, H, _ in maps), R) * _cdiv(Wm, X)
    lane_steps, mean_steps = edt_row_steps(tuple(maps), C)
    tag = f" ({what})" if what else ""
    return [
        # labels read by the down and the up sweep (the row above or below a tile is the same
        # tile shifted by one row: 31 of its 32 rows just loaded, from L1), G^2 written, read
        # back and written again by the up sweep
        Kernel(f"_edt_cols_kernel{tag}", P * elt, 2 * P * elt * 33 / 32 + 3 * P * I32, 12.0 * P,
               "int",
               latency=col_chain / CLOCK, programs=cols, triton="_edt_cols_kernel",
               note=f"segments of {min(Hm, seg)} rows: the longest program "
                    f"{col_chain / 1000:.0f}k cycles (scan steps and looks past its ends)"),
        Kernel(f"_edt_rows_kernel{tag}", P * F32, P * (elt + I32 + F32),
               EDT_STEP_OPS * lane_steps, "int", must_flops=0.0,
               latency=(EDT_PROLOGUE_CYCLES + mean_steps * EDT_STEP_CYCLES) / CLOCK,
               programs=rows, triton="_edt_rows_kernel", warps=1,
               note=f"outward search: {lane_steps / P:.1f} lane-steps a pixel (one-warp tiles "
                    f"of {R}x{X}: {mean_steps:.1f} steps a program)"),
    ]


def edt(B, H, W, C=19, elt=I64) -> Op:
    """The EDT of B maps (labels read as they are) of bench_edt's kind C (0: binary)."""
    kind = "binary, bool" if C == 0 else f"{C} labels, int64"
    return Op("distance_transform", f"{B}x{H}x{W} ({kind})", edt_kernels([(B, H, W)], elt, C=C),
              must_flops_unit="int", note="the official code runs SciPy on the host: not "
                                          "modelled",
              gap="an exact EDT is two passes: G^2 (int32) written and read back, 8 bytes a "
                  "pixel against the floor's 12 (int64 labels) or 5 (bool), and two launches "
                  "put its best at about 2.5x (int64) or 4.5x (bool) the floor at this size; "
                  "the column pass's scan steps (a chain of latencies) are the rest")


def _reco_ops():
    out = [reco(**RECO_VOC), reco(**RECO_VOC, elt=2)]
    out[1].setting += " (bf16 emb)"
    return out


# Each method of pixcon.methods at its paper's setting (the table is read: a method without a
# model here is an error), then the shared primitives that have a benchmark of their own.
MODELS = {
    "reco": _reco_ops,
    "contrastiveseg": lambda: contrastiveseg(**CONTRASTIVESEG_CS) + [
        dense(**DENSE), dense(**DENSE, precision="bf16")],
    "cac": lambda: [cac(**CAC_CS)],
    "contextrast": lambda: [contextrast(**CONTEXTRAST_HRNET)],
    "u2pl": lambda: [u2pl(**U2PL_VOC)],
}
PRIMITIVES = {"edt": lambda: [edt(**EDT), edt(**EDT, C=0, elt=1)]}


def ops() -> list[Op]:
    from pixcon.methods import NAMES
    missing = [n for n in NAMES if n not in MODELS]
    if missing:
        raise KeyError(f"tools/cost.py has no model of the methods {missing} (pixcon.methods)")
    return [op for n in (*NAMES, *PRIMITIVES) for op in {**MODELS, **PRIMITIVES}[n]()]


def _ms(t):
    return "-" if t is None else (f"{1e3 * t:.3f}" if t < 1 else f"{1e3 * t:.0f}")


def markdown() -> str:
    H, A = GPUS["H100"], GPUS["A100"]
    lines = ["## Cost model at the papers' settings (estimates: no GPU has measured them)", "",
             "From `tools/cost.py` (its docstring says what is counted): per kernel the "
             "bytes it must move and moves as written, its FLOPs and unit; time = max(bytes / "
             "bandwidth, FLOPs / unit rate) / fill + 3 us a launch, fill = the share of the SMs "
             "the grid keeps busy over its waves (where the grid is modelled). Peaks: "
             + "; ".join(f"{g['name']} {g['bw'] / 1e12:.2f} TB/s, fp32 {g['fma'] / 1e12:.1f}, "
                         f"TF32 {g['tf32'] / 1e12:.0f} (3xTF32 a third), bf16 "
                         f"{g['bf16'] / 1e12:.0f} TFLOPS" for g in (H, A)) + ".", ""]
    summary = ["| op | setting | floor H100 ms | fused est. H100 ms | official-style est. "
               "H100 ms | floor A100 ms | fused est. A100 ms | official-style est. A100 ms |",
               "|---|---|---|---|---|---|---|---|"]
    detail = ["| op | kernel | launches | programs (H100 waves, fill) | must MB | moved MB | "
              "GFLOP | unit | H100 ms | A100 ms | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for op in ops():
        summary.append(f"| {op.name} | {op.setting} | {_ms(op.floor(H))} | "
                       f"{_ms(sum(k.time(H) for k in op.kernels))} | "
                       f"{_ms(op.official_estimate(H))} | {_ms(op.floor(A))} | "
                       f"{_ms(sum(k.time(A) for k in op.kernels))} | "
                       f"{_ms(op.official_estimate(A))} |")
        for k in op.kernels:
            grid = ("-" if k.programs is None else
                    f"{k.programs} ({k.waves(H)}, {k.fill(H):.2f})")
            detail.append(f"| {op.name} | {k.name} | {k.launches} | {grid} | {k.must / 1e6:.1f} | "
                          f"{k.moved / 1e6:.1f} | {k.flops / 1e9:.2f} | {k.unit} | "
                          f"{_ms(k.time(H))} | {_ms(k.time(A))} | {k.note} |")
    notes = [f"- {op.name}: {op.note}" for op in ops() if op.note]
    notes += [f"- {op.name}, {op.setting}: estimate {op.estimate(H) / op.floor(H):.1f}x its "
              f"floor: {op.gap}" for op in ops() if op.estimate(H) > 2 * op.floor(H)]
    return "\n".join(lines + summary + [""] + notes + ["", "Per kernel:", ""] + detail) + "\n"


if __name__ == "__main__":
    print(markdown())
