"""Ahead-of-time compile check: every Triton kernel pixcon launches, compiled for sm_80 (A100) and
sm_90 (H100/H200) without a GPU, with the specializations a real launch produces.

How a launch becomes a compilation
    1. Capture. A launch ``kernel[grid](*args, **kw)`` is recorded instead of run: under the
       interpreter (the CPU test suite, ``Recorder`` on ``InterpretedFunction.run``) and in this
       process, which never sets TRITON_INTERPRET, by calling the launchers at the papers' full
       sizes with their GPU-mode choices (``scenarios()``; ``JITFunction.run`` is patched, so
       nothing executes and no device is needed). Each launch is encoded as plain data: tensor
       arguments by dtype and 16-byte alignment, scalars by value, constexprs and options as given.
    2. Bind. Triton's own binder for the target's backend (``create_function_from_signature``)
       turns the arguments into the signature, the integer specializations (``== 1``, divisible
       by 16) and the launch options, exactly as ``JITFunction.run`` does before it compiles.
    3. Compile. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` gives PTX and
       a cubin. Triton's own ``ptxas -v`` run (the ptxas inside the triton wheel, with that
       release's flags; TRITON_DUMP_PTXAS_LOG prints its log, TRITON_ALWAYS_COMPILE makes every
       compilation run it) reports registers, stack and spill bytes; the PTX is searched for
       tensor-core instructions (``mma``/``wgmma``) and 16-byte vector loads.

``python -m tools.aot`` (``./dev kernels``) writes the resource table; ``--check`` exits
non-zero on a compile error, a spill or shared memory over the hardware limit. The test suite
runs it with the launches its own interpreter tests recorded (tests/test_kernels_compile.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

# Hardware facts (CUDA programming guide, compute capability tables).
TARGETS = {
    80: dict(name="sm_80 (A100)", max_smem_block=166912, smem_sm=167936, regs_sm=65536,
             max_warps_sm=64, max_blocks_sm=32),
    90: dict(name="sm_90 (H100)", max_smem_block=232448, smem_sm=233472, regs_sm=65536,
             max_warps_sm=64, max_blocks_sm=32),
}


# --- 1. capture ------------------------------------------------------------------------------
def _encode(v):
    import triton.language as tl
    if torch.is_tensor(v):
        return {"tensor": str(v.dtype).replace("torch.", ""), "aligned": v.data_ptr() % 16 == 0}
    if isinstance(v, tl.dtype):
        return {"tl_dtype": str(v)}
    if isinstance(v, tl.constexpr):
        return _encode(v.value)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}")


def _decode(v):
    import triton.language as tl
    if isinstance(v, dict) and "tensor" in v:
        dt = getattr(torch, v["tensor"])
        buf = torch.zeros(64, dtype=dt)           # CPU allocations are 64-byte aligned
        return buf if v["aligned"] else buf[1:]   # an element off: not 16-byte aligned
    if isinstance(v, dict) and "tl_dtype" in v:
        return tl.dtype(v["tl_dtype"])
    return v


def _kernel_name(fn) -> str:
    inner = getattr(fn, "fn", fn)
    return f"{inner.__module__}:{inner.__qualname__}"


def encode_launch(fn, args, kwargs, grid, setting: str) -> dict:
    """``config`` says whether the launcher chose its GPU configuration (a real GPU launch, or
    PIXCON_LAUNCH_CONFIG=gpu) or its interpreter one (compiled too, but its resources are
    information: no GPU ever runs it)."""
    from pixcon_kernels._utils import gpu_config
    if callable(grid):
        grid = None
    return {"kernel": _kernel_name(fn), "setting": setting,
            "config": "gpu" if gpu_config() else "interpreter",
            "args": [_encode(a) for a in args],
            "kwargs": {k: _encode(v) for k, v in kwargs.items()
                       if k not in ("debug", "instrumentation_mode")},
            "grid": list(grid) if grid is not None else None}


class Recorder:
    """Records every launch of a Triton kernel while active (``setting`` names what launched it).
    Under TRITON_INTERPRET=1 it wraps ``InterpretedFunction.run`` and still runs the kernel; in a
    compiling process it replaces ``JITFunction.run`` and runs nothing."""

    def __init__(self, execute: bool | None = None):
        self.launches: list[dict] = []
        self.setting = "tests"
        self.execute = execute

    @contextlib.contextmanager
    def active(self):
        import triton.runtime.jit as jit
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if interp:
            from triton.runtime.interpreter import InterpretedFunction as cls
        else:
            cls = jit.JITFunction
        execute = interp if self.execute is None else self.execute
        orig = cls.run
        rec = self

        def run(self_, *args, grid, warmup, **kwargs):
            rec.launches.append(encode_launch(self_, args, kwargs, grid, rec.setting))
            if execute:
                return orig(self_, *args, grid=grid, warmup=warmup, **kwargs)
            return None

        cls.run = run
        try:
            yield self
        finally:
            cls.run = orig


# --- scenarios: the launchers' GPU choices at the papers' full sizes ------------------------
def _labels(P, C, gen):
    return torch.randint(-1, C, (P,), generator=gen, dtype=torch.int64)


def _reco(rec, B, D, h, w, C, Q, N, dtype, tag):
    from pixcon_kernels import infonce, reco, sampling, segment
    gen = torch.Generator().manual_seed(0)
    rec.setting = tag
    emb = torch.randn(B, D, h, w, generator=gen).to(dtype)
    P = B * h * w
    lab = _labels(P, C, gen)
    segment.class_sums(emb, lab, C)
    segment.class_sums(emb, lab, C, rows=True)                # the one-pass path (ReCo op)
    order = torch.randperm(P, generator=gen)
    counts = torch.bincount(lab.clamp(min=0), minlength=C)[:C]
    offsets = torch.cumsum(counts, 0) - counts
    sampling.sample_in_groups(order, offsets, counts, torch.arange(C), Q, 1, 1)
    cdf = torch.sort(torch.randint(0, 1 << 32, (C, C), generator=gen), dim=1)[0]
    row_class = torch.arange(C).repeat_interleave(Q)
    sampling.sample_negatives(row_class, cdf, order, offsets, counts, N, 1, 2)
    # nothing executes while capturing: the samplers' outputs are uninitialised, so the
    # InfoNCE launches get valid random indices of the same shape and dtype instead
    neg = torch.randint(-1, P, (C * Q, N), generator=gen, dtype=torch.int32)
    q = torch.randint(-1, P, (C * Q,), generator=gen, dtype=torch.int32)
    means = torch.randn(C, D, generator=gen)
    pidx = row_class.to(torch.int32)
    reco.reco_infonce(torch.empty(P, D, dtype=dtype), means, q, Q, cdf, order, offsets, counts,
                      N, 1, 2, 0.5)
    # the general sparse InfoNCE (explicit index sets; a ReCo op before the one-pass path)
    loss, lse, _, _ = infonce.infonce_forward(emb, means, q, pidx, neg, 0.5)
    infonce.infonce_forward(emb, means, q, pidx, neg, 0.5, keep_direction=True)   # U2PL's form
    for key_grad in (False, True):
        infonce.infonce_backward(torch.ones(C * Q), emb, means, q, pidx, neg, lse, 0.5, key_grad)


def _infonce(rec, B, D, h, w, M, N, dtype, tag):
    """The sparse InfoNCE alone (U2PL's: negatives from a bank of rows; the direction kept, and
    the recomputing backward with and without key gradients) at M queries x N negatives."""
    from pixcon_kernels import infonce
    gen = torch.Generator().manual_seed(0)
    rec.setting = tag
    emb = torch.randn(B, D, h, w, generator=gen).to(dtype)
    bank = torch.randn(4 * M, D, generator=gen).to(dtype)
    q = torch.randint(-1, B * h * w, (M,), generator=gen, dtype=torch.int32)
    neg = torch.randint(-1, 4 * M, (M, N), generator=gen, dtype=torch.int32)
    pos = torch.randn(21, D, generator=gen)
    pidx = torch.randint(0, 21, (M,), generator=gen, dtype=torch.int32)
    infonce.infonce_forward(emb, pos, q, pidx, neg, 0.5, keys=bank, keep_direction=True)
    loss, lse, _, _ = infonce.infonce_forward(emb, pos, q, pidx, neg, 0.5, keys=bank)
    infonce.infonce_backward(torch.ones(M), emb, pos, q, pidx, neg, lse, 0.5, False, keys=bank)


def _contextrast(rec, B, D, sizes, C, dtype, tag):
    from pixcon_kernels import anchor, edt, segment
    gen = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(sizes):
        rec.setting = f"{tag} {h}x{w}"
        P = B * h * w
        x = torch.randn(B, D, h, w, generator=gen).to(dtype)
        # every flag combination at the first size; the defaults (R1, unit rows) at the others
        # (sizes change only integer specialisations, flags change the code)
        flags = (False, True) if i == 0 else (False,)
        norms = (True, False) if i == 0 else (True,)
        gt = _labels(P, C, gen)
        inv = anchor.inv_norms(x)
        segment.class_sums(x, gt, C, scale=torch.ones(P))
        err = torch.randint(-1, C, (B, h, w), generator=gen)
        edt.distance_transform(err, background=-1, squared=True)
        negcls = _labels(P, C, gen)
        a = torch.randn(C, D, generator=gen)
        for only_own in flags:
            _, nl, sig, S = anchor.anchor_forward(x, inv, a, gt, negcls, 0.1, only_own)
            anchor.anchor_da(torch.ones(C), x, inv, a, gt, negcls, nl, sig, S, 0.1, only_own)
            for normalize in norms:
                for ds in (a[:0], a):                  # the class sums' gradient folded in or not
                    anchor.anchor_dx(torch.ones(C), x, inv, a, gt, negcls, nl, sig, S, ds, 0.1,
                                     only_own, normalize)
        for normalize in norms:
            anchor.unit_sums_backward(a, x, inv, gt, normalize)


def _tiled(rec, M, N, D, C, dtype, tag, positives=True, precision="fp32"):
    """The tiled contrast at M anchors x N keys (N None: in-batch, keys = anchors); positives
    False: the negatives' log-sum-exp alone (CAC); precision: the opt-in products."""
    from pixcon_kernels import tiled
    gen = torch.Generator().manual_seed(0)
    rec.setting = tag
    a = torch.randn(M, D, generator=gen).to(dtype)
    ya = _labels(M, C, gen)
    in_batch = N is None
    k, yk = (a, ya) if in_batch else (torch.randn(N, D, generator=gen).to(dtype),
                                      _labels(N, C, gen))
    _, npos, nl, w = tiled.tiled_forward(a, ya, k, yk, 0.1, in_batch, positives, precision)
    tiled.tiled_backward(torch.ones(M), a, ya, k, yk, nl, w, npos, 0.1, in_batch,
                         not in_batch, None if positives else torch.ones(M), precision)


def _edt(rec, shape, tag):
    from pixcon_kernels import edt
    rec.setting = tag
    x = torch.randint(0, 2, shape)
    for squared in (False, True):
        edt.distance_transform(x, background=0, squared=squared)


def _edt_pyramid(rec, B, sizes, tag):
    """BANE's error maps of every layer (int64, background -1) in one ragged launch."""
    from pixcon_kernels import edt
    rec.setting = tag
    flat = torch.randint(-1, 19, (sum(B * h * w for h, w in sizes),))
    edt.distance_transform_ragged(flat, [(B, h, w) for h, w in sizes], -1, True)


def _bank_push(rec, P, C, D, S, tag):
    """U2PL's queue push at a batch of P pixel rows into C queues of S rows in all."""
    from pixcon_kernels import bank
    gen = torch.Generator().manual_seed(0)
    rec.setting = tag
    keep = torch.rand(C, P, generator=gen) < 0.1
    slot = torch.randint(0, S, (C, P), generator=gen)
    for dt in (torch.float32, torch.bfloat16):
        bank.bank_push(torch.empty(S, D, dtype=dt), torch.randn(P, D).to(dt), keep, slot)
    bank.bank_push(torch.empty(S, D), torch.randn(4, D, P // 4), keep, slot)   # a map in place


def _philox(rec, n, tag):
    from pixcon_kernels import rng
    rec.setting = tag
    rng.philox(torch.arange(n), 123, 1)


# Class counts: one per power-of-two bucket up to 1024 plus the papers' (VOC 21, Cityscapes 19,
# ADE20K 150, COCO-Stuff 171): block sizes depend on next_pow2(C) and the integer
# specializations on C % 16 and C == 1, so these cover every count up to 1024.
CLASS_COUNTS = (2, 3, 5, 9, 16, 19, 21, 33, 64, 65, 129, 150, 171, 256, 257, 513, 1000, 1024)


def scenarios(quick: bool = False):
    """(name, fn(recorder)) pairs that launch every kernel at the papers' settings."""
    out = [
        ("ReCo VOC semi 20x256x81x81 C=21 fp32",
         lambda r: _reco(r, 20, 256, 81, 81, 21, 256, 512, torch.float32, "ReCo VOC fp32")),
        ("ReCo VOC bf16", lambda r: _reco(r, 20, 256, 81, 81, 21, 256, 512, torch.bfloat16,
                                          "ReCo VOC bf16")),
        ("ReCo VOC fp16", lambda r: _reco(r, 20, 256, 81, 81, 21, 256, 512, torch.float16,
                                          "ReCo VOC fp16")),
        ("ReCo fp64 (float64 embeddings are accepted on GPU too)",
         lambda r: _reco(r, 2, 64, 33, 33, 21, 256, 512, torch.float64, "ReCo fp64")),
        ("Contextrast fp64", lambda r: _contextrast(
            r, 2, 256, [(64, 128)], 19, torch.float64, "Contextrast C=19 fp64")),
        ("Contextrast Cityscapes", lambda r: _contextrast(
            r, 8, 256, [(128, 256), (64, 128), (32, 64), (16, 32)], 19, torch.float32,
            "Contextrast Cityscapes C=19")),
        ("Contextrast Cityscapes bf16", lambda r: _contextrast(
            r, 8, 256, [(128, 256), (16, 32)], 19, torch.bfloat16,
            "Contextrast Cityscapes C=19 bf16")),
        ("Contextrast ADE20K", lambda r: _contextrast(
            r, 16, 256, [(128, 128), (16, 16)], 150, torch.float32, "Contextrast ADE20K C=150")),
        ("odd D", lambda r: (_reco(r, 2, 40, 17, 19, 21, 64, 128, torch.float32, "ReCo D=40"),
                             _contextrast(r, 2, 24, [(16, 32)], 40, torch.float32,
                                          "Contextrast D=24 C=40"))),
        ("ContrastiveSeg Cityscapes 1024 anchors", lambda r: [
            _tiled(r, 1024, None, 256, 19, dt, f"ContrastiveSeg in-batch 1024 {n}")
            for dt, n in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"),
                          (torch.float16, "fp16"))]),
        ("ContrastiveSeg bank 19x10000", lambda r: _tiled(
            r, 1024, 190000, 256, 19, torch.float32, "ContrastiveSeg bank 1024x190000")),
        ("dense 131k", lambda r: [_tiled(r, 131072, None, 256, 19, dt, f"dense 131072 {n}")
                                  for dt, n in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))]),
        ("CAC Cityscapes 8100 x 129600, D=128", lambda r: [
            _tiled(r, 8100, 129600, 128, 19, dt, f"CAC Cityscapes {n}", positives=False)
            for dt, n in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))]),
        ("tiled D=512 (two D blocks in the gradient kernels)", lambda r: [
            _tiled(r, 1024, N, 512, 19, dt, f"tiled D=512 {N or 'in-batch'} {n}")
            for N in (None, 38000) for dt, n in ((torch.float32, "fp32"),
                                                 (torch.bfloat16, "bf16"))]),
        ("tiled precision= tf32 / bf16 (in-batch D=256, bank D=512)", lambda r: [
            _tiled(r, 1024, N, D, 19, torch.float32, f"tiled {p} D={D} {N or 'in-batch'}",
                   precision=p)
            for p in ("tf32", "bf16") for N, D in ((None, 256), (38000, 512))]),
        ("tiled fp64 / odd D", lambda r: (
            _tiled(r, 256, None, 64, 19, torch.float64, "tiled fp64"),
            _tiled(r, 300, 700, 40, 19, torch.float32, "tiled D=40 bank"))),
        ("EDT 512x512", lambda r: _edt(r, (8, 512, 512), "EDT 8x512x512")),
        ("EDT BANE pyramid", lambda r: (_edt(r, (8, 16, 32), "EDT 8x16x32"), _edt_pyramid(
            r, 8, [(128, 256), (64, 128), (32, 64), (16, 32)], "EDT BANE pyramid (ragged)"))),
        ("philox", lambda r: _philox(r, 1 << 20, "philox 2^20")),
        ("U2PL bank push VOC", lambda r: _bank_push(r, 4 * 129 * 129, 21, 256, 650000,
                                                    "U2PL push 4x129x129 into 21 queues")),
        ("U2PL sparse InfoNCE VOC and D=512", lambda r: [
            _infonce(r, 4, D, 129, 129, 21 * 256, 50, dt, f"U2PL InfoNCE D={D} {n}")
            for D in (256, 512) for dt, n in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))]),
    ]
    for C in CLASS_COUNTS if not quick else (19, 150, 1024):
        out.append((f"classes C={C}", lambda r, C=C: _classes(r, C)))
    from pixcon.methods import METHODS           # every method's kernels at its paper's setting
    missing = [m.name for m in METHODS
               if not any(n.startswith(p) for p in m.scenarios for n, _ in out)]
    if missing:
        raise KeyError(f"tools/aot.py: no scenario for the methods {missing} (their "
                       "pixcon.methods entry names the scenario prefixes)")
    return out


def _classes(rec, C):
    """The class-count-dependent kernels at C classes (small pixel count: only C matters)."""
    from pixcon_kernels import anchor, sampling, segment
    gen = torch.Generator().manual_seed(C)
    rec.setting = f"C={C}"
    P, D = 4096, 256
    z = torch.randn(P, D, generator=gen)
    gt = _labels(P, C, gen)
    segment.class_sums(z, gt, C)
    cdf = torch.sort(torch.randint(0, 1 << 32, (C, C), generator=gen), dim=1)[0]
    order = torch.randperm(P, generator=gen)
    counts = torch.full((C,), P // C)
    offsets = torch.cumsum(counts, 0) - counts
    sampling.sample_negatives(torch.arange(C).repeat_interleave(4), cdf, order, offsets, counts,
                              512, 1, 2)
    a = torch.randn(C, D, generator=gen)
    negcls = _labels(P, C, gen)
    x = z.T.reshape(1, D, 64, 64)                          # an NCHW map of the same pixels
    inv = torch.ones(P)
    _, nl, sig, S = anchor.anchor_forward(x, inv, a, gt, negcls, 0.1, False)
    anchor.anchor_da(torch.ones(C), x, inv, a, gt, negcls, nl, sig, S, 0.1, False)
    anchor.anchor_dx(torch.ones(C), x, inv, a, gt, negcls, nl, sig, S, a, 0.1, False, True)


def capture_scenarios(quick: bool = False) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("capture_scenarios must run without TRITON_INTERPRET "
                           "(kernels must be JITFunctions)")
    rec = Recorder(execute=False)
    with rec.active():
        for _, fn in scenarios(quick):
            fn(rec)
    return rec.launches


# --- 2. bind ---------------------------------------------------------------------------------
_BINDERS: dict = {}


def _binder(kernel: str, cc: int):
    if (kernel, cc) not in _BINDERS:
        import triton.runtime.jit as jit
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        mod, qual = kernel.split(":")
        fn = getattr(importlib.import_module(mod), qual)
        if not isinstance(fn, jit.JITFunction):
            raise RuntimeError(f"{kernel} is not a JITFunction (TRITON_INTERPRET set?)")
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        _BINDERS[kernel, cc] = (fn, target, backend, jit.create_function_from_signature(
            fn.signature, fn.params, backend))
    return _BINDERS[kernel, cc]


def _bind(launch: dict, cc: int):
    fn, target, backend, binder = _binder(launch["kernel"], cc)
    args = [_decode(a) for a in launch["args"]]
    kwargs = {k: _decode(v) for k, v in launch["kwargs"].items()}
    kwargs.setdefault("debug", False)
    bound, spec, options = binder(*args, **kwargs)
    key = repr((launch["kernel"], cc, spec, sorted((k, repr(v)) for k, v in kwargs.items()
                                                   if k not in [p.name for p in fn.params])))
    return fn, target, backend, kwargs, bound, spec, options, key


# --- 3. compile and measure ------------------------------------------------------------------
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_V4 = re.compile(r"\bld\.global(?:\.[a-z0-9_]+)*\.v(?:4\.(?:b32|f32|u32|s32)|2\.(?:b64|f64|u64))")
_MMA = re.compile(r"\bmma\.sync\b")
_WGMMA = re.compile(r"\bwgmma\.")


def _ptxas_report(log: str) -> dict:
    """Registers, stack and spills from the ``ptxas -v`` log of Triton's own ptxas run (its
    flags and its ptxas, which differ between Triton releases)."""
    regs = _REGS.findall(log)
    st = _PTXAS.findall(log)
    if not regs:
        raise RuntimeError(f"no 'Used N registers' line in the ptxas log: {log[-300:]!r}")
    return {"regs": max(int(r) for r in regs),
            "stack": max((int(x[0]) for x in st), default=0),
            "spill_stores": max((int(x[1]) for x in st), default=0),
            "spill_loads": max((int(x[2]) for x in st), default=0)}


def occupancy(regs: int, smem: int, warps: int, cc: int) -> float:
    """Theoretical occupancy: resident warps per SM over the maximum, from registers (allocated
    per warp in units of 256), shared memory (+1 KiB reserved per block) and the block limit."""
    hw = TARGETS[cc]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = hw["regs_sm"] // (per_warp * warps)
    by_smem = hw["smem_sm"] // (smem + 1024) if smem else hw["max_blocks_sm"]
    by_warps = hw["max_warps_sm"] // warps
    blocks = max(0, min(by_regs, by_smem, by_warps, hw["max_blocks_sm"]))
    return blocks * warps / hw["max_warps_sm"]


def compile_one(launch: dict, cc: int) -> dict:
    """Compile one launch for compute capability cc; returns the resource row (or the error)."""
    import triton
    row = {"kernel": launch["kernel"], "setting": launch["setting"], "cc": cc,
           "grid": launch.get("grid")}
    try:
        fn, target, backend, kwargs, bound, spec, options, key = _bind(launch, cc)
        row["key"] = key
        opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
        t0 = time.perf_counter()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):     # TRITON_DUMP_PTXAS_LOG prints it (main())
            k = triton.compile(src, target=target, options=opts.__dict__)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        ptx = k.asm["ptx"]
        row.update(_ptxas_report(log.getvalue()))
        row["smem"] = int(k.metadata.shared)
        row["num_warps"] = int(k.metadata.num_warps)
        row["occupancy"] = occupancy(row["regs"], row["smem"], row["num_warps"], cc)
        row["mma"] = bool(_MMA.search(ptx))
        row["wgmma"] = bool(_WGMMA.search(ptx))
        row["v4_loads"] = bool(_V4.search(ptx))
        row["constexprs"] = {fn.params[p[0]].name: (v if isinstance(v, (int, float, bool))
                                                    else str(v))
                             for p, v in constexprs.items()}
        row["num_stages"] = int(getattr(k.metadata, "num_stages", opts.num_stages))
    except Exception as e:  # noqa: BLE001 - every failure is reported, named, in the table
        msg = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: " + " | ".join(msg[-6:])[:600]
    return row


def _compile_job(item):
    launch, cc = item
    return compile_one(launch, cc)


def dedupe(launches: list[dict], targets=(80, 90)) -> list[tuple[dict, int]]:
    """One (launch, cc) per distinct specialization; the settings that share it are joined."""
    seen: dict[str, tuple[dict, int]] = {}
    unique: dict[str, dict] = {}           # identical launches (but for grid and setting) once
    for ln in launches:
        k = json.dumps([ln["kernel"], ln["args"], ln["kwargs"]], sort_keys=True)
        cfg = ln.get("config", "gpu")
        if k in unique:
            if ln["setting"] not in unique[k]["also"]:
                unique[k]["also"].append(ln["setting"])
            if cfg == "gpu":
                unique[k]["config"] = "gpu"
        else:
            unique[k] = dict(ln, also=[ln["setting"]], config=cfg)
    # interpreter-configuration launches are compiled for errors only, for one target: one per
    # kernel, tile constexprs and argument dtypes (their integer specialisations, == 1 and divisible by 16,
    # multiply the compilations -- hundreds of shapes in the tests -- and decide no error)
    coarse: dict[str, dict] = {}
    for k in list(unique):
        ln = unique[k]
        if ln["config"] != "interpreter":
            continue
        ck = json.dumps([ln["kernel"], ln["kwargs"],
                         [a.get("tensor") if isinstance(a, dict) else type(a).__name__
                          for a in ln["args"]]], sort_keys=True)
        if ck in coarse:
            coarse[ck]["also"] += [x for x in ln["also"] if x not in coarse[ck]["also"]]
            del unique[k]
        else:
            coarse[ck] = ln
    for cc in targets:
        for ln in unique.values():
            if ln["config"] == "interpreter" and cc != targets[-1]:
                continue     # errors only: one target is enough (the last, the newest)
            try:
                key = _bind(ln, cc)[-1]
            except Exception as e:  # noqa: BLE001 - binding errors surface as compile rows
                key = f"bind-error {ln['kernel']} {cc} {e}"
            if key in seen:
                first = seen[key][0]
                first["settings"] += [s for s in ln["also"] if s not in first["settings"]]
                if ln["config"] == "gpu":
                    first["config"] = "gpu"
                continue
            seen[key] = (dict(ln, settings=list(ln["also"])), cc)
    return list(seen.values())


def compile_all(launches: list[dict], targets=(80, 90), jobs: int | None = None,
                progress: bool = True) -> list[dict]:
    items = dedupe(launches, targets)
    jobs = jobs or min(len(items), os.cpu_count() or 1, 4) or 1
    rows = []
    t0 = time.perf_counter()
    tty = sys.stderr.isatty()
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        for i, row in enumerate(ex.map(_compile_job, items, chunksize=1)):
            row["settings"] = items[i][0]["settings"]
            row["config"] = items[i][0]["config"]
            rows.append(row)
            n = len(items)
            # progress: a live line on a terminal, one line per 10% otherwise (logs, CI)
            if progress and (tty or (i + 1) * 10 // n != i * 10 // n):
                print(f"{chr(13) if tty else ''}[aot] {i + 1}/{n} compiled "
                      f"({time.perf_counter() - t0:.0f} s)", end="" if tty else "\n",
                      file=sys.stderr, flush=True)
    if progress and tty:
        print(file=sys.stderr)
    return rows


# --- report ----------------------------------------------------------------------------------
def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r['setting']}] on {TARGETS[r['cc']]['name']}"
        if "error" in r:
            out.append(f"compile error: {where}: {r['error']}")
            continue
        if r.get("config", "gpu") != "gpu":
            continue     # an interpreter-only configuration: must compile, resources are info
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"spill: {where}: {r['spill_stores']} B stores, {r['spill_loads']} B loads "
                       f"({r['regs']} registers)")
        if r["smem"] > TARGETS[r["cc"]]["max_smem_block"]:
            out.append(f"shared memory: {where}: {r['smem']} B > "
                       f"{TARGETS[r['cc']]['max_smem_block']} B")
    return out


def summary(rows: list[dict]) -> list[str]:
    """One line per kernel and target over its GPU-configuration rows: the worst case."""
    lines = ["## Summary (GPU configurations, worst case over settings)", "",
             "| kernel | target | compilations | max regs | max spill B | max smem B | "
             "min occupancy | mma/wgmma | 16-B loads |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        if r.get("config", "gpu") == "gpu" and "error" not in r:
            groups.setdefault((r["kernel"].split(":")[1], r["cc"]), []).append(r)
    for (k, cc), rs in sorted(groups.items()):
        lines.append(
            f"| `{k}` | sm_{cc} | {len(rs)} | {max(r['regs'] for r in rs)} | "
            f"{max(r['spill_stores'] + r['spill_loads'] for r in rs)} | "
            f"{max(r['smem'] for r in rs)} | {min(r['occupancy'] for r in rs):.2f} | "
            f"{'yes' if any(r['mma'] or r['wgmma'] for r in rs) else 'no'} | "
            f"{'all' if all(r['v4_loads'] for r in rs) else 'some' if any(r['v4_loads'] for r in rs) else 'none'} |")
    errors = [r for r in rows if "error" in r]
    lines += ["", f"Compile errors: {len(errors)}.", ""]
    return lines


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""] + summary(rows) + ["## Every compilation", "",
             "| kernel | config | settings | target | regs | spill B | smem B | warps/stages | occupancy | "
             "mma | wgmma | 16-B loads | constexprs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r.get("config", "gpu") != "gpu", r["cc"],
                                         r["settings"][0])):
        kname = r["kernel"].split(":")[1]
        settings = r["settings"][0] + (f" (+{len(r['settings']) - 1})"
                                       if len(r["settings"]) > 1 else "")
        if "error" in r:
            lines.append(f"| `{kname}` | {r.get('config', 'gpu')} | {settings} | sm_{r['cc']} | "
                         f"ERROR: {r['error'][:120].replace('|', '/')} | | | | | | | | |")
            continue
        ce = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        lines.append(
            f"| `{kname}` | {r.get('config', 'gpu')} | {settings} | sm_{r['cc']} | {r['regs']} | "
            f"{r['spill_stores'] + r['spill_loads']} | {r['smem']} | {r['num_warps']}/{r['num_stages']} | "
            f"{r['occupancy']:.2f} | {'yes' if r['mma'] else 'no'} | "
            f"{'yes' if r['wgmma'] else 'no'} | {'yes' if r['v4_loads'] else 'no'} | {ce} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.aot", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--launches", action="append", default=[],
                    help="JSON file of recorded launches (from the test suite) to compile too")
    ap.add_argument("--no-scenarios", action="store_true", help="only the recorded launches")
    ap.add_argument("--quick", action="store_true", help="fewer class counts")
    ap.add_argument("--table", help="write the Markdown resource table here")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on a compile error, a spill or shared memory over the limit")
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("python -m tools.aot: unset TRITON_INTERPRET (kernels must "
                         "compile, not interpret)")
    # every compilation runs ptxas and prints its -v log (no cache hit without a log); set
    # before triton is imported so that the compile workers inherit it
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # 3.9: the default, without a warning
    import triton
    launches = [] if a.no_scenarios else capture_scenarios(a.quick)
    for path in a.launches:
        with open(path) as f:
            launches += json.load(f)
    rows = compile_all(launches, jobs=a.jobs)
    bad = problems(rows)
    kernels = sorted({r["kernel"] for r in rows})
    print(f"[aot] triton {triton.__version__}: {len(rows)} compilations of {len(kernels)} kernels "
          f"from {len(launches)} launches; {len(bad)} problems")
    for b in bad:
        print("  " + b)
    if a.table:
        hdr = (f"# Triton kernels compiled for sm_80 and sm_90 (no GPU)\n\n"
               f"Written by `./dev kernels` (`python -m tools.aot`): triton "
               f"{triton.__version__}, torch {torch.__version__}. One row per distinct "
               f"specialization; settings name the launch that first produced it (+ how many "
               f"more share it). `config`: `gpu` = the launcher's GPU choice (checked: no spill, "
               f"shared memory within the limit), `interpreter` = the CPU-test tiles, compiled "
               f"for errors only, on sm_90 (no GPU runs them; one per kernel, tiles and "
               f"dtypes). Spill B = ptxas spill stores + loads. "
               f"Occupancy is theoretical (registers, shared memory, warps). `16-B loads`: "
               f"ld.global.v4 of 32-bit or .v2 of 64-bit words in the PTX. Dot units: the "
               f"class sums' one-hot dot is exact fp32 (`input_precision=\"ieee\"`, FMA "
               f"units); ReCo's InfoNCE is a gather with FMA dot products (memory-bound); "
               f"the Contextrast logits and gradients and the tiled contrast (`tiled.py`) use "
               f"tensor cores, fp32 through 3xTF32. The cost model (estimates) follows the "
               f"tables.")
        with open(a.table, "w") as f:
            f.write(markdown(rows, hdr) + "\n")
        from tools.cost import markdown as cost_markdown   # reads the table just written
        cost = cost_markdown()
        with open(a.table, "a") as f:
            f.write(cost)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
