"""Exact distance transform against SciPy: C++ (backend "native" on CPU tensors), Triton (the
interpreter on CPU) and the torch reference, on the spec's generators (specs/edt.md §5).
Squared distances must be equal exactly; the no-boundary case is +inf by convention."""
import numpy as np
import pytest
import torch
from scipy import ndimage

import pixcon
from pixcon.ops import distance_transform

from .conftest import triton_device

BACKENDS = [
    pytest.param("native", marks=pytest.mark.skipif(not pixcon.HAS_C, reason="not built")),
    pytest.param("triton", marks=pytest.mark.interpret),
    "reference",
]


def scipy_sq(mask: np.ndarray) -> np.ndarray:
    """SciPy's squared EDT of a binary mask, with our convention (+inf) when it has no zero."""
    if mask.all():
        return np.full(mask.shape, np.inf)
    return np.rint(ndimage.distance_transform_edt(mask) ** 2)


def run(x, backend, **kw):
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    return distance_transform(x.to(dev), backend=backend, **kw).cpu()


def masks(rng, H, W):
    """The spec's binary generators at one shape."""
    out = {f"speckle{p}": rng.random((H, W)) < p for p in (0.01, 0.1, 0.5, 0.9, 0.99)}
    coarse = rng.random((-(-H // 4), -(-W // 4))) < 0.5
    out["blobs"] = np.kron(coarse, np.ones((4, 4), bool))[:H, :W]
    one = np.ones((H, W), bool)
    one[H // 2, W // 2] = False
    out["single_background_pixel"] = one
    out["single_pixel"] = ~one
    row = np.zeros((H, W), bool)
    row[H // 2] = True
    out["row"] = row
    col = np.zeros((H, W), bool)
    col[:, W // 2] = True
    out["column"] = col
    out["diagonal"] = np.eye(H, W, dtype=bool) | np.eye(H, W, k=2, dtype=bool)
    out["checker"] = (np.add.outer(np.arange(H), np.arange(W)) % 2).astype(bool)
    out["border"] = np.pad(np.zeros((max(H - 2, 0), max(W - 2, 0)), bool), 1,
                           constant_values=True)[:H, :W]
    out["all_background"] = np.zeros((H, W), bool)
    out["all_foreground"] = np.ones((H, W), bool)
    return out


SHAPES = [(1, 17), (13, 1), (7, 9), (16, 32), (31, 45)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_binary_equals_scipy(backend, shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    ms = masks(rng, *shape)
    x = torch.from_numpy(np.stack(list(ms.values())))                 # a batch of all generators
    got = run(x, backend, squared=True).numpy()
    for i, (name, m) in enumerate(ms.items()):
        want = scipy_sq(m)
        assert np.array_equal(got[i], want), f"{name} {shape}"
    plain = run(x, backend).numpy()
    np.testing.assert_allclose(plain, np.sqrt(got), rtol=1e-6)


PYRAMID = [(16, 32), (32, 64), (64, 128), (128, 256)]


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_hrnet_pyramid_sizes(backend):
    rng = np.random.default_rng(0)
    for H, W in PYRAMID + ([(256, 512)] if backend == "native" else []):
        m = np.stack([rng.random((H, W)) < 0.7,
                      np.kron(rng.random((H // 8, W // 8)) < 0.5, np.ones((8, 8), bool))])
        got = run(torch.from_numpy(m), backend, squared=True).numpy()
        for b in range(2):
            assert np.array_equal(got[b], scipy_sq(m[b])), (H, W, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multilabel_default_has_no_background(backend):
    """labels=True without a background: label 0 is a class like any other (a VOC map's class 0
    gets its own binary transform, not zeros); background=0 opts into the old reading."""
    lab = np.zeros((9, 12), np.int64)
    lab[:, 7:] = 3
    lab[4, 2] = 1
    got = run(torch.from_numpy(lab), backend, squared=True, labels=True).numpy()
    for c in (0, 1, 3):
        m = lab == c
        assert np.array_equal(got[m], scipy_sq(m)[m]), c
    assert got[lab == 0].max() > 0
    old = run(torch.from_numpy(lab), backend, squared=True, labels=True, background=0).numpy()
    assert (old[lab == 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_labels", [2, 5, 19])
def test_multilabel_equals_per_label_binary(backend, num_labels):
    """One multi-label call (background -1) equals each label's binary transform on its pixels."""
    rng = np.random.default_rng(num_labels)
    H, W = (23, 37) if backend != "reference" else (11, 13)
    coarse = rng.integers(-1, num_labels, (2, H // 3 + 1, W // 3 + 1))
    lab = np.kron(coarse, np.ones((1, 3, 3), np.int64))[:, :H, :W]
    lab[:, ::5, ::7] = rng.integers(-1, num_labels, lab[:, ::5, ::7].shape)   # speckle too
    got = run(torch.from_numpy(lab), backend, squared=True, labels=True, background=-1).numpy()
    assert (got[lab == -1] == 0).all()
    for b in range(2):
        for c in range(num_labels):
            m = lab[b] == c
            if m.any():
                assert np.array_equal(got[b][m], scipy_sq(m)[m]), (b, c)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_tall_maps_cross_column_chunks(backend):
    # H = 300 > the column kernel's chunk: runs crossing chunk borders
    rng = np.random.default_rng(3)
    m = np.zeros((300, 5), bool)
    m[10:290, :3] = True
    m[rng.random((300, 5)) < 0.01] = False
    got = run(torch.from_numpy(m[None]), backend, squared=True).numpy()[0]
    assert np.array_equal(got, scipy_sq(m))


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_tall_maps_of_every_generator(backend):
    """H = 300: in the GPU configuration three column segments of 128 rows, each looking past
    its ends for the nearest change (a whole column without one: all foreground, a single
    column or row, the border); every generator of the spec at that shape, against SciPy."""
    seed = int(np.random.SeedSequence().entropy % 2**32)     # fresh each run, named on failure
    ms = masks(np.random.default_rng(seed), 300, 5)
    got = run(torch.from_numpy(np.stack(list(ms.values()))), backend, squared=True).numpy()
    for i, (name, m) in enumerate(ms.items()):
        assert np.array_equal(got[i], scipy_sq(m)), f"{name}, seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_wide_rows_cross_row_programs(backend):
    """W = 300 > the row pass's program width (256 pixels in the interpreter, 32 in the GPU
    configuration): a pixel's outward search reads past its program's pixels, both ways, up to
    the row's ends (sparse zeros, a run of foreground touching the left edge, and a
    multi-label row whose nearest other label is 170 pixels away)."""
    seed = int(np.random.SeedSequence().entropy % 2**32)     # fresh each run, named on failure
    rng = np.random.default_rng(seed)
    m = rng.random((3, 300)) > 0.05
    m[1, :270] = True
    m[1, 270] = False
    got = run(torch.from_numpy(m[None]), backend, squared=True).numpy()[0]
    assert np.array_equal(got, scipy_sq(m)), f"seed {seed}"
    lab = torch.zeros(1, 2, 300, dtype=torch.int64)
    lab[0, :, 170:] = 1
    d2 = run(lab, backend, squared=True, labels=True)[0, 0]
    want = torch.cat([torch.arange(170, 0, -1), torch.arange(1, 131)]).double() ** 2
    assert torch.equal(d2, want)


def test_four_dim_batch_and_dtypes():
    x = torch.rand(2, 3, 9, 10) < 0.6
    a = distance_transform(x)
    for t in (torch.uint8, torch.int32, torch.int64):
        assert torch.equal(distance_transform(x.to(t)), a)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert distance_transform(x, squared=True).dtype == torch.float64
    b = distance_transform(x, backend="reference")
    assert torch.equal(a, b)


def test_bad_input():
    with pytest.raises(TypeError, match="x must have dtype"):
        distance_transform(torch.rand(4, 4))
    with pytest.raises(ValueError, match="x must have"):
        distance_transform(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="background must be an int or None"):
        distance_transform(torch.zeros(4, 4, dtype=torch.long), labels=True, background=0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        distance_transform(torch.zeros(4, 4, dtype=torch.long), backend="scipy")


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_opcheck(backend):
    """Schema, fake kernel (torch.compile) and dispatch of the registered EDT ops."""
    x = (torch.rand(2, 9, 11) < 0.5).to(torch.int32).to(
        triton_device() if backend == "triton" else "cpu")
    from pixcon.ops import _library
    with _library.kernels(backend, x.device):      # one op; the backend picks its kernel
        for args in ((x, 0, True), (x, -(2**31), False)):
            torch.library.opcheck(torch.ops.pixcon.edt.default, args)
        torch.library.opcheck(torch.ops.pixcon.edt_exact.default, (x, -1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_pyramid_in_one_call_equals_each_map(backend, dtype):
    """distance_transforms: multi-label maps of four sizes (a BANE pyramid: error classes, -1
    background) in one call (Triton: one launch per pass over the packed maps, read in their
    own dtype) equal each map's own transform and SciPy's per-label binary transform."""
    from pixcon.ops.edt import distance_transforms
    g = torch.Generator().manual_seed(5)
    bg = -1 if dtype != torch.uint8 else 255
    maps = []
    for H, W in ((24, 40), (12, 20), (6, 10), (3, 5)):
        coarse = torch.randint(0, 4, (2, 1, -(-H // 3), -(-W // 3)), generator=g).float()
        m = torch.nn.functional.interpolate(coarse, scale_factor=3)[:, 0, :H, :W].long()
        m = torch.where(torch.rand(2, H, W, generator=g) < 0.3, bg, m)
        maps.append(m.to(dtype))
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    got = distance_transforms([m.to(dev) for m in maps], background=bg, squared=True,
                              backend=backend)
    for m, d in zip(maps, got):
        assert d.shape == m.shape and d.dtype == (torch.float64 if backend == "reference"
                                                   else torch.float32)   # the losses' form
        each = run(m, backend, labels=True, background=bg, squared=True)
        assert torch.equal(d.cpu().double(), each)
        for b in range(2):
            for c in range(4):
                own = (m[b] == c).numpy()
                if own.any():
                    want = scipy_sq(own)
                    assert np.array_equal(d[b].cpu().numpy()[own], want[own]), (m.shape, b, c)
    if backend == "triton":
        from pixcon.ops import _library
        flat = torch.cat([m.reshape(-1) for m in maps]).to(dev)
        shapes = [d for m in maps for d in (2, *m.shape[-2:])]
        with _library.kernels("triton", dev):
            torch.library.opcheck(_library.edt_ragged, (flat, shapes, bg, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tall", [True, False])
def test_squared_distances_are_exact_above_float32s_integers(backend, tall):
    """Squared distances are float64, exact where float32 is not: on a 4100 x 2 map (or 2 x 4100)
    with one zero pixel, 4099^2 = 16801801 is odd and above 2^24 (float32 rounds it to
    16801800); distances stay float32. Triton takes the tall map only (on the wide one the row pass
    walks 4,099 steps outward from the far end: minutes in the interpreter)."""
    if backend == "triton" and not tall:
        pytest.skip("the interpreter runs the row pass's 4,099 outward steps one at a time")
    x = torch.ones(2, 4100, dtype=torch.bool)
    x[0, 0] = False
    want = (torch.arange(4100, dtype=torch.float64)[None] ** 2
            + torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    if tall:
        x, want = x.T.contiguous(), want.T.contiguous()
    got = run(x, backend, squared=True)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert got.max().item() == 16801802 and float(torch.tensor(16801801.0)) != 16801801
    d = run(x, backend)
    assert d.dtype == torch.float32 and torch.equal(d, want.sqrt().float())


def test_maps_past_the_exact_range_are_errors_before_any_work():
    """Sides beyond what the kernels' int32 column distances (or float64's exact integers for
    squared distances) cover are clear errors; expanded views, so nothing is allocated."""
    wide = torch.ones(1, 1, dtype=torch.bool).expand(1, 2**26 + 1)
    with pytest.raises(ValueError, match="squared distances are float64.*2\\^26"):
        distance_transform(wide, squared=True)
    tall = torch.ones(1, 1, dtype=torch.bool).expand(2**31 - 2, 1)
    for squared in (False, True):
        with pytest.raises(ValueError, match="int32 column distances"):
            distance_transform(tall, squared=squared)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_mode_reads_any_non_zero_value_as_foreground(backend):
    """An integer map with several non-zero values (a label map passed without labels=True) is
    binary: every non-zero pixel is foreground, distances to the nearest zero, as SciPy's; a
    boundary between two non-zero values is no boundary (issue 33: how inputs are read)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 6, (2, 13, 11), generator=g)
    x[x == 0] = torch.randint(1, 6, (int((x == 0).sum()),), generator=g)   # few zeros
    x[:, 6, 5] = 0
    got = run(x, backend, squared=True)
    assert torch.equal(got, run((x != 0).to(torch.uint8), backend, squared=True))
    for b in range(2):
        assert np.array_equal(got[b].numpy(), scipy_sq(x[b].numpy() != 0))
    assert not torch.equal(got, run(x, backend, squared=True, labels=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pixel_and_empty_maps(backend):
    """Maps of one pixel (a foreground pixel with no boundary anywhere is +inf, background 0;
    multi-label: the only label has no other value, +inf) and maps with a zero side or no map
    at all give results of their own shape."""
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    x = torch.tensor([[[1]], [[0]], [[3]]], device=dev)
    for squared in (False, True):
        d = distance_transform(x, squared=squared, backend=backend).cpu()
        assert d.shape == (3, 1, 1) and d.flatten().tolist() == [float("inf"), 0.0,
                                                                 float("inf")]
        d = distance_transform(x, labels=True, squared=squared, backend=backend).cpu()
        assert d.flatten().tolist() == [float("inf")] * 3
    for shape in ((2, 0, 3), (2, 3, 0), (0, 3, 3)):
        d = distance_transform(torch.zeros(shape, dtype=torch.long, device=dev), backend=backend)
        assert d.shape == shape and d.dtype == torch.float32
        d = distance_transform(torch.zeros(shape, dtype=torch.long, device=dev), squared=True,
                               backend=backend)
        assert d.shape == shape and d.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_dtypes_give_the_same_transform(backend):
    """Multi-label maps in uint8, int8, int32 and int64 give the same distances (a background
    of None, -2^31 internally, is no uint8 value: a comparison in the map's own dtype would
    wrap it onto a label)."""
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (2, 9, 11), generator=g)
    want = distance_transform(x.to(dev), labels=True, backend=backend).cpu()
    for dt in (torch.uint8, torch.int8, torch.int32):
        got = distance_transform(x.to(dt).to(dev), labels=True, backend=backend).cpu()
        assert torch.equal(got, want), dt


@pytest.mark.skipif(not pixcon.HAS_C, reason="not built")
@pytest.mark.skipif(not pixcon.HAS_C, reason="the compiled CPU kernels are not built")
@pytest.mark.parametrize("W", [16383, 16385])
def test_native_envelope_scratch_widths_equal_scipy(W):
    """The row pass keeps its envelope in 32-bit scratch below 2^14 per side and in 64-bit (128-bit
    products) from there: maps on both sides of the switch, with long runs (the envelope) and
    short ones (all sites), give SciPy's squared distances exactly, as float64 and float32."""
    g = torch.Generator().manual_seed(W)
    m = torch.rand(3, W, generator=g) > 0.002                          # runs of hundreds
    m[1, 200:260:3] = False                                             # and runs of 2
    m[2] = True                                                         # a row without a zero
    m[2, -1] = False
    want = scipy_sq(m.numpy())
    got = torch.ops.pixcon.edt_exact(m, 0)
    assert np.array_equal(got.numpy(), want)
    got32 = torch.ops.pixcon.edt(m, 0, True)
    assert got32.dtype == torch.float32 and np.array_equal(got32.numpy(), want.astype(np.float32))


def test_native_byte_maps_and_wide_backgrounds():
    """The compiled kernel reads bool and uint8 maps as bytes (background 0..255), other labels
    as int32 where labels and background fit, else int64: every route gives the int64 route's
    distances, on region maps (long runs: the envelope) and speckle (short runs: all sites),
    including a background outside int32, which no int32 label equals (no truncation)."""
    g = torch.Generator().manual_seed(11)
    coarse = torch.randint(0, 2, (3, 1, 6, 9), generator=g).float()
    regions = torch.nn.functional.interpolate(coarse, scale_factor=(9, 13))[:, 0].long()
    speckle = (torch.rand(3, 54, 117, generator=g) < 0.3).long()
    for m in (regions, speckle, regions ^ speckle):
        want = torch.ops.pixcon.edt(m, 0, True)                       # int64 labels
        for dt in (torch.bool, torch.uint8, torch.int32):
            assert torch.equal(torch.ops.pixcon.edt(m.to(dt), 0, True), want), dt
        assert torch.equal(torch.ops.pixcon.edt(m.to(torch.uint8), 1, False),
                           torch.ops.pixcon.edt(m, 1, False))           # background 1
        wide = 2**40                                                   # no pixel is background
        got = torch.ops.pixcon.edt(m.to(torch.int32), wide, True)
        assert torch.equal(got, torch.ops.pixcon.edt(m, wide, True))
        assert torch.equal(got, torch.ops.pixcon.edt(m, -(2**31), True))  # as "None"
        assert torch.equal(got.double(), run(m, "reference", labels=True, squared=True))
