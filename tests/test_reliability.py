"""Nothing silent (issue 30, first items): temperatures where the arithmetic leaves float32 are
errors on every loss, and an index that would read past a table is an error on every backend
whatever ``check_values`` says."""
import pytest
import torch

from pixcon import ops
from pixcon.ops import _common
from pixcon.reference import common as cm
from pixcon.synthetic import reco_batch

from .conftest import triton_device

BACKENDS = ["reference", "native", pytest.param("triton", marks=pytest.mark.interpret)]


def _calls(t):
    """Every public function with a temperature, called with temperature t."""
    from tools import smoke
    cpu = torch.device("cpu")
    r, cs, cx, cac = (smoke._reco_make(cpu, 0), smoke._cs_make(cpu, 0),
                      smoke._contextrast_make(cpu, 0), smoke._cac_make(cpu, 0))
    z = torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 1, 2, -1])
    return {
        "reco_loss": lambda: ops.reco_loss(r["emb"], r["labels"], r["probs"], temperature=t),
        "reco_loss relation": lambda: ops.reco_loss(r["emb"], r["labels"], r["probs"],
                                                    relation_temperature=t),
        "pixel_contrast_loss": lambda: ops.pixel_contrast_loss(cs["emb"], cs["labels"],
                                                               cs["pred"], temperature=t,
                                                               max_samples=40, max_views=6),
        "dense base": lambda: ops.dense_contrast_loss(cs["emb"], cs["labels"],
                                                      base_temperature=t),
        "pixel_anchor_loss": lambda: ops.pixel_anchor_loss(cx["embs"], cx["labels"],
                                                           cx["logits"], temperature=t,
                                                           layer_weights=(0.3, 1.0)),
        "directional_contrast_loss": lambda: ops.directional_contrast_loss(
            cac["f1"], cac["f2"], cac["l1"], cac["l2"], cac["bank"], cac["lab"], temperature=t),
        "supervised_contrast": lambda: ops.supervised_contrast(z, y, temperature=t),
        "sparse_infonce": lambda: ops.sparse_infonce(z, torch.tensor([0]), torch.tensor([1]),
                                                     torch.tensor([[2, 3]]), temperature=t),
    }


@pytest.mark.parametrize("t", [1e-38, 1e-39, 0.5e-4, float("inf"), float("nan"), 0.0])
def test_temperatures_outside_float32s_range_are_errors_everywhere(t):
    for name, call in _calls(t).items():
        with pytest.raises(ValueError, match="temperature must be"):
            call()


def test_the_smallest_temperature_is_finite():
    for name, call in _calls(_common.MIN_TEMPERATURE).items():
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all(), name


def _negatives_case(dev):
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 2]).to(dev)
    present = torch.ones(3, dtype=torch.bool, device=dev)
    cdf = cm.relation_cdf(torch.randn(3, 4).to(dev), present, 0.5)
    return lab, cdf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check_values", [True, False])
def test_a_row_class_past_the_table_is_an_error_on_every_backend(backend, check_values):
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    lab, cdf = _negatives_case(dev)
    good = torch.tensor([0, 2, -1], device=dev)
    ops.sample_negatives(good, cdf, lab, 4, 7, backend=backend, check_values=check_values)
    for bad in (3, 100, -2):
        row_class = torch.tensor([0, bad], device=dev)
        with pytest.raises((ValueError, RuntimeError), match="row_class"):
            ops.sample_negatives(row_class, cdf, lab, 4, 7, backend=backend,
                                 check_values=check_values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_indices_are_guarded_with_value_checks_off(backend):
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    emb, _, _ = reco_batch(1, 4, 3, 3, num_classes=2, present=2, seed=0)
    pool = emb.to(dev)
    q, p = torch.tensor([0, 4], device=dev), torch.tensor([1, 2], device=dev)
    for name, neg in (("neg_idx", torch.tensor([[3, 9], [5, 6]])),       # 9 rows: 9 is past
                      ("neg_idx", torch.tensor([[3, -2], [5, 6]]))):
        with pytest.raises(RuntimeError, match=name):
            ops.sparse_infonce(pool, q, p, neg.to(dev), temperature=0.5, backend=backend,
                               check_values=False)
    with pytest.raises(ValueError, match="q_idx must hold row indices"):
        ops.sparse_infonce(pool, torch.tensor([0, 9], device=dev), p,
                           torch.tensor([[3, 4], [5, 6]], device=dev), temperature=0.5,
                           backend=backend, check_values=True)


def test_the_reference_contrast_is_finite_where_the_loss_is():
    """The reference's per-positive terms come from the negatives' log-sum-exp: no row maximum
    dominated by the anchor itself underflows them to -inf (an un-normalised case whose loss is
    about 95.8, and unit rows at t = 0.005); equal to the compiled kernel's."""
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    for z, t in ((3 * torch.randn(8, 4, generator=g), 0.1),
                 (torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1), 0.005)):
        ref, n_ref = ops.supervised_contrast(z, y, temperature=t, backend="reference")
        nat, n_nat = ops.supervised_contrast(z, y, temperature=t, backend="native")
        assert torch.isfinite(ref).all() and torch.equal(n_ref, n_nat)
        assert torch.allclose(ref, nat, rtol=1e-5, atol=1e-4), (ref, nat)
    emb = 5 * torch.randn(2, 4, 6, 6, generator=g)
    labels = torch.randint(0, 3, (2, 6, 6), generator=g)
    ref = ops.dense_contrast_loss(emb, labels, backend="reference")
    nat = ops.dense_contrast_loss(emb, labels, backend="native")
    assert torch.isfinite(ref) and torch.allclose(ref, nat, rtol=1e-5)


def _empty_cases(dev):
    i64 = dict(dtype=torch.long, device=dev)
    cdf = cm.relation_cdf(torch.randn(3, 4).to(dev), torch.ones(3, dtype=torch.bool,
                                                                  device=dev), 0.5)
    return {
        "class_means rows": lambda be: ops.class_means(torch.zeros(0, 4, device=dev),
                                                       torch.zeros(0, **i64), 3, backend=be),
        "class_means map": lambda be: ops.class_means(torch.zeros(0, 4, 3, 3, device=dev),
                                                      torch.zeros(0, **i64), 3, backend=be),
        "sparse_infonce M=0": lambda be: ops.sparse_infonce(
            torch.randn(5, 4, device=dev), torch.zeros(0, **i64), torch.zeros(0, **i64),
            torch.zeros(0, 3, **i64), temperature=0.5, backend=be),
        "sparse_infonce N=0": lambda be: ops.sparse_infonce(
            torch.randn(5, 4, device=dev), torch.tensor([1], device=dev),
            torch.tensor([2], device=dev), torch.zeros(1, 0, **i64), temperature=0.5,
            backend=be),
        "sample_negatives": lambda be: ops.sample_negatives(
            torch.zeros(0, **i64), cdf, torch.zeros(0, **i64), 4, 1, backend=be),
        "sample_hard_queries": lambda be: ops.sample_hard_queries(
            torch.zeros(0, **i64), torch.zeros(0, dtype=torch.bool, device=dev), 3, 4, 1,
            backend=be),
        "distance_transform B=0": lambda be: ops.distance_transform(
            torch.zeros(0, 5, 5, **i64), backend=be),
        "distance_transform W=0": lambda be: ops.distance_transform(
            torch.zeros(2, 5, 0, **i64), backend=be),
        "supervised_contrast": lambda be: ops.supervised_contrast(
            torch.zeros(0, 4, device=dev), torch.zeros(0, **i64), temperature=0.5, backend=be),
        "philox": lambda be: ops.philox(torch.zeros(0, **i64), 1, 1, backend=be),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_give_empty_or_zero_answers_on_every_backend(backend):
    """No crash on empty inputs (issue 30 item 2): the Triton class sums launched on zero
    pixels read from an empty tensor (a segfault under the interpreter) and the reference
    sampler indexed an empty order. Documented: an empty input gives an empty result, class
    statistics of zeros, samples of -1."""
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    for name, call in _empty_cases(dev).items():
        out = call(backend)
        out = out if isinstance(out, tuple) else (out,)
        assert all(torch.isfinite(o.float()).all() for o in out), name
        if name.startswith("class_means"):
            assert not out[0].any() and not out[1].any(), name
        if name == "sample_hard_queries":
            assert bool((out[0] == -1).all()), name


def test_nan_scores_that_an_op_argmaxes_are_errors():
    """Logits with a NaN were argmaxed silently (issue 30 item 1): with the value checks on
    (CPU default) each op that takes an argmax names the argument."""
    from tools import smoke
    cpu = torch.device("cpu")
    cs, cx, cac = smoke._cs_make(cpu, 0), smoke._contextrast_make(cpu, 0), smoke._cac_make(cpu, 0)
    nan_logits = cx["logits"].clone()
    nan_logits[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="pixel_anchor_loss: pred contains NaN"):
        ops.pixel_anchor_loss(cx["embs"], cx["labels"], nan_logits, layer_weights=(0.3, 1.0))
    with pytest.raises(ValueError, match="bane_negatives: pred contains NaN"):
        ops.bane_negatives(cx["labels"], nan_logits, 5)
    B, _, h, w = cs["emb"].shape
    scores = torch.randn(B, 4, h, w)
    scores[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="pixel_contrast_loss: predict contains NaN or Inf"):
        ops.pixel_contrast_loss(cs["emb"], cs["labels"], scores)
    l1 = cac["l1"].clone()
    l1[3, 2] = float("nan")
    with pytest.raises(ValueError, match="directional_contrast_loss: logits1 contains NaN"):
        ops.directional_contrast_loss(cac["f1"], cac["f2"], l1, cac["l2"], cac["bank"],
                                      cac["lab"])
    # off (as on CUDA), it is the documented gap: no host read
    ops.pixel_anchor_loss(cx["embs"], cx["labels"], nan_logits, layer_weights=(0.3, 1.0),
                          check_values=False)


def test_overlap_boxes_outside_the_crop_are_errors():
    maps = torch.randn(2, 3, 4, 4)                       # a 32 x 32 crop at stride 8
    ok = torch.tensor([[0, 0, 16, 16], [8, 8, 32, 32]])
    a, b = ops.overlap_rows(maps, maps, ok, ok)
    assert a.shape == (4 + 9, 3) and b.shape == a.shape
    for bad in ([0, 0, 40, 16], [-8, 0, 8, 8], [8, 8, 8, 16], [0, 4, 16, 16]):
        boxes = torch.tensor([bad, [8, 8, 32, 32]])
        with pytest.raises(ValueError, match=r"overlap_rows: boxes1\[0\]"):
            ops.overlap_rows(maps, maps, boxes, ok)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["feat1", "feat2", "negatives"])
def test_a_nan_feature_or_bank_row_is_an_error_on_every_backend(backend, name):
    """One NaN bank row: a kernel that skips the row's logit (its label matches the anchor's)
    gave a finite loss and the reference NaN. With the value checks (CPU default) every backend
    names the argument; off, no host read happens (the documented gap, as on CUDA)."""
    from tools import smoke
    x = smoke._cac_make(torch.device("cpu"), 0)
    dev = triton_device() if backend == "triton" else torch.device("cpu")
    args = {k: x[k].to(dev) for k in ("f1", "f2", "l1", "l2", "bank", "lab")}
    key = {"feat1": "f1", "feat2": "f2", "negatives": "bank"}[name]
    args[key] = args[key].clone()
    args[key][0] = float("nan")
    call = (args["f1"], args["f2"], args["l1"], args["l2"], args["bank"], args["lab"])
    with pytest.raises(ValueError, match=f"directional_contrast_loss: {name} contains NaN"):
        ops.directional_contrast_loss(*call, backend=backend)
    ops.directional_contrast_loss(*call, backend=backend, check_values=False)


# --- bitwise-repeatable gradients (issue 30 item 4) -------------------------------------------
def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("case", __import__("tools.smoke", fromlist=["CASES"]).CASES,
                         ids=lambda c: c.name)
def test_every_op_repeats_bit_for_bit_at_one_and_two_threads(case):
    """Each op's values and gradients (the smoke cases: every public op, its backward
    included) on the compiled CPU kernels, run twice at each thread count: the same bits."""
    from tools import smoke
    for n in (1, 2):
        first, again = (_with_threads(n, lambda: smoke.run_case(case, "native", "cpu", 3))
                        for _ in range(2))
        assert not _same_bits(first, again), (n, _same_bits(first, again))


@pytest.mark.parametrize("key_grad", [False, True])
@pytest.mark.parametrize("layout", ["rows", "map"])
def test_infonce_gradient_with_repeated_queries_is_the_same_at_any_thread_count(key_grad,
                                                                                 layout):
    """Many queries on few rows (each row the query of about 200): their gradients are added in
    a fixed order, so 1 and 2 threads and repeats give the same bits (index_put_ with
    accumulate=True added them in thread order: up to 3e-8 apart)."""
    g = torch.Generator().manual_seed(11)
    pool = torch.randn(2, 32, 5, 4, generator=g) if layout == "map" else torch.randn(40, 32,
                                                                                      generator=g)
    M = 8000
    q = torch.randint(-1, 40, (M,), generator=g)
    p = torch.randint(0, 40, (M,), generator=g)
    neg = torch.randint(-1, 40, (M, 6), generator=g)

    def grad():
        e = pool.clone().requires_grad_()
        loss = ops.sparse_infonce(e, q, p, neg, temperature=0.2, key_grad=key_grad,
                                  backend="native")
        w = torch.linspace(0.5, 1.5, M)
        return torch.autograd.grad((loss * w).sum(), e)[0]

    runs = [_with_threads(n, grad) for n in (1, 2, 2, 1)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    e64 = pool.double().requires_grad_()
    loss = ops.sparse_infonce(e64, q, p, neg, temperature=0.2, key_grad=key_grad,
                              backend="reference")
    want, = torch.autograd.grad((loss * torch.linspace(0.5, 1.5, M, dtype=torch.float64)).sum(),
                                e64)
    torch.testing.assert_close(runs[0].double(), want, rtol=1e-4, atol=1e-4)   # float32 sums


def test_pools_past_int32_indices_are_errors_in_every_sampler():
    """The samplers return int32 pixel indices: a pool of 2^31 rows would wrap them (an index
    of 2^32 + 5 read as 5). Expanded views, so nothing of that size is allocated."""
    from pixcon.ops import primitives as prim
    huge = torch.zeros(1, dtype=torch.int64).expand(2**31)
    msg = "int32 indices need fewer than 2\\^31"
    with pytest.raises(ValueError, match="sample_hard_queries: lab has 2147483648 rows; " + msg):
        prim.sample_hard_queries(huge, torch.ones(1, dtype=torch.bool).expand(2**31), 3, 4, 0)
    cdf = torch.tensor([[0, 2**32], [0, 2**32]], dtype=torch.int64)
    with pytest.raises(ValueError, match="sample_negatives: lab has .* rows; " + msg):
        prim.sample_negatives(torch.zeros(4, dtype=torch.int64), cdf, huge, 5, 0)
    with pytest.raises(ValueError, match="sample_in_groups: order has .* rows; " + msg):
        prim.sample_in_groups(huge, torch.zeros(2, dtype=torch.int64),
                              torch.ones(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                              4, 0, 1)
    with pytest.raises(ValueError, match="supervised_contrast: keys has .* rows; " + msg):
        ops.supervised_contrast(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64),
                                torch.zeros(1, 3).expand(2**31, 3),
                                torch.zeros(1, dtype=torch.int64).expand(2**31),
                                temperature=0.1)
    with pytest.raises(ValueError, match="sparse_infonce: keys has .* rows; " + msg):
        ops.sparse_infonce(torch.randn(5, 3), torch.tensor([0]), torch.tensor([1]),
                           torch.tensor([[2]]), temperature=0.5,
                           keys=torch.zeros(1, 3).expand(2**31, 3))


# --- no tensor on the default device --------------------------------------------------------
def _bank_calls():
    """name -> a fresh call of a bank's update (then its readout), the bank built before the
    call (construction may use the default device, as any torch.nn.Module's buffers do)."""
    from pixcon.nn import NegativeBank, PixelMemoryBank, UnreliableBank
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(2, 6, 5, 7, generator=g)
    labels = torch.randint(0, 4, (2, 5, 7), generator=g)
    labels[0, 0] = 255
    rows = torch.randn(30, 6, generator=g)
    mask = torch.rand(4, 30, generator=g) < 0.4

    def pixel(official):
        torch.manual_seed(0)                     # its queues start as random unit rows
        bank = PixelMemoryBank(4, dim=6, memory_size=7, pixel_update_freq=3, official=official)
        return lambda: (bank.update(emb, labels, seed=1), bank.keys(), bank.state_dict())

    def unreliable():
        bank = UnreliableBank(4, 6, sizes=(5, 3, 8, 2))
        return lambda: (bank.push(rows, mask), bank.push(rows, ~mask), bank.state_dict())

    def negative():
        bank = NegativeBank(step_save=1, selected_num=9, cross_rank=False)
        return lambda: (bank.update(emb, emb + 1, labels, labels, seed=2), bank.negatives())

    return {"PixelMemoryBank": lambda: pixel(()),
            "PixelMemoryBank official": lambda: pixel(("class0", "positions")),
            "UnreliableBank": unreliable, "NegativeBank": negative}


def _flat(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat(x[k])]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat(v)]
    return []


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_no_op_makes_a_tensor_on_the_default_device(backend):
    """Every tensor an op or a bank makes follows its inputs' device: run under a default
    device of "meta", every public op (the smoke cases, forward and backward; U2PL's with its
    bank built outside, in both readings) and every bank update gives what it gives on CPU. A factory call that
    forgets ``device=`` makes a meta tensor there and fails; on a GPU it would be a CPU tensor
    mixed into CUDA work."""
    from pixcon.nn import UnreliableBank
    from tools import smoke
    cpu = torch.device("cpu")
    for case in smoke.CASES:
        if case.name.startswith("u2pl"):         # builds its bank inside: below
            continue
        x = case.make(cpu, 0)
        want = case.run(backend, x)
        with torch.device("meta"):
            got = case.run(backend, x)
        assert got.keys() == want.keys(), case.name
        for k in want:
            assert got[k].device == cpu and torch.equal(got[k], want[k]), (case.name, k)
    x = smoke._u2pl_make(cpu, 0)
    results = []
    for default in ("cpu", "meta"):
        bank = UnreliableBank(5, 8, size=12)
        with torch.device(default):
            results.append([ops.u2pl_loss(x["emb"], x["labels"], x["probs"], x["temb"], bank,
                                          num_labeled=2, reliable=x["rel"],
                                          unreliable=x["unrel"], num_queries=6, num_negatives=4,
                                          seed=s, official=s == 1, backend=backend)
                            for s in (0, 1)]
                           + [bank.keys.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    if backend == "native":                      # the banks have one path
        return
    for name, make in _bank_calls().items():
        want = _flat(make()())
        call = make()
        with torch.device("meta"):
            got = _flat(call())
        assert len(got) == len(want), name
        for a, b in zip(got, want):
            assert a.device == cpu and torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_references_compute_half_inputs_in_float32(dtype):
    """A reference given fp16 / bf16 tensors computes in float32 (the documented promotion):
    its loss equals, bit for bit, the reference on the same values as float32, and its
    gradients that one's rounded to the leaf's dtype (every smoke case with a float input)."""
    from tools import smoke
    cpu = torch.device("cpu")

    def cast(x, dt):
        if torch.is_tensor(x):
            return x.to(dt) if x.is_floating_point() else x
        if isinstance(x, list):
            return [cast(v, dt) for v in x]
        return x

    for case in smoke.CASES:
        x = case.make(cpu, 0)
        half = {k: cast(v, dtype) for k, v in x.items()}
        if half.keys() == {k for k, v in x.items() if not torch.is_tensor(v) or
                           not v.is_floating_point()}:
            continue
        if case.name.startswith("distance"):
            continue
        wide = {k: cast(v, torch.float32) for k, v in half.items()}
        a, b = case.run("reference", half), case.run("reference", wide)
        for k in b:
            if k == "bank":                     # the queue keeps the rows' own dtype
                continue
            want = b[k].to(a[k].dtype)           # a gradient comes in its leaf's dtype
            assert torch.equal(a[k], want), (case.name, k)


def test_empty_branches_make_no_tensor_on_the_default_device():
    """The early returns too (an empty side of the contrast, no kept class, empty maps) make
    their tensors on the inputs' device: under a default device of "meta" they give CPU
    results. So does the seed drawn for seed=None (torch's CPU generator, whatever the default
    device: on "cuda" it would have been a device tensor read back)."""
    cpu = torch.device("cpu")
    z = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    y = torch.tensor([0, 1, 0])
    emb = torch.randn(1, 4, 3, 3)
    labels = torch.randint(0, 2, (1, 3, 3))
    empty = torch.zeros(2, 0, 3, dtype=torch.long)
    with torch.device("meta"):
        terms, npos = ops.supervised_contrast(z, y, z[:0], y[:0], temperature=0.5,
                                              backend="reference")
        loss = ops.pixel_contrast_loss(emb, labels, labels, max_views=20, backend="reference")
        d = ops.distance_transform(empty, backend="reference")
    assert terms.device == npos.device == loss.device == d.device == cpu
    assert npos.tolist() == [0, 0, 0] and loss.item() == 0.0 and d.shape == (2, 0, 3)
