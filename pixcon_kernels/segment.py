"""Class sums and counts by label (segment reduction), deterministic and without host syncs.

Each program reduces a contiguous range of pixels for a block of classes and channels with a
one-hot matrix product (exact float32 products, ``input_precision="ieee"``, never TF32) and writes
a partial; the partials are summed by torch in a fixed order, so the result does not depend on
the thread schedule (no float atomics)."""
import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, gpu_config, next_pow2, pool_layout, torch_acc_dtype


@triton.jit
def _class_sums_kernel(x_ptr, lab_ptr, part_ptr, cnt_ptr, P, D, C, HW, s_b, s_s, s_d,
                       pix_per_prog, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=ACC)
    cnt = tl.zeros([BLOCK_C], dtype=tl.int32)
    start = g * pix_per_prog
    end = tl.minimum(start + pix_per_prog, P)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        lab = tl.load(lab_ptr + p, mask=p_ok, other=-1)
        p64 = p.to(tl.int64)
        rows = (p64 // HW) * s_b + (p64 % HW) * s_s
        x = tl.load(x_ptr + rows[:, None] + d[None, :].to(tl.int64) * s_d,
                    mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        onehot = cls[:, None] == lab[None, :]                       # [BLOCK_C, BLOCK_P]
        if ACC == tl.float64:
            acc += tl.dot(onehot.to(ACC), x)
        else:
            acc += tl.dot(onehot.to(ACC), x, input_precision="ieee")
        cnt += tl.sum(onehot.to(tl.int32), axis=1)
    c_ok = cls < C
    tl.store(part_ptr + (g * C + cls[:, None]).to(tl.int64) * D + d[None, :], acc,
             mask=c_ok[:, None] & d_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(cnt_ptr + g * C + cls, cnt, mask=c_ok)


def class_sums(x: torch.Tensor, lab: torch.Tensor, num_classes: int):
    """Per-class sums and counts of pixel vectors.

    x: (B, D, h, w) feature map or (P, D) rows, any float dtype; lab: (P,) int32/int64 class of
    each row, -1 (or any value outside [0, C)) ignored. Returns sums (C, D) in float32 (float64
    for float64 x) and counts (C,) int64."""
    x, P, D, HW, s_b, s_s, s_d = pool_layout(x)
    C = int(num_classes)
    lab = lab.to(torch.int32).contiguous()
    BLOCK_C = min(next_pow2(C), 64)
    BLOCK_D = min(next_pow2(D), 64)
    # GPU: 32-pixel steps, no software pipelining (num_stages=1): the exact-fp32 FMA dot keeps
    # whole K-slices of both operands in registers, and deeper pipelining or longer steps spill
    # (sm_80/sm_90: 255 registers and kilobytes of spills at 128 pixels, 3 stages; at most
    # about 120 here, see pixcon_kernels/RESOURCES.md)
    gpu = gpu_config()
    BLOCK_P = 32 if gpu else 64
    n_blocks = triton.cdiv(max(P, 1), BLOCK_P)
    max_progs = 512 if gpu else 4
    # partials: G x C x D floats; keep them under ~32 MiB
    G = max(1, min(n_blocks, max_progs, (8 << 20) // max(C * D, 1)))
    pix_per_prog = triton.cdiv(n_blocks, G) * BLOCK_P
    G = triton.cdiv(max(P, 1), pix_per_prog)
    out_dt = torch_acc_dtype(x.dtype)
    part = torch.empty(G, C, D, dtype=out_dt, device=x.device)
    cnt = torch.empty(G, C, dtype=torch.int32, device=x.device)
    grid = (G, triton.cdiv(C, BLOCK_C), triton.cdiv(D, BLOCK_D))
    _class_sums_kernel[grid](x, lab, part, cnt, P, D, C, HW, s_b, s_s, s_d, pix_per_prog,
                             ACC=acc_dtype(x.dtype), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
                             BLOCK_D=BLOCK_D, num_stages=1)
    return part.sum(0), cnt.sum(0, dtype=torch.int64)
