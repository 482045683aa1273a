"""Benchmark charts with matplotlib (the optional ``viz`` extra; ``./dev setup`` installs it):
one line per provider, y against problem size, log axes where the values span more than a
decade."""
from __future__ import annotations


# One colour per provider in every plot (matplotlib's tab10 by name), the same "+ bank" line
# dashed; a provider not listed gets a colour from its name's hash, the same in every plot.
COLOURS = {"official-style": "#d62728", "official": "#8c564b", "reference": "#1f77b4",
           "native": "#2ca02c", "fused": "#ff7f0e", "pixcon triton": "#ff7f0e",
           "pixcon C++ (all threads)": "#2ca02c", "pixcon C++ (1 thread)": "#17becf",
           "scipy (CPU, per image/class)": "#7f7f7f", "edt package (CPU, per image)": "#9467bd",
           "opencv exact (CPU, per image/class)": "#bcbd22"}
SPARE = ("#e377c2", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#dbdb8d")


def colour(name: str) -> str:
    """The provider's colour, fixed across plots (a "+ bank" line shares its provider's)."""
    base = name.removesuffix(" + bank")
    if base in COLOURS:
        return COLOURS[base]
    import zlib
    return SPARE[zlib.crc32(base.encode()) % len(SPARE)]


def _style(name: str) -> str:
    return "--" if name.endswith(" + bank") else "-"


def _wide(values):
    pos = [v for v in values if v > 0]
    return len(pos) > 1 and min(pos) == min(values) and max(pos) / min(pos) > 10


def line_plot(series: dict, path, *, title: str, xlabel: str, ylabel: str):
    """series: {name: [(x, y), ...]}; points with y None are left out. Writes the PNG at path;
    returns the path, or None when no series has a point."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise ImportError("benchmark plots need matplotlib: pip install 'pixcon[viz]' "
                          "(./dev setup installs it)") from e
    series = {k: sorted((x, y) for x, y in pts if y is not None) for k, pts in series.items()}
    series = {k: v for k, v in sorted(series.items()) if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.6, 4.6), dpi=100)
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    if len(set(xs)) == 1:            # one problem size (paper mode): bars per provider and case
        _bars(ax, series)
        xlabel = f"provider (one bar per case at {xlabel} = {xs[0]:g})"
    else:
        for name, pts in series.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name,
                    color=colour(name), linestyle=_style(name))
        ax.legend(fontsize=8, loc="best")
    if _wide(xs):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # decades only
    if _wide(ys):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _bars(ax, series):
    """Each provider's points (one per case, ascending) as adjacent bars, the value
    written above each bar."""
    width = 0.8 / max(len(pts) for pts in series.values())
    for i, (name, pts) in enumerate(series.items()):
        for j, (_, y) in enumerate(pts):
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, y, width=width * 0.9, color=colour(name),
                   hatch="//" if name.endswith(" + bank") else None)
            ax.text(x, y, f"{y:,.0f}" if y >= 100 else f"{y:.3g}", ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(range(len(series)), list(series), fontsize=8)
