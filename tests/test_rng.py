"""The randomness contract: the same seed and counters give bit-identical Philox4x32-10 words in
the torch reference, in Triton kernels and in the compiled C++ op."""
import pytest
import torch

import pixcon
from pixcon.ops import philox
from pixcon.reference.rng import draw_seed, philox4x32, uniform_index

from .conftest import triton_device

SEEDS = [0, 1, 0xDEADBEEF, 12345678901234567, 2**63 - 1]


def test_known_answer_vector():
    # Random123 kat_vectors: philox4x32 10, counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8
    out = philox4x32(torch.tensor([0]), 0)[0].tolist()
    assert out == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_words_are_uniform_bits():
    r = philox4x32(torch.arange(1 << 16), 7, 3)
    assert r.min() >= 0 and r.max() < 2**32
    bits = torch.stack([(r >> b) & 1 for b in range(32)]).double().mean(dim=(1, 2))
    # each bit is Bernoulli(1/2) over 262144 draws: sd 0.001; 0.006 is 6 sd
    assert (bits - 0.5).abs().max() < 0.006


@pytest.mark.interpret
@pytest.mark.parametrize("seed", SEEDS)
def test_triton_matches_reference(seed):
    dev = triton_device()
    c = torch.randint(0, 2**32, (3000,), dtype=torch.int64)
    c[:3] = torch.tensor([0, 2**31, 2**32 - 1])
    for stream in (0, 1, 2**32 - 1):
        want = philox4x32(c, seed, stream)
        got = philox(c.to(dev), seed, stream, backend="triton").cpu()
        assert torch.equal(got, want)


@pytest.mark.skipif(not pixcon.HAS_C, reason="extension not built")
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_matches_reference(seed):
    c = torch.randint(0, 2**32, (5, 777), dtype=torch.int64)
    for stream in (0, 5):
        assert torch.equal(philox(c, seed, stream, backend="native"), philox4x32(c, seed, stream))


def test_extension_loaded_with_its_cpu_kernels():
    """The extension is built and registers the CPU kernels of the one-op primitives (the
    schemas are Python's, the CPU kernels C++)."""
    assert pixcon.HAS_C, "pixcon._C did not import: run pip install -e . --no-build-isolation"
    __import__("importlib").import_module("pixcon.ops")      # defines the schemas
    for op in ("pixcon::tiled_contrast", "pixcon::tiled_contrast_backward", "pixcon::scatter_rows",
               "pixcon::philox", "pixcon::edt", "pixcon::class_sums", "pixcon::sample_in_groups",
               "pixcon::sample_negatives", "pixcon::sparse_infonce",
               "pixcon::sparse_infonce_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def test_uniform_index_range_and_uniformity():
    r = philox4x32(torch.arange(70000), 3)[:, 0]
    for n in (1, 2, 7, 1000):
        idx = uniform_index(r, n)
        assert idx.min() >= 0 and idx.max() < n
    counts = torch.bincount(uniform_index(r, 7), minlength=7).double()
    expected = 70000 / 7
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert 0.381 < chi2 < 22.46  # chi-square, 6 dof: the 0.001 and 0.999 quantiles


def test_seed_contract():
    torch.manual_seed(5)
    a = draw_seed(None)
    torch.manual_seed(5)
    assert draw_seed(None) == a
    assert draw_seed(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^63\)"):
            draw_seed(bad)
    with pytest.raises(TypeError, match="seed must be an int"):
        draw_seed(1.5)
