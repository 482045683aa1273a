"""pixcon: fused kernels for pixel-level contrastive losses in semantic segmentation.

Public API: ``pixcon.ops`` (functional losses and primitives) and ``pixcon.nn`` (modules).
"""
from __future__ import annotations

import os as _os
import sys as _sys

PROGRAMS = ("pixcon", "benchmarks")    # python -m <one of these>...: pixcon's own programs


def _passive_wait_default(argv, torch_loaded: bool) -> bool:
    """Whether pixcon's own command-line programs (``python -m pixcon.train``, ``pixcon.demo``,
    ``benchmarks``, ...; argv: the interpreter's command line) start OpenMP with passive waiting:
    when OMP_WAIT_POLICY is unset and torch, which loads OpenMP and reads it once, is not loaded
    yet. Threads that spin at the end of each parallel region take the time of the one thread
    whose core another process shares: with one core of two busy, Contextrast's step took 2.7x
    longer on 2 threads than on 1 with spinning, 1.1x with passive waiting (idle: the same within
    noise). A library imported into someone else's program changes nothing."""
    if torch_loaded or "OMP_WAIT_POLICY" in _os.environ or "-m" not in argv[:-1]:
        return False
    return argv[argv.index("-m") + 1].split(".")[0] in PROGRAMS


if _passive_wait_default(getattr(_sys, "orig_argv", []), "torch" in _sys.modules):
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402,F401  (must be imported before the compiled extension: it loads libc10)


def _load_extension() -> bool:
    """pixcon._C (built by pip or setup.py), else a library ``python -m pixcon.build`` left in
    the cache, else False: "auto" then runs the reference on CPU tensors and warns once
    (pixcon.ExtensionWarning). PIXCON_EXTENSION=off loads neither and does not warn (the
    reference-only setting)."""
    import importlib
    import os
    if os.environ.get("PIXCON_EXTENSION", "").lower() == "off":
        return False
    try:
        importlib.import_module("pixcon._C")  # registers the compiled CPU kernels of pixcon:: ops
        return True
    except ImportError:
        pass
    from . import _build
    try:
        return _build.load_cached()
    except OSError:                           # a stale or foreign library: build anew
        return False


HAS_C = _load_extension()

__version__ = "0.1.0"


def set_num_threads(n: int | None) -> None:
    """Cap the threads of pixcon's compiled CPU kernels (backend "native": sampling, InfoNCE,
    class sums, the EDT, the tiled contrast) at n; None or 0 follows torch's intra-op setting
    (``torch.set_num_threads``, OMP_NUM_THREADS), which also governs torch's own ops. Results
    do not depend on it. The environment variable PIXCON_NUM_THREADS sets it at import.

    On a machine other processes keep busy, a parallel region waits for its slowest thread: with
    one of two cores taken, the benchmark cases ran up to 10x slower on 2 threads than on 1
    (benchmarks/bench_threads.py); cap at the cores that are free."""
    if isinstance(n, bool) or not (n is None or (isinstance(n, int) and n >= 0)):
        raise ValueError(f"pixcon.set_num_threads: n must be a non-negative int or None, got {n!r}")
    if HAS_C:
        torch.ops.pixcon.set_num_threads(n or 0)


def get_num_threads() -> int | None:
    """The cap set by set_num_threads (None: torch's intra-op setting)."""
    return (torch.ops.pixcon.get_num_threads() or None) if HAS_C else None


def _threads_from_env():
    import os
    v = os.environ.get("PIXCON_NUM_THREADS")
    if v:
        try:
            set_num_threads(int(v))
        except ValueError as e:
            raise ValueError(f"PIXCON_NUM_THREADS must be a non-negative integer, got {v!r}") from e


_threads_from_env()

from .ops._common import ExtensionWarning, SelectedNothingWarning  # noqa: E402

__all__ = ["HAS_C", "ExtensionWarning", "SelectedNothingWarning", "get_num_threads",
           "set_num_threads"]
