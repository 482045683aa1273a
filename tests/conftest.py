import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Every Triton launch the tests make is recorded (kernel, argument dtypes/alignment, scalars,
# constexprs, options) so that test_kernels_compile.py, which runs last, compiles exactly these
# specializations for sm_80 and sm_90. PIXCON_RECORD_LAUNCHES=FILE also writes them to FILE.
LAUNCHES = None
if INTERPRET:
    try:
        from tools.aot import Recorder
        LAUNCHES = Recorder()
        _recording = LAUNCHES.active()
        _recording.__enter__()
    except ImportError:          # triton not installed: the Triton tests skip themselves
        LAUNCHES = None

LAST = ("test_kernels_compile.py",)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    # the compile check runs after every test that launches kernels
    items.sort(key=lambda it: it.fspath.basename in LAST)


def pytest_runtest_setup(item):
    if LAUNCHES is not None:
        LAUNCHES.setting = item.nodeid.split("::", 1)[-1]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PIXCON_RECORD_LAUNCHES")
    if path and LAUNCHES is not None:
        import json
        with open(path, "w") as f:
            json.dump(LAUNCHES.launches, f)


@pytest.fixture(autouse=True)
def _restore_rng():
    """Each test starts from a fixed torch/numpy/python seed and leaves the global state as it
    found it."""
    state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


def triton_device():
    """Device the Triton kernels are tested on: CUDA when present, else CPU under the
    interpreter (root conftest sets TRITON_INTERPRET=1 before triton is imported)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def triton_kernels():
    """The test calls pixcon's ops directly and means their Triton kernels: on a CPU machine
    the ops' CPU key serves them (pixcon.ops._library.triton_on_cpu) for the test's duration."""
    from pixcon.ops import _library
    with _library.kernels("triton", triton_device()):
        yield


def assert_close(actual, expected, *, rtol, atol, what=""):
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((err <= bound).all()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: {int((err > bound).sum())} of {err.numel()} elements differ; worst at flat "
            f"index {i}: {actual.flatten()[i].item()} vs {expected.flatten()[i].item()} "
            f"(rtol={rtol}, atol={atol})")


def forbid_host_syncs(monkeypatch):
    """Make every host round trip raise inside the code that follows: reading a tensor's value
    (.item(), .tolist(), bool/int/float(), .cpu(), .numpy()) and building a tensor from Python
    data (torch.tensor / torch.as_tensor, which on a GPU is a host-to-device copy and a stream
    sync). Undo with monkeypatch.undo()."""
    def boom(*a, **k):
        raise AssertionError("host sync in the fused path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    monkeypatch.setattr(torch, "tensor", boom)
    monkeypatch.setattr(torch, "as_tensor", boom)


def bench_module(name="bench_reco"):
    """A module of benchmarks/ (not a package: loaded from its file)."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(root, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
