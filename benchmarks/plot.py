"""Line plots as PNG with Pillow (already a pixcon dependency of the trainer's pictures): one line
per provider, y against problem size, log axes where the values span more than a decade."""
from __future__ import annotations

import math

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (23, 190, 207)]
W, H = 760, 460
LEFT, RIGHT, TOP, BOTTOM = 80, 220, 40, 60


def _span_is_wide(values):
    pos = [v for v in values if v > 0]
    return len(pos) > 1 and max(pos) / min(pos) > 10


def _ticks(lo, hi, log):
    """Tick values on [lo, hi]: powers of ten on a log axis, about five round steps otherwise."""
    if log:
        return [10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / 5))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= 6:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v):
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:g}"


def line_plot(series: dict, path, *, title: str, xlabel: str, ylabel: str):
    """series: {name: [(x, y), ...]}; points with y None are left out. Writes the PNG at path;
    returns the path, or None when no series has a point."""
    from PIL import Image, ImageDraw
    series = {k: sorted((x, y) for x, y in pts if y is not None) for k, pts in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    logx, logy = _span_is_wide(xs) and min(xs) > 0, _span_is_wide(ys) and min(ys) > 0
    fx = math.log10 if logx else float
    fy = math.log10 if logy else float
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(ys), max(ys)) if logy else (0.0, max(ys))
    if x0 == x1:
        x0, x1 = (x0 / 2, x1 * 2) if logx else (x0 - 1, x1 + 1)
    if y0 == y1:
        y0, y1 = (y0 / 2, y1 * 2) if logy else (y0, y1 + 1)
    if logy:
        y0, y1 = 10 ** math.floor(math.log10(y0)), 10 ** math.ceil(math.log10(y1))
    if logx:
        x0, x1 = 10 ** math.floor(math.log10(x0)), 10 ** math.ceil(math.log10(x1))

    def px(x):
        return LEFT + (fx(x) - fx(x0)) / (fx(x1) - fx(x0)) * (W - LEFT - RIGHT)

    def py(y):
        return H - BOTTOM - (fy(y) - fy(y0)) / (fy(y1) - fy(y0)) * (H - TOP - BOTTOM)

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((LEFT, 6), title, fill="black")
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    for t in _ticks(x0, x1, logx):
        if x0 <= t <= x1:
            d.line([px(t), H - BOTTOM, px(t), H - BOTTOM + 5], fill="black")
            d.text((px(t) - 12, H - BOTTOM + 8), _fmt(t), fill="black")
    for t in _ticks(y0, y1, logy):
        if y0 <= t <= y1:
            d.line([LEFT - 5, py(t), W - RIGHT, py(t)], fill=(225, 225, 225))
            d.text((8, py(t) - 6), _fmt(t), fill="black")
    d.text((LEFT + (W - LEFT - RIGHT) // 2 - 60, H - 28),
           xlabel + (" (log)" if logx else ""), fill="black")
    d.text((8, TOP - 16), ylabel + (" (log)" if logy else ""), fill="black")
    for i, (name, pts) in enumerate(sorted(series.items())):
        c = COLOURS[i % len(COLOURS)]
        xy = [(px(x), py(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        ly = TOP + 16 * i
        d.line([W - RIGHT + 10, ly + 6, W - RIGHT + 30, ly + 6], fill=c, width=3)
        d.text((W - RIGHT + 36, ly), name[:28], fill="black")
    img.save(path)
    return path
