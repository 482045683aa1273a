"""Tiled supervised contrast (anchors x keys, flash-attention pattern), the primitive shared by
ContrastiveSeg, the dense mode and CAC. s = a . k / t is recomputed per (anchor tile, key tile)
on tensor cores and never stored. Rows come sorted by label (the op's CUDA kernel sorts them), so
each anchor's positives are one range [plo, phi) of the sorted keys: masks are two comparisons
with per-row offsets, and a tile's label work is known from its rows' ranges.

  forward, grid (anchor tiles, key splits): every program streams the key tiles of its split
    pass 1 (_tiled_lse_kernel): partial (max, sum of exponentials) over the negatives
    pass 2 (_tiled_pos_kernel): over the tiles of the anchor tile's positive band only,
            partial sums of softplus(NL_r - s_rp) and sigmoid(NL_r - s_rp)
    the partials are merged by torch in split order (a fixed order: bitwise deterministic).
  backward: ds_rk = (c_r W_r + g_r) e^{s_rk - NL_r} (negatives; g the gradient of NL itself),
            -c_r sigmoid(NL_r - s_rk) (positives), c_r = grad_r / |P(r)|;
    da (_tiled_bwd_da_kernel): grid (anchor tiles, key splits, D blocks), partial da per split
    dk (_tiled_bwd_dk_kernel): grid (key tiles, anchor splits, D blocks), partial dk per split
    summed in split order: no atomics, deterministic.

Keys are split across programs so that a few anchors (ContrastiveSeg's 1,024 against a
190,000-key bank: 16 anchor tiles) still launch about four programs per SM (``_splits``); a
program without a valid anchor (or key) runs no tile; a key tile outside every row's negatives
(pass 1) or the positive band (pass 2) is skipped. The gradient accumulators hold at most 256
columns of D (a D block; D = 512 is two, each recomputing the logits) so that no D up to 512
spills. fp32 inputs use 3xTF32 dots ("tf32x3", fp32-level accuracy on tensor cores; opt-in
``precision``: one TF32 product or bf16 operands, for the logits and the gradient GEMMs alike),
fp16/bf16 native dots with fp32 accumulation, fp64 exact dots. Bottleneck: the logits GEMMs (forward
1 + 1/C passes, backward 2 recomputes (4 at D = 512) and 2 gradient GEMMs); floor: 2 M N D FLOPs
per GEMM at the tensor-core rate, inputs read once. The D-chunk loads are pipelined two deep
(``num_stages=2``) where D is a whole number of 32-wide chunks (``_stages``).
"""
import torch
import triton
import triton.language as tl

from ._utils import PROGRAMS, acc_dtype, gpu_config, interpreting, next_pow2, torch_acc_dtype


@triton.jit
def _keep_bits(x, DROP: tl.constexpr, NEAREST: tl.constexpr):
    """fp32 x with its DROP lowest mantissa bits cleared: rounded to nearest even (NEAREST) or
    truncated. DROP = 16: bf16's value; 13: TF32's."""
    b = x.to(tl.float32).to(tl.int32, bitcast=True)
    if NEAREST:
        b = b + ((1 << (DROP - 1)) - 1) + ((b >> DROP) & 1)
    return ((b >> DROP) << DROP).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b, fp32 accumulation, at the launch's precision: "tf32x3" (fp32-level accuracy from
    three TF32 products), "ieee", "tf32" (one TF32 product) or "bf16" (operands rounded to bf16).
    The interpreter has no bf16 and multiplies "tf32" in full fp32, so its launches say
    "tf32_emulated" / "bf16_emulated": the operands' bits are cut the same way (TF32: truncated,
    the hardware's worst case; bf16: rounded to nearest even) and multiplied exactly."""
    if PREC == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "bf16_emulated":
        out = tl.dot(_keep_bits(a, 16, True), _keep_bits(b, 16, True), input_precision="ieee")
    elif PREC == "tf32_emulated":
        out = tl.dot(_keep_bits(a, 13, False), _keep_bits(b, 13, False), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC: tl.constexpr, PREC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """s (BLOCK_M, BLOCK_N) = a[rows] . k[cols] / t, accumulated over D in BLOCK_D chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * D + d[None, :],
                    mask=(rows < M)[:, None] & (d < D)[None, :], other=0.0)
        k = tl.load(k_ptr + cols[:, None].to(tl.int64) * D + d[None, :],
                    mask=(cols < N)[:, None] & (d < D)[None, :], other=0.0)
        s += _dot(a, tl.trans(k), PREC)
    return s * inv_t



@triton.jit
def _rows(ya_ptr, plo_ptr, phi_ptr, rows, M):
    """(valid, plo, phi) of anchor rows: labelled rows and their positive key ranges."""
    rm = rows < M
    valid = tl.load(ya_ptr + rows, mask=rm, other=-1) >= 0
    plo = tl.load(plo_ptr + rows, mask=rm, other=0)
    phi = tl.load(phi_ptr + rows, mask=rm, other=0)
    return valid, plo, phi


@triton.jit
def _anchor_program(ya_ptr, plo_ptr, phi_ptr, kv0_ptr, M, N, CH, BLOCK_M: tl.constexpr):
    """The rows of anchor tile program_id(0) with (valid, plo, phi), the first labelled key kv0
    and the keys [lo, hi) of split program_id(1)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid, plo, phi = _rows(ya_ptr, plo_ptr, phi_ptr, rows, M)
    kv0 = tl.load(kv0_ptr)
    lo = kv0 + tl.program_id(1) * CH
    return rows, valid, plo, phi, kv0, lo, tl.minimum(lo + CH, N)


@triton.jit
def _masks(rows, cols, valid, plo, phi, kv0, hi, IN_BATCH: tl.constexpr):
    """(negatives, positives) of a tile: keys kv0 <= col < hi outside / inside each valid
    row's positive range (in-batch, r is not its own positive)."""
    inside = (cols[None, :] >= plo[:, None]) & (cols[None, :] < phi[:, None])
    keys = (cols >= kv0) & (cols < hi)
    neg = valid[:, None] & keys[None, :] & ~inside
    pos = valid[:, None] & keys[None, :] & inside
    if IN_BATCH:
        pos = pos & (rows[:, None] != cols[None, :])
    return neg, pos


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _tiled_lse_kernel(a_ptr, k_ptr, ya_ptr, plo_ptr, phi_ptr, kv0_ptr, m_ptr, l_ptr, M, N, D,
                      CH, inv_t, ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 1 of anchor tile program_id(0) over key split program_id(1): the running maximum
    and sum of exponentials of the negatives' logits, written at [split, row]."""
    rows, valid, plo, phi, kv0, lo, hi = _anchor_program(ya_ptr, plo_ptr, phi_ptr, kv0_ptr, M, N,
                                                         CH, BLOCK_M)
    hi = tl.where(tl.max(valid.to(tl.int32), axis=0) > 0, hi, lo)      # no valid row: no tile
    pmax = tl.max(tl.where(valid, plo, 0), axis=0)                     # rows are sorted
    pmin = tl.min(tl.where(valid, phi, N), axis=0)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    for n0 in range(lo, hi, BLOCK_N):
        if (n0 < pmax) | (n0 + BLOCK_N > pmin):    # else every row's positives cover the tile
            cols = n0 + tl.arange(0, BLOCK_N)
            neg, _ = _masks(rows, cols, valid, plo, phi, kv0, hi, False)
            s = _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC, PREC, BLOCK_M,
                        BLOCK_N, BLOCK_D)
            s = tl.where(neg, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            finite = m_new > float("-inf")
            m_ref = tl.where(finite, m_new, 0.0)                       # no inf - inf anywhere
            e = tl.where(neg, tl.exp(s - m_ref[:, None]), 0.0)
            l = l * tl.exp(tl.where(finite, m, 0.0) - m_ref) + tl.sum(e, axis=1)
            m = m_new
    out = tl.program_id(1).to(tl.int64) * M + rows
    tl.store(m_ptr + out, m, mask=rows < M)
    tl.store(l_ptr + out, l, mask=rows < M)


@triton.jit
def _tiled_pos_kernel(a_ptr, k_ptr, ya_ptr, plo_ptr, phi_ptr, kv0_ptr, nl_ptr, sp_ptr, w_ptr,
                      M, N, D, CH, inv_t, IN_BATCH: tl.constexpr, ACC: tl.constexpr,
                      PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Pass 2: over the key tiles of the anchor tile's positive band within the split, the sums
    of softplus(NL - s) and sigmoid(NL - s) over each row's positives, written at [split, row]."""
    rows, valid, plo, phi, kv0, start, stop = _anchor_program(ya_ptr, plo_ptr, phi_ptr, kv0_ptr,
                                                              M, N, CH, BLOCK_M)
    lo = tl.maximum(start, tl.min(tl.where(valid, plo, N), axis=0))
    hi = tl.minimum(stop, tl.max(tl.where(valid, phi, 0), axis=0))
    nl = tl.load(nl_ptr + rows, mask=rows < M, other=0.0)
    a = tl.zeros([BLOCK_M], dtype=ACC)
    w = tl.zeros([BLOCK_M], dtype=ACC)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        _, pos = _masks(rows, cols, valid, plo, phi, kv0, hi, IN_BATCH)
        s = _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC, PREC, BLOCK_M, BLOCK_N,
                    BLOCK_D)
        x = nl[:, None] - s
        a += tl.sum(tl.where(pos, _softplus(x), 0.0), axis=1)
        w += tl.sum(tl.where(pos, 1.0 / (1.0 + tl.exp(-x)), 0.0), axis=1)
    out = tl.program_id(1).to(tl.int64) * M + rows
    tl.store(sp_ptr + out, a, mask=rows < M)
    tl.store(w_ptr + out, w, mask=rows < M)


@triton.jit
def _dlogits(s, neg, pos, nl, cw, c):
    """d term / d s for one tile: c W e^{s - NL} on negatives, -c sigmoid(NL - s) on positives."""
    e = tl.where(neg, tl.exp(s - tl.where(neg, nl[:, None], 0.0)) * cw[:, None], 0.0)
    return e - tl.where(pos, c[:, None] / (1.0 + tl.exp(s - nl[:, None])), 0.0)


@triton.jit
def _tiled_bwd_da_kernel(a_ptr, k_ptr, ya_ptr, plo_ptr, phi_ptr, kv0_ptr, nl_ptr, cw_ptr, c_ptr,
                         da_ptr, M, N, D, CH, inv_t, IN_BATCH: tl.constexpr, ACC: tl.constexpr,
                         PREC: tl.constexpr, PREC_G: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Partial da[split, rows, D block] = sum over the split's key tiles of ds k / t (grid:
    anchor tiles, key splits, D blocks of BLOCK_DO columns)."""
    rows, valid, plo, phi, kv0, lo, hi = _anchor_program(ya_ptr, plo_ptr, phi_ptr, kv0_ptr, M, N,
                                                         CH, BLOCK_M)
    rm = rows < M
    nl = tl.load(nl_ptr + rows, mask=rm, other=0.0)
    cw = tl.load(cw_ptr + rows, mask=rm, other=0.0)
    c = tl.load(c_ptr + rows, mask=rm, other=0.0)
    live_rows = valid & ((cw != 0.0) | (c != 0.0))
    hi = tl.where(tl.max(live_rows.to(tl.int32), axis=0) > 0, hi, lo)
    dcol = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        neg, pos = _masks(rows, cols, valid, plo, phi, kv0, hi, IN_BATCH)
        live = (neg & (cw != 0.0)[:, None]) | (pos & (c != 0.0)[:, None])
        if tl.max(tl.max(live.to(tl.int32), axis=1), axis=0) > 0:
            s = _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC, PREC, BLOCK_M,
                        BLOCK_N, BLOCK_D)
            ds = _dlogits(s, neg, pos, nl, cw, c)
            k = tl.load(k_ptr + cols[:, None].to(tl.int64) * D + dcol[None, :],
                        mask=(cols < N)[:, None] & (dcol < D)[None, :], other=0.0).to(ACC)
            acc += _dot(ds, k, PREC_G)
    out = (tl.program_id(1).to(tl.int64) * M + rows[:, None].to(tl.int64)) * D + dcol[None, :]
    tl.store(da_ptr + out, acc * inv_t, mask=rm[:, None] & (dcol < D)[None, :])


@triton.jit
def _tiled_bwd_dk_kernel(a_ptr, k_ptr, ya_ptr, plo_ptr, phi_ptr, kv0_ptr, nl_ptr, cw_ptr, c_ptr,
                         dk_ptr, M, N, D, CHM, inv_t, IN_BATCH: tl.constexpr, ACC: tl.constexpr,
                         PREC: tl.constexpr, PREC_G: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Partial dk[split, cols, D block] = sum over the split's anchor tiles of ds^T a / t (grid:
    key tiles, anchor splits of CHM rows, D blocks)."""
    sp = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kv0 = tl.load(kv0_ptr)
    lo = sp * CHM
    hi = tl.minimum(lo + CHM, M)
    hi = tl.where(tl.max(((cols >= kv0) & (cols < N)).to(tl.int32), axis=0) > 0, hi, lo)
    dcol = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=ACC)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rm = rows < M
        valid, plo, phi = _rows(ya_ptr, plo_ptr, phi_ptr, rows, M)
        c = tl.load(c_ptr + rows, mask=rm, other=0.0)
        cw = tl.load(cw_ptr + rows, mask=rm, other=0.0)
        neg, pos = _masks(rows, cols, valid, plo, phi, kv0, N, IN_BATCH)
        live = (neg & (cw != 0.0)[:, None]) | (pos & (c != 0.0)[:, None])
        if tl.max(tl.max(live.to(tl.int32), axis=1), axis=0) > 0:
            nl = tl.load(nl_ptr + rows, mask=rm, other=0.0)
            s = _logits(a_ptr, k_ptr, rows, cols, M, N, D, inv_t, ACC, PREC, BLOCK_M,
                        BLOCK_N, BLOCK_D)
            ds = _dlogits(s, neg, pos, nl, cw, c)
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * D + dcol[None, :],
                        mask=rm[:, None] & (dcol < D)[None, :], other=0.0).to(ACC)
            acc += _dot(tl.trans(ds), a, PREC_G)
    out = (sp.to(tl.int64) * N + cols[:, None].to(tl.int64)) * D + dcol[None, :]
    tl.store(dk_ptr + out, acc * inv_t, mask=(cols < N)[:, None] & (dcol < D)[None, :])


def _precision(dtype, precision="fp32"):
    """Dot precision of the logits: fp32 inputs 3xTF32 by default (fp32-level accuracy), one
    TF32 product or bf16 operands when asked (``precision``, the losses' opt-in); half inputs
    multiply natively, fp64 exactly."""
    if dtype != torch.float32:
        return "ieee"
    if precision == "fp32":
        return "tf32x3"
    return precision + ("_emulated" if interpreting() else "")


def _grad_precision(dtype, precision="fp32"):
    """Dot precision of the gradient GEMMs (ds and the rows are fp32, fp64 for fp64 inputs):
    the logits' for fp32 inputs with a ``precision`` other than fp32, else 3xTF32."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32 and precision != "fp32":
        return _precision(dtype, precision)
    return "tf32x3"


def _config(D, dtype, backward, gpu=None):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). GPU: 64 x 32 logit tiles in forward, 32 x 32 in
    backward (a BLOCK x D-block accumulator lives in registers), logits summed over 32-wide D
    chunks (larger tiles spill: every 2-D tile costs BLOCK_M BLOCK_N / threads registers,
    pointers twice that); the interpreter: large tiles (its cost is per program)."""
    if not (gpu_config() if gpu is None else gpu):
        return 64, 64, next_pow2(D), 4
    if dtype == torch.float64:
        return 16, 16, min(next_pow2(D), 32), 4
    if backward:
        return 32, 32, 32, 8
    return 64, 32, 32, 4




def _stages(D, block_d):
    """Software pipelining of the D-chunk loads (triton's num_stages): two deep where D is a
    whole number of chunks, at least two (D = 64 ... 512: sm_80/sm_90 keep their registers
    and occupancy, shared memory 8 -> 12-20 KiB, no spill with triton 3.6-3.9); one stage
    otherwise (D = 40 spilled 24-32 bytes on sm_80 with two)."""
    return 2 if D % block_d == 0 and D >= 2 * block_d else 1


def _splits(tiles, n, block, gpu=None):
    """(splits, rows per split): split n rows (keys, or anchors for the dk kernel) in chunks of
    whole blocks so that tiles x splits programs reach PROGRAMS; one split under the
    interpreter's own configuration (its cost is per program)."""
    blocks = max(triton.cdiv(n, block), 1)
    want = triton.cdiv(PROGRAMS, max(tiles, 1)) if (gpu_config() if gpu is None else gpu) else 1
    per = triton.cdiv(blocks, min(max(want, 1), blocks)) * block
    return triton.cdiv(max(n, 1), per), per


def _d_block(D):
    """Columns of D a gradient program accumulates: all of them up to 256, else 256 (D = 512:
    two programs per tile, each recomputing the logits, instead of a spilling accumulator)."""
    return min(next_pow2(D), 256)


def launch_plan(M, N, D, fp64=False, gpu=None):
    """The grids the launchers below choose for M anchors, N keys and D (the cost model reads
    them): key splits and programs of the forward kernels, of the da kernel, D blocks."""
    dtype = torch.float64 if fp64 else torch.float32
    bm, bn, _, _ = _config(D, dtype, False, gpu)
    tiles = triton.cdiv(M, bm)
    S = _splits(tiles, N, bn, gpu)[0]
    bm_b, bn_b, _, _ = _config(D, dtype, True, gpu)
    nd = triton.cdiv(D, _d_block(D))
    tiles_b = triton.cdiv(M, bm_b)
    Sb = _splits(tiles_b * nd, N, bn_b, gpu)[0]
    return dict(fwd_splits=S, fwd_programs=tiles * S, bwd_splits=Sb,
                bwd_programs=tiles_b * Sb * nd, d_blocks=nd)


def _ranges(ya, yk):
    """Each sorted anchor's positive key range [plo, phi) in the sorted keys (int32), and the
    first labelled key kv0 (a 1-element int32 tensor): no host sync."""
    yk = yk.contiguous()
    plo = torch.searchsorted(yk, ya.contiguous(), right=False)
    phi = torch.searchsorted(yk, ya.contiguous(), right=True)
    invalid = ya < 0
    plo = torch.where(invalid, 0, plo).to(torch.int32)
    phi = torch.where(invalid, 0, phi).to(torch.int32)
    kv0 = torch.searchsorted(yk, torch.zeros(1, dtype=yk.dtype, device=yk.device)).to(torch.int32)
    return plo, phi, kv0


def tiled_forward(a, ya, k, yk, temperature, in_batch, positives=True, precision="fp32"):
    """a (M, D), k (N, D), labels (M,), (N,), rows sorted by label; k is a when in_batch.
    Returns (terms, npos int32, nl, w); positives=False skips pass 2 (terms, npos, w zero);
    precision: of the logits' products for fp32 inputs (pixcon.ops._common.PRECISIONS)."""
    a, k = a.contiguous(), k.contiguous()
    M, D = a.shape
    N = k.shape[0]
    acc = torch_acc_dtype(a.dtype)
    dev = a.device
    if M == 0:
        z = torch.empty(0, dtype=acc, device=dev)
        return z, torch.empty(0, dtype=torch.int32, device=dev), z, z
    ya, yk = ya.to(torch.int64), yk.to(torch.int64)
    plo, phi, kv0 = _ranges(ya, yk)
    bm, bn, bd, nw = _config(D, a.dtype, False)
    tiles = triton.cdiv(M, bm)
    S, CH = _splits(tiles, N, bn)
    meta = dict(ACC=acc_dtype(a.dtype), PREC=_precision(a.dtype, precision), BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=bd, num_warps=nw, num_stages=_stages(D, bd), maxnreg=255)
    part_m = torch.empty(S, M, dtype=acc, device=dev)
    part_l = torch.empty(S, M, dtype=acc, device=dev)
    _tiled_lse_kernel[(tiles, S)](a, k, ya, plo, phi, kv0, part_m, part_l, M, N, D, CH,
                                  1.0 / temperature, **meta)
    mx = part_m.amax(dim=0)
    fin = torch.isfinite(mx)
    ref = torch.where(fin, mx, 0.0)
    total = (part_l * torch.exp(torch.where(torch.isfinite(part_m), part_m, ref) - ref)).sum(0)
    nl = torch.where(fin & (total > 0), ref + torch.log(torch.where(total > 0, total, 1.0)),
                     float("-inf"))
    valid = ya >= 0
    npos = torch.where(valid, phi - plo - int(in_batch), 0).clamp(min=0).to(torch.int32)
    if not positives:
        zero = torch.zeros(M, dtype=acc, device=dev)
        return zero, torch.zeros_like(npos), nl, zero
    part_sp = torch.empty(S, M, dtype=acc, device=dev)
    part_w = torch.empty(S, M, dtype=acc, device=dev)
    _tiled_pos_kernel[(tiles, S)](a, k, ya, plo, phi, kv0, nl.contiguous(), part_sp, part_w, M,
                                  N, D, CH, 1.0 / temperature, IN_BATCH=in_batch, **meta)
    terms = torch.where(npos > 0, part_sp.sum(0) / npos.clamp(min=1).to(acc), 0.0)
    return terms, npos, nl, part_w.sum(0)


def tiled_backward(grad, a, ya, k, yk, nl, w, npos, temperature, in_batch, key_grad,
                   grad_nl=None, precision="fp32"):
    """Gradients (da, dk) of sum(grad * terms + grad_nl * nl) in the accumulation dtype; dk is
    None unless key_grad (in-batch: da already holds both sides). Rows sorted by label."""
    a, k = a.contiguous(), k.contiguous()
    M, D = a.shape
    N = k.shape[0]
    acc = torch_acc_dtype(a.dtype)
    c = torch.where(npos > 0, grad.to(acc) / npos.clamp(min=1).to(acc), 0.0)
    cw = c * w if grad_nl is None else c * w + grad_nl.to(acc)      # weight of e^{s - NL}
    cw = torch.where(torch.isfinite(nl), cw, 0.0).contiguous()      # no negative at all
    c = c.contiguous()
    need_dk = key_grad or in_batch
    if M == 0 or N == 0:
        da = torch.zeros(M, D, dtype=acc, device=a.device)
        dk = torch.zeros(N, D, dtype=acc, device=a.device) if need_dk else None
        return (da + dk if in_batch else da), (None if in_batch else dk)
    ya, yk = ya.to(torch.int64), yk.to(torch.int64)
    plo, phi, kv0 = _ranges(ya, yk)
    bm, bn, bd, nw = _config(D, a.dtype, True)
    bdo = _d_block(D)
    nd = triton.cdiv(D, bdo)
    args = (a, k, ya, plo, phi, kv0, nl.contiguous(), cw, c)
    meta = dict(IN_BATCH=in_batch, ACC=acc_dtype(a.dtype), PREC=_precision(a.dtype, precision),
                PREC_G=_grad_precision(a.dtype, precision), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                BLOCK_DO=bdo, num_warps=nw, num_stages=_stages(D, bd), maxnreg=255)
    tiles_a = triton.cdiv(M, bm)
    S, CH = _splits(tiles_a * nd, N, bn)
    da = torch.empty(S, M, D, dtype=acc, device=a.device)
    _tiled_bwd_da_kernel[(tiles_a, S, nd)](*args, da, M, N, D, CH, 1.0 / temperature, **meta)
    da = da.sum(0)
    dk = None
    if need_dk:
        tiles_k = triton.cdiv(N, bn)
        SA, CHM = _splits(tiles_k * nd, M, bm)
        dk = torch.empty(SA, N, D, dtype=acc, device=a.device)
        _tiled_bwd_dk_kernel[(tiles_k, SA, nd)](*args, dk, M, N, D, CHM, 1.0 / temperature,
                                                **meta)
        dk = dk.sum(0)
    if in_batch:
        return da + dk, None
    return da, dk
