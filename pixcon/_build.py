"""The compiled CPU kernels when pip did not build them: built once against the torch that is
installed, with torch's cpp_extension (ninja, a C++ compiler), cached per torch version and
source hash, and loaded by ``import pixcon`` from then on.

    python -m pixcon.build            # a few minutes on 2 cores; prints where the library went

``pip install --no-build-isolation .`` builds the same kernels at install time instead (pixcon._C).
The cache is ``$PIXCON_CACHE`` or ``~/.cache/pixcon``.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

NAME = "pixcon_cpu_kernels"
# -fopenmp: at::parallel_for is serial without it; -fno-math-errno: vector square roots (setup.py)
FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno"]


def source_dir() -> Path | None:
    """The C++ sources: shipped in the package (pixcon/_csrc, a wheel) or the checkout's csrc/."""
    here = Path(__file__).resolve().parent
    for d in (here / "_csrc", here.parent / "csrc"):
        if (d / "pixcon.cpp").is_file():
            return d
    return None


def sources(root: Path) -> list[Path]:
    return [root / "pixcon.cpp", *sorted((root / "cpu").glob("*.cpp"))]


def cache_dir(files: list[Path]) -> Path:
    """One folder per (torch version, sources): a new torch or new sources build anew."""
    h = hashlib.sha256(torch.__version__.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for f in sorted((files[0].parent / "cpu").glob("*.h")):
        h.update(f.read_bytes())
    base = Path(os.environ.get("PIXCON_CACHE") or Path.home() / ".cache" / "pixcon")
    return base / f"torch-{torch.__version__}-{h.hexdigest()[:16]}"


def _library(folder: Path) -> Path | None:
    found = sorted(folder.glob(f"{NAME}*.so")) if folder.is_dir() else []
    return found[0] if found else None


def load_cached() -> bool:
    """Load a library that :func:`build` made for this torch and these sources; False if none."""
    root = source_dir()
    if root is None:
        return False
    lib = _library(cache_dir(sources(root)))
    if lib is None:
        return False
    torch.ops.load_library(str(lib))
    return True


def build(*, verbose: bool = True, files: list[Path] | None = None) -> Path:
    """Compile the kernels (or ``files``) into the cache and load them. Returns the library."""
    from torch.utils import cpp_extension
    root = source_dir()
    if root is None:
        raise RuntimeError("pixcon.build: the C++ sources are not in this installation "
                           "(pixcon/_csrc or a checkout's csrc/)")
    files = files or sources(root)
    out = cache_dir(files)
    out.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=NAME, sources=[str(f) for f in files], extra_cflags=FLAGS,
                       extra_ldflags=["-fopenmp"], build_directory=str(out),
                       is_python_module=False, verbose=verbose)
    lib = _library(out)
    if lib is None:
        raise RuntimeError(f"pixcon.build: no library in {out} after the build")
    return lib


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m pixcon.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", action="store_true", help="only the last line")
    a = p.parse_args(argv)
    print(f"pixcon.build: compiling the CPU kernels against torch {torch.__version__} "
          f"(a few minutes on 2 cores)", flush=True)
    try:
        lib = build(verbose=not a.quiet)
    except (RuntimeError, OSError, ImportError) as e:
        print(f"pixcon.build: failed: {e}", file=sys.stderr)
        return 1
    print(f"pixcon.build: built {lib}; `import pixcon` loads it from now on")
    return 0
