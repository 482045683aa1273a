"""The race check the interpreter can run (issue 28): every Triton kernel's outputs do not depend
on the order its programs run in.

Under TRITON_INTERPRET=1 a launch runs its programs in grid order; ``pixcon_kernels.order`` (the
switch PIXCON_INTERPRET_ORDER) runs them reversed or shuffled. Every case of ``tools.smoke``
(every public op, forward and backward, so every kernel) runs in the launchers' GPU
configuration (many programs, partial sums across programs) in the three orders, and the
outputs must be the same bits. (sparse_infonce's key gradient was summed with float atomics,
which round in program order, and failed here; it is now gathered per key in a fixed order.)"""
import pytest
import torch

from tools import smoke

from .conftest import HAS_CUDA, INTERPRET, triton_device

pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(not INTERPRET, reason="program order is the interpreter's")]

ORDERS = ("grid", "reverse", "shuffle:1", "shuffle:2")

try:                 # module-level kernels: the compile check (aot) imports what tests launch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the interpret-marked tests skip without triton
    triton = None

if triton is not None:
    @triton.jit
    def when(counter, out, ids):
        """Each program stores when it ran (an atomic counter) and its id."""
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(out + pid, tl.atomic_add(counter, 1))
        tl.store(ids + pid, pid)

    @triton.jit
    def chain(x):
        """A race on purpose: program i reads what program i - 1 writes."""
        i = tl.program_id(0)
        prev = tl.load(x + i - 1, mask=i > 0, other=0)
        tl.store(x + i, prev + 1)


@pytest.fixture
def order():
    from pixcon_kernels import order
    prev = order.current()              # the run's own order (PIXCON_INTERPRET_ORDER)
    yield order
    order.set_order(prev)


def test_the_switch_reorders_programs(order):
    """Each program records when it ran (an atomic counter): grid order 0..n-1, reversed n-1..0,
    shuffled a permutation that is neither; program ids and num_programs are the grid's."""
    ran = {}
    for o in ("grid", "reverse", "shuffle:5"):
        with order.program_order(o):
            counter = torch.zeros(1, dtype=torch.int32)
            out = torch.full((12,), -1, dtype=torch.int32)
            ids = torch.zeros(12, dtype=torch.int32)
            when[(4, 3)](counter, out, ids)
        assert torch.equal(ids, torch.arange(12, dtype=torch.int32))
        ran[o] = out.tolist()
    assert ran["grid"] == list(range(12))
    assert ran["reverse"] == list(range(11, -1, -1))
    assert sorted(ran["shuffle:5"]) == list(range(12))
    assert ran["shuffle:5"] not in (ran["grid"], ran["reverse"])


def test_a_race_is_caught(order):
    """A kernel in which program i reads what program i - 1 wrote: right in grid order, wrong in
    reversed order -- what the check exists to show."""
    res = {}
    for o in ("grid", "reverse"):
        with order.program_order(o):
            x = torch.zeros(6, dtype=torch.int32)
            chain[(6,)](x)
        res[o] = x.tolist()
    assert res["grid"] == [1, 2, 3, 4, 5, 6]
    assert res["reverse"] != res["grid"]


def test_bad_order_names_the_variable(order):
    with pytest.raises(ValueError, match="PIXCON_INTERPRET_ORDER"):
        order.set_order("backwards")


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors under the interpreter")
@pytest.mark.parametrize("case", smoke.CASES, ids=[c.name for c in smoke.CASES])
def test_outputs_do_not_depend_on_program_order(case, order, monkeypatch):
    monkeypatch.setenv("PIXCON_LAUNCH_CONFIG", "gpu")
    res = {}
    for o in ORDERS:
        with order.program_order(o):
            res[o] = smoke.run_case(case, "triton", triton_device(), seed=3)
    base = res["grid"]
    for o in ORDERS[1:]:
        assert res[o].keys() == base.keys()
        for k in base:
            assert torch.equal(res[o][k], base[k]), f"{case.name}: {k} differs in {o} order"


def test_a_compiling_process_ignores_the_order():
    """The AOT check runs without TRITON_INTERPRET from an interpreter run that set an order
    (CI's shuffled stage): importing the kernels there must not fail; a bad value still does."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import pixcon_kernels.order as o; print(o.current())"
    p = subprocess.run([sys.executable, "-c", code], env=dict(env, PIXCON_INTERPRET_ORDER="reverse"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "grid", p.stderr
    p = subprocess.run([sys.executable, "-c", code], env=dict(env, PIXCON_INTERPRET_ORDER="sideways"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "PIXCON_INTERPRET_ORDER" in p.stderr
