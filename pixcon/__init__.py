"""pixcon: fused kernels for pixel-level contrastive losses in semantic segmentation.

Public API: ``pixcon.ops`` (functional losses and primitives) and ``pixcon.nn`` (modules).
"""
import torch  # noqa: F401  (must be imported before the compiled extension: it loads libc10)

try:
    from . import _C  # noqa: F401  registers the compiled pixcon:: ops
    HAS_C = True
except ImportError:  # a source checkout that was never built: the Python paths still work
    HAS_C = False

__version__ = "0.1.0"
