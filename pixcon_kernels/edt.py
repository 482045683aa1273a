"""Exact Euclidean distance transform of batched label maps (binary or multi-label), two passes
over any number of maps of different sizes in one launch each (a ragged batch: the BANE pyramid
is one call), reading the labels in their own dtype:

  column pass: G(x, y) = distance along column x to the nearest pixel whose label differs from
               L(x, y). Runs of equal labels are found with scans: the start of y's run is a
               running max of the rows where the label changes (down the column), its end a
               running min (up the column), over BLOCK_H-row tiles with the carry between
               tiles, one program per (map, column block, segment of rows): each segment
               first finds the nearest change past its ends (a look a tile at a time), so a
               column's segments run at once: 2 SEG / BLOCK_H dependent tile steps, not 2 H.
  row pass:    D^2(x, y) = min_x' (x - x')^2 + [L(x', y) == L(x, y)] G(x', y)^2, parallel over
               pixels: each pixel looks outward from x, d = 1, 2, ..., and stops once d^2
               reaches the best it has found (a differing pixel at distance d, or its own
               label's column distance): ceil(D) steps a pixel, a tile's as many as its
               farthest pixel's, each a coalesced read of the tile shifted by d. Exact int32
               arithmetic (equal to SciPy bit for bit). A map's work follows its distances: a
               pixel with no differing pixel in the whole map walks its row (O(W)).

Background pixels (L == background) get 0; a pixel with no differing pixel anywhere gets +inf.
"""
import torch
import triton
import triton.language as tl

from ._utils import PROGRAMS, gpu_config, next_pow2

# "no differing pixel along this column": a constexpr, since a plain module global read inside
# @triton.jit compiles only under the interpreter (the compiler raises NameError)
FAR = tl.constexpr(1 << 30)
# "no differing pixel found": above any squared distance (G^2 + d^2 <= 2 x 32767^2 < 2^31 - 1)
NONE = tl.constexpr(2147483647)
MAX_SIDE = 32767       # G^2 < FAR, stored in int32
COL_SEGMENT = 128      # GPU: the fewest rows a column-pass program sweeps (2 x 4 tile steps)


def col_segment(n_cols: int, H: int) -> int:
    """Rows a column-pass program sweeps on a GPU: segments of at least COL_SEGMENT rows, only
    as many as it takes for the column blocks to reach PROGRAMS (about four a SM; a map whose
    column blocks alone fill the GPU keeps whole columns: more segments would add waves, not
    overlap)."""
    n_seg = max(1, min(PROGRAMS // max(n_cols, 1), triton.cdiv(H, COL_SEGMENT)))
    return triton.cdiv(triton.cdiv(H, n_seg), 32) * 32


def row_tile(W: int, gpu: bool = True) -> tuple[int, int]:
    """(rows, pixels) of a row-pass program. GPU: one warp, 32 pixels of a row by 2 rows (a
    program walks as far as its farthest pixel: small tiles walk less; two pixels a lane overlap
    their loads); the interpreter (its cost is per program and step): about 16,384 pixels."""
    bx = min(next_pow2(W), 32 if gpu else 256)
    return (64 if gpu else 16384) // bx, bx


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
def _any(mask):
    """Scalar: some element of a 2-D mask is set."""
    return tl.max(tl.max(mask.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _edt_cols_kernel(lab_ptr, g_ptr, buf_ptr, col_tab_ptr, bg, SEG, BLOCK_H: tl.constexpr,
                     BLOCK_W: tl.constexpr):
    """Program (p, s): columns x0 .. x0 + BLOCK_W of the map at element offset `base` (H x W),
    from its table row p (base, H, W, x0), rows [s SEG, (s + 1) SEG) of it, in tiles of BLOCK_H
    rows. A segment first looks past its ends, a tile at a time, for each column's nearest row
    where the label changes (usually within one tile; a column without any walks to the map's
    edge), so the segments of a column run at once; inside the segment the carry between tiles
    is the only dependence. Writes G^2 (saturated to FAR; 0 on background)."""
    t = col_tab_ptr + tl.program_id(0) * 4
    base = tl.load(t)
    H = tl.load(t + 1).to(tl.int32)
    W = tl.load(t + 2).to(tl.int32)
    xl = tl.arange(0, BLOCK_W)[None, :]
    x = tl.load(t + 3).to(tl.int32) + xl
    xm = x < W
    lab = lab_ptr + base + x
    gp = g_ptr + base + x
    prog = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    buf = buf_ptr + prog * BLOCK_H * BLOCK_W                 # [BLOCK_H, BLOCK_W] scratch
    y_lo = tl.program_id(1) * SEG
    y_hi = tl.minimum(y_lo + SEG, H)
    # above the segment: the last row y < y_lo with L(y) != L(y - 1), per column (-1: none)
    carry = tl.full([1, BLOCK_W], -1, tl.int32)
    todo = xm & (y_lo < H)
    top = y_lo
    go = _any(todo) & (top > 0)
    while go:
        y = (top - BLOCK_H + tl.arange(0, BLOCK_H))[:, None]
        m = (y >= 1) & todo
        off = y.to(tl.int64) * W
        cur = tl.load(lab + off, mask=m, other=0)
        above = tl.load(lab + off - W, mask=m, other=0)
        last = tl.max(tl.where(m & (cur != above), y, -1), axis=0)[None, :]
        carry = tl.where(todo, last, carry)
        todo = todo & (last < 0)
        top -= BLOCK_H
        go = _any(todo) & (top > 0)
    # down: distance to the nearest differing pixel above = y - (start of y's run) + 1
    for y0 in range(y_lo, y_hi, BLOCK_H):
        y = (y0 + tl.arange(0, BLOCK_H))[:, None]
        m = (y < y_hi) & xm
        off = y.to(tl.int64) * W
        cur = tl.load(lab + off, mask=m, other=0)
        above = tl.load(lab + off - W, mask=m & (y >= 1), other=0)
        change = m & (y >= 1) & (cur != above)
        start = _run_ends(change, y, carry, buf, xl, BLOCK_W, False)
        carry = tl.max(start, axis=0)[None, :]
        tl.store(gp + off, tl.where(start >= 0, y - start + 1, FAR), mask=m)
    # below the segment: the first row y >= y_hi with L(y) != L(y + 1) (2^30: none)
    carry = tl.full([1, BLOCK_W], 1 << 30, tl.int32)
    todo = xm & (y_lo < H)
    bot = y_hi
    go = _any(todo) & (bot + 1 < H)
    while go:
        y = (bot + tl.arange(0, BLOCK_H))[:, None]
        m = (y + 1 < H) & todo
        off = y.to(tl.int64) * W
        cur = tl.load(lab + off, mask=m, other=0)
        below = tl.load(lab + off + W, mask=m, other=0)
        first = tl.min(tl.where(m & (cur != below), y, 1 << 30), axis=0)[None, :]
        carry = tl.where(todo, first, carry)
        todo = todo & (first >= 1 << 30)
        bot += BLOCK_H
        go = _any(todo) & (bot + 1 < H)
    # up: distance to the nearest differing pixel below = (end of y's run) + 1 - y; G^2
    for i in range(0, y_hi - y_lo, BLOCK_H):
        y = (y_hi - i - BLOCK_H + tl.arange(0, BLOCK_H))[:, None]      # tiles from the bottom
        m = (y >= y_lo) & (y < y_hi) & xm
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
def _edt_rows_kernel(lab_ptr, g_ptr, out_ptr, row_tab_ptr, R, bg, SQUARED: tl.constexpr,
                     EXACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr):
    """Program (i, j): rows i BLOCK_R .. of the ragged batch (table rows (element offset, W)),
    pixels j BLOCK_X .. of each, one lane a pixel. Each pixel starts from its own column
    distance and looks outward, d = 1, 2, ..., at x - d and x + d: a pixel of another label
    there bounds D^2 by d^2, one of its own label by d^2 + G^2. Once d^2 reaches the best found,
    nothing farther is closer, so a pixel takes ceil(D) steps and the tile as many as its
    farthest pixel (a pixel with no differing pixel anywhere: its row's width). Neighbouring
    lanes read neighbouring pixels: every step is one coalesced, cache-resident read of the
    tile shifted by d. int32 throughout: G^2 < 2^30 and d^2 < 2^30, NONE (2^31 - 1) = none."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)[None, :]
    rm = r < R
    row = tl.load(row_tab_ptr + 2 * r, mask=rm, other=0)
    W = tl.load(row_tab_ptr + 2 * r + 1, mask=rm, other=0).to(tl.int32)
    on = rm & (x < W)
    lab = lab_ptr + row
    gp = g_ptr + row
    cur = tl.load(lab + x, mask=on, other=0)
    g = tl.load(gp + x, mask=on, other=0)
    best = tl.where(on & (cur != bg), tl.where(g >= FAR, NONE, g), 0)
    d = tl.program_id(0) * 0 + 1
    live = (d * d < best) & ((x >= d) | (x + d < W))
    while _any(live):
        dd = d * d
        for sign in tl.static_range(2):
            xs = x + (2 * sign - 1) * d            # x - d, then x + d
            ok = live & (xs >= 0) & (xs < W)
            gs = tl.load(gp + xs, mask=ok, other=0)
            same = tl.load(lab + xs, mask=ok, other=0) == cur
            cand = tl.where(same, tl.where(gs >= FAR, NONE, gs + dd), dd)
            best = tl.where(ok, tl.minimum(best, cand), best)
        d += 1
        live = live & (d * d < best) & ((x >= d) | (x + d < W))
    if EXACT:                        # float64 squared distances: exact (below 2^31 here)
        val = best.to(tl.float64)
    elif SQUARED:
        val = best.to(tl.float32)
    else:
        val = tl.sqrt(best.to(tl.float32))
    tl.store(out_ptr + row + x, tl.where(best == NONE, float("inf"), val), mask=on)


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
    # GPU: 32 x 32 tiles, one program per (map, 32 columns, segment of SEG rows: col_segment)
    # (64-row tiles take 255 registers with triton 3.6); the interpreter: whole maps
    gpu = gpu_config()
    Hmax = max(s[1] for s in shapes)
    BLOCK_W = 32 if gpu else min(next_pow2(max(s[2] for s in shapes)), 256)
    BLOCK_H = 32 if gpu else min(next_pow2(Hmax), 256)
    col_tab, row_tab = _tables(shapes, flat.device, BLOCK_W)
    SEG = col_segment(col_tab.shape[0], Hmax) if gpu else Hmax
    n_cols, n_seg = col_tab.shape[0], triton.cdiv(Hmax, SEG)
    buf = torch.empty(n_cols * n_seg * BLOCK_H * BLOCK_W, dtype=torch.int32, device=flat.device)
    _edt_cols_kernel[(n_cols, n_seg)](lab, g, buf, col_tab, background, SEG, BLOCK_H=BLOCK_H,
                                      BLOCK_W=BLOCK_W)
    R, Wmax = row_tab.shape[0], max(s[2] for s in shapes)
    BLOCK_R, BLOCK_X = row_tile(Wmax, gpu)
    _edt_rows_kernel[(triton.cdiv(R, BLOCK_R), triton.cdiv(Wmax, BLOCK_X))](
        lab, g, out, row_tab, R, background, SQUARED=squared or exact, EXACT=exact,
        BLOCK_R=BLOCK_R, BLOCK_X=BLOCK_X, num_warps=1 if gpu else 4)
    return out


def distance_transform(labels: torch.Tensor, background: int, squared: bool,
                       exact: bool = False) -> torch.Tensor:
    """labels: (..., H, W) integer/bool. Returns float32 distances (or squared ones; ``exact``:
    float64 squared distances) of the same shape."""
    H, W = labels.shape[-2:]
    N = labels.numel() // max(H * W, 1)
    out = distance_transform_ragged(labels.reshape(-1), [(N, H, W)], background, squared, exact)
    return out.view(labels.shape)
