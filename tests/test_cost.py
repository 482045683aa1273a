"""The cost model (tools/cost.py): its settings are the benchmarks', its arithmetic is
what the docstring says, and its orderings hold (floor <= estimate as written)."""
import pytest

from tools import cost

from .conftest import bench_module


def test_settings_are_the_benchmarks():
    B, D, h, w, C, presents, Q, N = bench_module("bench_reco").SIZES["voc"]
    assert cost.RECO_VOC == dict(B=B, D=D, h=h, w=w, C=C, K=max(presents), Q=Q, N=N)
    B, D, layers, C = bench_module("bench_contextrast").SIZES["hrnet"]
    assert cost.CONTEXTRAST_HRNET == dict(B=B, D=D, layers=tuple(map(tuple, layers)), C=C)
    B, D, h, w, C, M, _, R = bench_module("bench_contrastiveseg").SIZES["cityscapes"]
    assert cost.CONTRASTIVESEG_CS == dict(B=B, D=D, h=h, w=w, C=C, M=M, bank=C * 2 * R)
    n, N, D, _ = bench_module("bench_cac").SIZES["cityscapes"]
    assert cost.CAC_CS == dict(n=n, N=N, D=D)
    B, L, D, h, w, C, _, Q, N = bench_module("bench_u2pl").SIZES["voc"]
    assert cost.U2PL_VOC == dict(B=B, D=D, h=h, w=w, C=C, Q=Q, N=N,
                                 pushed=int(0.2 * (B - L) * h * w) * 17)


def test_reco_infonce_kernel_by_hand():
    """The InfoNCE kernel at VOC: every query's positive and 512 negatives gathered once as
    1 KiB rows; time = max(bytes / bandwidth, FLOPs / fp32 rate) + one launch."""
    op = cost.reco(**cost.RECO_VOC)
    k = next(k for k in op.kernels if k.name == "_reco_infonce_kernel")
    M = 21 * 256
    gathered = M * 513 * 256 * 4
    assert k.must == gathered + M * 256 * 4
    assert k.moved == gathered + M * 512 * 32 + M * 260 * 4
    h100 = cost.GPUS["H100"]
    assert k.time(h100) == pytest.approx(max(k.moved / 3.35e12, 6.0 * M * 513 * 256 / 67e12)
                                         + 3e-6)
    assert 0.8e-3 < k.time(h100) < 0.95e-3               # memory-bound: ~0.87 ms
    bf16 = cost.reco(**cost.RECO_VOC, elt=2)
    assert bf16.floor(h100) == pytest.approx(op.floor(h100) / 2, rel=0.01)


@pytest.mark.parametrize("gpu", ["H100", "A100"])
def test_orderings(gpu):
    g = cost.GPUS[gpu]
    for op in cost.ops():
        assert 0 < op.floor(g) <= op.estimate(g), op.name
        for k in op.kernels:
            assert k.must <= k.moved, (op.name, k.name)
            assert k.needed_flops() <= k.flops, (op.name, k.name)
    reco = cost.ops()[0]
    assert reco.estimate(g) < reco.official_estimate(g) / 4      # the gather dominates both
    assert cost.GPUS["A100"]["bw"] < cost.GPUS["H100"]["bw"]


def test_markdown_names_every_op_as_an_estimate():
    md = cost.markdown()
    assert "estimates" in md
    for name in ("reco_loss", "pixel_anchor_loss", "pixel_contrast_loss",
                 "directional_contrast_loss", "dense_contrast_loss", "distance_transform"):
        assert f"| {name} |" in md
    assert md.count("\n| ") > 40


def test_waves_charge_idle_sms():
    """A 16-program grid on a 132-SM H100 (one program per SM) keeps 16/132 of it busy and is
    charged 132/16 of the full grid's time; 133 programs take two waves, the second nearly
    empty (fill 133/264); programs per SM multiply the slots."""
    h100 = cost.GPUS["H100"]
    full = cost.Kernel("k", 0, 3.35e9, 0.0, programs=132)              # 1 ms of bytes
    small = cost.Kernel("k", 0, 3.35e9, 0.0, programs=16)
    two = cost.Kernel("k", 0, 3.35e9, 0.0, programs=133)
    free = cost.Kernel("k", 0, 3.35e9, 0.0)                           # grid not modelled
    assert full.fill(h100) == 1.0 and full.waves(h100) == 1
    assert full.time(h100) == pytest.approx(1e-3 + 3e-6)
    assert small.fill(h100) == pytest.approx(16 / 132)
    assert small.time(h100) == pytest.approx(1e-3 * 132 / 16 + 3e-6)
    assert two.waves(h100) == 2 and two.fill(h100) == pytest.approx(133 / 264)
    assert free.fill(h100) == 1.0 and free.time(h100) == full.time(h100)
    packed = cost.Kernel("k", 0, 3.35e9, 0.0, programs=264, per_sm=2)
    assert packed.waves(h100) == 1 and packed.fill(h100) == 1.0
    assert cost.Kernel("k", 0, 3.35e9, 0.0, programs=132, per_sm=2).fill(h100) == 0.5


def test_tiled_grids_fill_the_gpu_at_the_papers_settings():
    """The launcher's own plan (pixcon_kernels.tiled.launch_plan) at ContrastiveSeg's bank,
    CAC and dense: every tiled kernel keeps at least 80% of an H100 busy."""
    h100 = cost.GPUS["H100"]
    for op in cost.ops():
        for k in op.kernels:
            if k.name.startswith("_tiled"):
                assert k.programs >= 2 * 132 and k.fill(h100) >= 0.8, (op.setting, k.name)
