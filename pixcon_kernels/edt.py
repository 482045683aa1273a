"""Exact Euclidean distance transform of batched label maps (binary or multi-label), two passes
over any number of maps of different sizes in one launch each (a ragged batch: the BANE pyramid
is one call), reading the labels in their own dtype:

  column pass: G(x, y) = distance along column x to the nearest pixel whose label differs from
               L(x, y). Runs of equal labels are found with scans: the start of y's run is a
               running max of the rows where the label changes (down the column), its end a
               running min (up the column), over BLOCK_H-row tiles with the carry between
               tiles: H / BLOCK_H dependent steps per column, not H, and one program per
               (map, column block) -- many programs.
  row pass:    D^2(x, y) = min_x' (x - x')^2 + [L(x', y) == L(x, y)] G(x', y)^2. Beyond the
               nearest differing pixel of the row nothing is closer, so within each run of equal
               labels [s, e] it is the lower envelope of the parabolas (x - x')^2 + G(x')^2 of
               the run (Felzenszwalb & Huttenlocher: O(W) per row), and the run's ends add
               (x - s + 1)^2 and (e + 1 - x)^2. One lane per row; parabola intersections are
               compared exactly in int64 by cross-multiplication (no floats: equal to SciPy
               bit for bit).

Background pixels (L == background) get 0; a pixel with no differing pixel anywhere gets +inf.
"""
import torch
import triton
import triton.language as tl

from ._utils import gpu_config, next_pow2

# "no differing pixel along this column": a constexpr, since a plain module global read inside
# @triton.jit compiles only under the interpreter (the compiler raises NameError)
FAR = tl.constexpr(1 << 30)
# FAR read back as a parabola's height: above any squared distance (G^2 + W^2 < 2^31), low
# enough that the envelope's cross-products (heights times 2 W) stay inside int64
BIG = tl.constexpr(1 << 40)
MAX_SIDE = 32767       # G^2 < FAR, stored in int32


@triton.jit
def _run_ends(mark, y, carry, buf, x, STRIDE: tl.constexpr, REVERSE: tl.constexpr):
    """Per column of a [BLOCK_H, BLOCK_W] tile: the nearest marked row at or above each row
    (REVERSE: at or below), carry where there is none in the tile. A running max (min) of the
    marked rows, as a cumulative count of marks and one scatter/gather through the program's
    scratch tile buf: Triton scans other than sums run elementwise in the interpreter, a
    cumulative sum and memory do not."""
    rank = tl.cumsum(mark.to(tl.int32), 0, reverse=REVERSE)
    tl.debug_barrier()                         # the previous tile's reads are done
    tl.store(buf + (rank - 1) * STRIDE + x, y, mask=mark)
    tl.debug_barrier()                         # every thread's marks are written
    return tl.where(rank >= 1, tl.load(buf + (tl.maximum(rank, 1) - 1) * STRIDE + x,
                                       mask=rank >= 1, other=0), carry)


@triton.jit
def _edt_cols_kernel(lab_ptr, g_ptr, buf_ptr, col_tab_ptr, bg, BLOCK_H: tl.constexpr,
                     BLOCK_W: tl.constexpr):
    """Program p: columns x0 .. x0 + BLOCK_W of the map at element offset `base` (H x W), from
    its table row (base, H, W, x0), in tiles of BLOCK_H rows (the carry between tiles is the
    only dependence). Writes G^2 (saturated to FAR; 0 on background)."""
    t = col_tab_ptr + tl.program_id(0) * 4
    base = tl.load(t)
    H = tl.load(t + 1).to(tl.int32)
    W = tl.load(t + 2).to(tl.int32)
    xl = tl.arange(0, BLOCK_W)[None, :]
    x = tl.load(t + 3).to(tl.int32) + xl
    xm = x < W
    lab = lab_ptr + base + x
    gp = g_ptr + base + x
    buf = buf_ptr + tl.program_id(0).to(tl.int64) * BLOCK_H * BLOCK_W   # [BLOCK_H, BLOCK_W]
    # down: distance to the nearest differing pixel above = y - (start of y's run) + 1
    carry = tl.full([1, BLOCK_W], -1, tl.int32)
    for y0 in range(0, H, BLOCK_H):
        y = (y0 + tl.arange(0, BLOCK_H))[:, None]
        m = (y < H) & xm
        off = y.to(tl.int64) * W
        cur = tl.load(lab + off, mask=m, other=0)
        above = tl.load(lab + off - W, mask=m & (y >= 1), other=0)
        change = m & (y >= 1) & (cur != above)
        start = _run_ends(change, y, carry, buf, xl, BLOCK_W, False)
        carry = tl.max(start, axis=0)[None, :]
        tl.store(gp + off, tl.where(start >= 0, y - start + 1, FAR), mask=m)
    # up: distance to the nearest differing pixel below = (end of y's run) + 1 - y; G^2
    carry = tl.full([1, BLOCK_W], 1 << 30, tl.int32)
    for i in range(0, H, BLOCK_H):
        y = (H - i - BLOCK_H + tl.arange(0, BLOCK_H))[:, None]      # tiles from the bottom
        m = (y >= 0) & (y < H) & xm
        off = y.to(tl.int64) * W
        cur = tl.load(lab + off, mask=m, other=0)
        below = tl.load(lab + off + W, mask=m & (y + 1 < H), other=0)
        change = m & (y + 1 < H) & (cur != below)
        end = _run_ends(change, y, carry, buf, xl, BLOCK_W, True)
        carry = tl.min(tl.where(m, end, 1 << 30), axis=0)[None, :]
        down = tl.where(end < H, end - y + 1, FAR)
        g = tl.minimum(tl.load(gp + off, mask=m, other=0), down)
        g2 = tl.where(g >= 32768, FAR, g * g)
        tl.store(gp + off, tl.where(cur == bg, 0, g2), mask=m)


@triton.jit
def _key(g_ptr, row, v, ok):
    """A_v = G^2(v) + v^2 (int64) of the parabola at x' = v of each lane (a column without a
    differing pixel: BIG, so that any finite distance is below it)."""
    f = tl.load(g_ptr + row + v, mask=ok, other=0).to(tl.int64)
    f = tl.where(f >= FAR, BIG, f)
    return f + v.to(tl.int64) * v


@triton.jit
def _edt_rows_kernel(lab_ptr, g_ptr, out_ptr, v_ptr, top_ptr, end_ptr, row_tab_ptr, R, Wmax, bg,
                     SQUARED: tl.constexpr, EXACT: tl.constexpr, BLOCK_R: tl.constexpr):
    """Lane r: row r of the ragged batch (table row (element offset, W)). Sweep 1 builds each
    run's lower envelope (stack of parabola positions v[s..top], in scratch) and records the
    run's top and end at its start s; sweep 2 walks each envelope and writes D^2 (or D)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    row = tl.load(row_tab_ptr + 2 * r, mask=rm, other=0)
    W = tl.load(row_tab_ptr + 2 * r + 1, mask=rm, other=0).to(tl.int32)
    s = tl.full([BLOCK_R], -1, tl.int32)
    k = tl.full([BLOCK_R], -1, tl.int32)
    prev = tl.load(lab_ptr + row, mask=rm & (W > 0), other=0)
    for x in range(0, Wmax):
        on = rm & (x < W)
        cur = tl.load(lab_ptr + row + x, mask=on, other=0)
        new = on & ((s < 0) | (cur != prev))
        tl.store(top_ptr + row + s, k, mask=new & (s >= 0))         # close the previous run
        tl.store(end_ptr + row + s, x - 1 + s * 0, mask=new & (s >= 0))
        s = tl.where(new, x, s)
        k = tl.where(new, x - 1, k)
        a_x = _key(g_ptr, row, x + s * 0, on)
        # pop v[k] while the new parabola's intersection with it is left of z[k]
        cont = on & (k > s)
        while tl.max(cont.to(tl.int32), axis=0) > 0:
            vk = tl.load(v_ptr + row + k, mask=cont, other=0)
            vl = tl.load(v_ptr + row + k - 1, mask=cont, other=0)
            a_k = _key(g_ptr, row, vk, cont)
            a_l = _key(g_ptr, row, vl, cont)
            pop = cont & ((a_x - a_k) * (vk - vl).to(tl.int64)
                          <= (a_k - a_l) * (x - vk).to(tl.int64))
            k = tl.where(pop, k - 1, k)
            cont = pop & (k > s)
        k = tl.where(on, k + 1, k)
        tl.store(v_ptr + row + k, x + s * 0, mask=on)
        prev = tl.where(on, cur, prev)
    tl.store(top_ptr + row + s, k, mask=rm & (s >= 0))
    tl.store(end_ptr + row + s, W - 1, mask=rm & (s >= 0))
    # sweep 2: per run, walk the envelope left to right
    s = tl.full([BLOCK_R], -1, tl.int32)
    j = s
    top = s
    e = s
    prev = tl.load(lab_ptr + row, mask=rm & (W > 0), other=0)
    for x in range(0, Wmax):
        on = rm & (x < W)
        cur = tl.load(lab_ptr + row + x, mask=on, other=0)
        new = on & ((s < 0) | (cur != prev))
        s = tl.where(new, x, s)
        j = tl.where(new, x, j)
        top = tl.where(new, tl.load(top_ptr + row + x, mask=new, other=0), top)
        e = tl.where(new, tl.load(end_ptr + row + x, mask=new, other=0), e)
        # advance while the next parabola is lower at x: z[j + 1] < x, exactly
        cont = on & (j < top)
        while tl.max(cont.to(tl.int32), axis=0) > 0:
            vj = tl.load(v_ptr + row + j, mask=cont, other=0)
            vn = tl.load(v_ptr + row + j + 1, mask=cont, other=0)
            adv = cont & (_key(g_ptr, row, vn, cont) - _key(g_ptr, row, vj, cont)
                          < 2 * x * (vn - vj).to(tl.int64))
            j = tl.where(adv, j + 1, j)
            cont = adv & (j < top)
        vj = tl.load(v_ptr + row + j, mask=on, other=0)
        best = _key(g_ptr, row, vj, on) - vj.to(tl.int64) * vj + (x - vj).to(tl.int64) * (x - vj)
        dl = (x - s + 1).to(tl.int64)
        dr = (e + 1 - x).to(tl.int64)
        best = tl.where(s > 0, tl.minimum(best, dl * dl), best)
        best = tl.where(e < W - 1, tl.minimum(best, dr * dr), best)
        best = tl.where(cur == bg, 0, best)
        if EXACT:                    # float64 squared distances: exact (below 2^31 here)
            val = best.to(tl.float64)
        elif SQUARED:
            val = best.to(tl.float32)
        else:
            val = tl.sqrt(best.to(tl.float32))
        tl.store(out_ptr + row + x, tl.where(best >= BIG, float("inf"), val), mask=on)
        prev = tl.where(on, cur, prev)


def _tables(shapes, device, BLOCK_W):
    """For maps (N, H, W) packed one after another: the column-block table (base, H, W, x0) and
    the row table (offset, W), int64, built on the device from the shapes (a loop over the
    maps, never over rows; no host data copied)."""
    cols, rows, base = [], [], 0
    for (N, H, W) in shapes:
        nb = triton.cdiv(W, BLOCK_W)
        i = torch.arange(N * nb, device=device)
        cols.append(torch.stack([base + (i // nb) * (H * W), torch.full_like(i, H),
                                 torch.full_like(i, W), (i % nb) * BLOCK_W], dim=1))
        y = torch.arange(N * H, device=device)            # rows (n, y) are consecutive
        rows.append(torch.stack([base + y * W, torch.full_like(y, W)], dim=1))
        base += N * H * W
    return torch.cat(cols).contiguous(), torch.cat(rows).contiguous()


def distance_transform_ragged(flat: torch.Tensor, shapes, background: int, squared: bool,
                              exact: bool = False):
    """flat: the maps' labels packed one after another (any integer/bool dtype, read as is),
    shapes: [(N, H, W), ...]. Returns float32 distances (or squared distances, exact below 2^24)
    packed the same way; ``exact``: float64 squared distances. Two launches for the whole
    batch."""
    for (_, H, W) in shapes:
        if H > MAX_SIDE or W > MAX_SIDE:
            raise ValueError(f"distance_transform: sides up to {MAX_SIDE} supported, got {H}x{W}")
    shapes = [s for s in shapes if s[0] * s[1] * s[2] > 0]
    out = torch.empty(flat.numel(), dtype=torch.float64 if exact else torch.float32,
                      device=flat.device)
    if not shapes:
        return out
    lab = flat.contiguous()
    if lab.dtype == torch.bool:
        lab = lab.view(torch.uint8)
    g = torch.empty(flat.numel(), dtype=torch.int32, device=flat.device)
    # GPU: 32 x 32 tiles, one program per (map, 32 columns) (64-row tiles take 255 registers
    # with triton 3.6); the interpreter: whole maps
    gpu = gpu_config()
    BLOCK_W = 32 if gpu else min(next_pow2(max(s[2] for s in shapes)), 256)
    BLOCK_H = 32 if gpu else min(next_pow2(max(s[1] for s in shapes)), 256)
    col_tab, row_tab = _tables(shapes, flat.device, BLOCK_W)
    n_cols = col_tab.shape[0]
    buf = torch.empty(n_cols * BLOCK_H * BLOCK_W, dtype=torch.int32, device=flat.device)
    _edt_cols_kernel[(n_cols,)](lab, g, buf, col_tab, background, BLOCK_H=BLOCK_H,
                                BLOCK_W=BLOCK_W)
    R = row_tab.shape[0]
    scratch = torch.empty(3, flat.numel(), dtype=torch.int32, device=flat.device)
    # GPU: a warp of rows a program; the interpreter: many (its cost is per program and step)
    BLOCK_R = 32 if gpu_config() else 1024
    _edt_rows_kernel[(triton.cdiv(R, BLOCK_R),)](
        lab, g, out, scratch[0], scratch[1], scratch[2], row_tab, R, max(s[2] for s in shapes),
        background, SQUARED=squared or exact, EXACT=exact, BLOCK_R=BLOCK_R,
        num_warps=1 if gpu_config() else 4)
    return out


def distance_transform(labels: torch.Tensor, background: int, squared: bool,
                       exact: bool = False) -> torch.Tensor:
    """labels: (..., H, W) integer/bool. Returns float32 distances (or squared ones; ``exact``:
    float64 squared distances) of the same shape."""
    H, W = labels.shape[-2:]
    N = labels.numel() // max(H * W, 1)
    out = distance_transform_ragged(labels.reshape(-1), [(N, H, W)], background, squared, exact)
    return out.view(labels.shape)
