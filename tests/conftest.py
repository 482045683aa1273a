import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


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
