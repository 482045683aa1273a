"""Triton kernels and their launchers: tensors in, tensors out. No autograd, no argument policy,
no imports from ``pixcon``. Kernels accumulate in float32 (float64 when given float64) and never
store bfloat16, so they run under TRITON_INTERPRET=1 on CPU tensors as well as on CUDA."""
from .order import from_env as _order_from_env  # noqa: E402

_order_from_env()        # PIXCON_INTERPRET_ORDER: the interpreter's program order (order.py)
