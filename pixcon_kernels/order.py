"""The interpreter's program order, switchable: a race check that runs on a CPU.

Under ``TRITON_INTERPRET=1`` a launch runs its programs one after another in grid order. A
kernel whose result depends on which program runs first (one program reading what another
writes in the same launch, a partial that assumes its neighbour is done) passes every CPU test
and fails on a GPU, where programs run in any order and at once. ``PIXCON_INTERPRET_ORDER``
changes the order the interpreter runs them in:

    grid          Triton's own order (the default)
    reverse       the last program first
    shuffle:SEED  a fresh permutation per launch, from SEED and the launch's number

Triton's grid loop is not copied: it still walks x, y, z in order and hands each index to
``interpreter_builder.set_grid_idx``, which is wrapped here to give the k-th program it runs the
k-th index of the permutation. ``tl.program_id`` reads that index, so the programs run in the
permuted order. Results that are bitwise equal in all three orders do not depend on program
order (tests/test_order.py runs every Triton op so). Float atomics fail this check by design
(each add lands, but the rounding follows the order): pixcon's kernels use none.
"""
from __future__ import annotations

import contextlib
import os
import random

ORDERS = ("grid", "reverse", "shuffle:SEED")
_state = {"order": "grid", "launch": 0, "perm": None, "dims": (1, 1, 1)}


def parse(order: str) -> str:
    """The order, checked: 'grid', 'reverse' or 'shuffle:<int>'."""
    if order in ("grid", "reverse"):
        return order
    if order.startswith("shuffle:"):
        try:
            int(order.split(":", 1)[1])
            return order
        except ValueError:
            pass
    raise ValueError(f"PIXCON_INTERPRET_ORDER must be one of {ORDERS}, got {order!r}")


def _permutation(n: int):
    order = _state["order"]
    if order == "grid":
        return None
    if order == "reverse":
        return list(range(n - 1, -1, -1))
    perm = list(range(n))
    random.Random(f"{order}:{_state['launch']}").shuffle(perm)
    return perm


def _install():
    """Wrap the interpreter builder's grid methods once (a no-op when not interpreting)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    from triton.runtime import interpreter as ti
    b = ti.interpreter_builder
    if getattr(b, "_pixcon_order", False):
        return True
    set_dim, set_idx = b.set_grid_dim, b.set_grid_idx

    def set_grid_dim(nx, ny, nz):
        _state["launch"] += 1
        _state["dims"] = (nx, ny, nz)
        _state["perm"] = _permutation(nx * ny * nz)
        return set_dim(nx, ny, nz)

    def set_grid_idx(x, y, z):
        perm = _state["perm"]
        if perm is not None:
            _, ny, nz = _state["dims"]
            k = perm[(x * ny + y) * nz + z]
            x, y, z = k // (ny * nz), (k // nz) % ny, k % nz
        return set_idx(x, y, z)

    b.set_grid_dim, b.set_grid_idx = set_grid_dim, set_grid_idx
    b._pixcon_order = True
    return True


def current() -> str:
    """The order later launches run in."""
    return _state["order"]


def set_order(order: str) -> str:
    """Make the interpreter run every later launch's programs in ``order``; returns the order
    it replaces. Raises when not interpreting and the order is not 'grid'."""
    order = parse(order)
    if not _install() and order != "grid":
        raise RuntimeError("PIXCON_INTERPRET_ORDER needs TRITON_INTERPRET=1 (a GPU runs its "
                           "programs in its own order)")
    old, _state["order"], _state["launch"] = _state["order"], order, 0
    return old


@contextlib.contextmanager
def program_order(order: str):
    """``with program_order("reverse"): ...`` -- the order for the launches inside."""
    old = set_order(order)
    try:
        yield
    finally:
        set_order(old)


def from_env():
    """Apply PIXCON_INTERPRET_ORDER if set (called when the kernels are imported). A process
    that compiles instead of interpreting (the AOT check started from an interpreter run)
    ignores it: a GPU runs programs in its own order."""
    order = os.environ.get("PIXCON_INTERPRET_ORDER")
    if order:
        parse(order)
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            set_order(order)
