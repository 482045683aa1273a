"""GPU-only checks (marked ``gpu``; skipped without CUDA): what the interpreter cannot show --
compiled kernels at full size, bfloat16 on the device, TF32 independence, no host syncs -- and
the parity of every public op on CUDA tensors, at the small test shapes (tools.smoke) and at the
papers' settings. The module ``./dev gpu`` runs first (python -m tools.gpucheck)."""
import pytest
import torch

from tools import smoke
from pixcon.ops import class_means, reco_loss
from pixcon.reference import common as cm
from pixcon.synthetic import reco_batch

from .conftest import assert_close, bench_module

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("present", [10, 21])
def test_voc_size_parity(present):
    emb, labels, probs = reco_batch(20, 256, 81, 81, num_classes=21, present=present,
                                    device="cuda", seed=present)
    out = []
    for be in ("reference", "triton"):
        e = emb.clone().requires_grad_()
        loss = reco_loss(e, labels, probs, seed=11, backend=be)
        out.append((loss.detach(), torch.autograd.grad(loss, e)[0]))
    # fp32 everywhere (fused never uses TF32); D = 256 dot products in another order
    assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5, what="loss")
    assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-8, what="grad")


def test_fused_ignores_tf32_setting():
    emb, labels, probs = reco_batch(4, 64, 33, 33, num_classes=21, present=8, device="cuda")
    a = reco_loss(emb, labels, probs, seed=1, backend="triton")
    torch.backends.cuda.matmul.allow_tf32 = True
    b = reco_loss(emb, labels, probs, seed=1, backend="triton")
    assert a.item() == b.item()
    lab = cm.pixel_labels(labels, (33, 33), 21, 255)
    s, n, _ = class_means(emb, lab, 21, backend="triton")
    s_ref, n_ref, _ = class_means(emb, lab, 21, backend="reference")
    assert torch.equal(n, n_ref)
    assert_close(s, s_ref, rtol=1e-5, atol=1e-3, what="class sums (ieee, not tf32)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_device(dtype):
    emb, labels, probs = reco_batch(8, 128, 41, 41, num_classes=21, present=10, device="cuda",
                                    dtype=dtype, seed=3)
    res = {}
    for be in ("reference", "triton"):
        e = emb.clone().requires_grad_()
        loss = reco_loss(e, labels, probs, seed=5, backend=be)
        res[be] = loss.detach(), torch.autograd.grad(loss, e)[0]
    # both compute in fp32 from the same low-precision values; grads rounded once to dtype
    assert_close(res["triton"][0], res["reference"][0], rtol=1e-5, atol=1e-5, what="loss")
    gtol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(res["triton"][1], res["reference"][1], rtol=gtol, atol=1e-6, what="grad")


@pytest.mark.parametrize("resolution", ["feature", "image"])
def test_fused_no_host_sync(resolution):
    emb, labels, probs = reco_batch(4, 64, 33, 33, num_classes=21, present=8, device="cuda")
    mask = None
    if resolution == "image":      # 129 -> 33 is not a multiple: the nearest-index mapping
        labels = torch.nn.functional.interpolate(labels[:, None].float(), size=(129, 129),
                                                 mode="nearest")[:, 0].long()
        mask = torch.rand(4, 129, 129, device="cuda") > 0.2
    emb.requires_grad_()
    reco_loss(emb, labels, probs, mask=mask, seed=1, backend="triton").backward()  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = reco_loss(emb, labels, probs, mask=mask, seed=1, backend="triton",
                         check_values=False)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_edt_full_sizes_against_cpu():
    """Triton EDT on the GPU equals the C++ op (itself tested against SciPy) on the BANE
    pyramid and a 1024 x 2048 map."""
    import pixcon
    from pixcon.ops import distance_transform
    g = torch.Generator().manual_seed(0)
    for B, H, W in [(8, 128, 256), (8, 64, 128), (8, 32, 64), (8, 16, 32), (1, 1024, 2048)]:
        coarse = torch.randint(-1, 19, (B, 1, max(H // 8, 1), max(W // 8, 1)), generator=g)
        lab = torch.nn.functional.interpolate(coarse.float(), size=(H, W)).long()[:, 0]
        lab[torch.rand(B, H, W, generator=g) < 0.2] = -1
        want = distance_transform(lab, labels=True, background=-1, squared=True,
                                  backend="native" if pixcon.HAS_C else "reference")
        got = distance_transform(lab.cuda(), labels=True, background=-1, squared=True,
                                 backend="triton").cpu()
        assert torch.equal(got, want), (B, H, W)


def test_contextrast_hrnet_size_parity():
    from pixcon.ops import pixel_anchor_loss
    g = torch.Generator().manual_seed(0)
    B, C = 8, 19
    coarse = torch.randint(0, C, (B, 1, 8, 16), generator=g).float()
    labels = torch.nn.functional.interpolate(coarse, size=(512, 1024)).long()[:, 0]
    pred = torch.where(torch.rand(B, 512, 1024, generator=g) < 0.2,
                       torch.randint(0, C, (B, 512, 1024), generator=g), labels)
    embs = [torch.randn(B, 256, h, w, generator=g) for h, w in
            [(128, 256), (64, 128), (32, 64), (16, 32)]]
    out = []
    for be in ("reference", "triton"):
        es = [e.cuda().requires_grad_() for e in embs]
        loss = pixel_anchor_loss(es, labels.cuda(), pred.cuda(), num_classes=C, backend=be)
        out.append((loss.detach(), torch.autograd.grad(loss, es)))
    assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6, what="loss")
    for a, b in zip(out[1][1], out[0][1]):
        assert_close(a, b, rtol=1e-4, atol=1e-8, what="grad")


@pytest.mark.parametrize("loss", ["reco", "contextrast"])
def test_trainer_lockstep_parity_on_device(loss):
    """The trainer on the embedded scenes at their real size (64x64, batch 8 + 8, official 256
    queries x 512 negatives for ReCo): the fused loss trains, the reference is computed on the
    same inputs every step. fp32 on both sides, same samples: 1e-4 absolute on losses of ~5."""
    from pixcon.train.experiments import parity
    from pixcon.train.loop import Config
    cfg = Config(mode="semi", loss=loss, steps=20, eval_every=20, num_queries=256,
                 num_negatives=512, device="cuda", progress=False, train_length=64,
                 val_length=16)
    res = parity(cfg)
    assert res["lockstep_max_contrast_diff"] < 1e-4, res


# --- every public op (tools.smoke: the cases that launch every kernel) ------------------------
@pytest.mark.parametrize("case", smoke.CASES, ids=[c.name for c in smoke.CASES])
def test_every_op_matches_reference_and_repeats_bitwise(case):
    """Triton on CUDA tensors against the reference on the same CUDA tensors, at the case's
    float32 tolerance (tools.smoke says why); integer outputs equal. Run twice, the Triton
    outputs are the same bits."""
    assert smoke.parity(case, "cuda") == []


@pytest.mark.parametrize("bank", [False, True], ids=["in-batch", "bank 19x10000"])
def test_contrastiveseg_cityscapes_parity(bank):
    """The paper's setting (8x256x128x256, 1024 anchors x 100 views, 19 x 10,000 bank keys)."""
    from pixcon.ops import pixel_contrast_loss
    mod = bench_module("bench_contrastiveseg")
    _, _, _, _, _, M, V, _ = mod.SIZES["cityscapes"]
    emb, labels, pred, queue = mod.inputs("cityscapes", "cuda")
    C, R2, D = queue.shape
    memory = (queue.reshape(-1, D), torch.arange(C, device="cuda").repeat_interleave(R2)) \
        if bank else None
    out = []
    for be in ("reference", "triton"):
        e = emb.detach().clone().requires_grad_()
        loss = pixel_contrast_loss(e, labels, pred, max_samples=M, max_views=V, memory=memory,
                                   seed=3, backend=be)
        out.append((loss.detach(), torch.autograd.grad(loss, e)[0]))
    # fp32; sums over up to 190,000 keys at t = 0.1 in another order
    assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5, what="loss")
    assert_close(out[1][1], out[0][1], rtol=1e-4, atol=1e-7, what="grad")


def test_cac_cityscapes_parity():
    """CAC at its paper setting: 8,100 overlap pixels x 129,600 bank negatives, D = 128."""
    from pixcon.ops import directional_contrast_loss
    f1, f2, l1, l2, bank, labels = bench_module("bench_cac").inputs("cityscapes", "cuda")
    out = []
    for be in ("reference", "triton"):
        a, b = f1.detach().clone().requires_grad_(), f2.detach().clone().requires_grad_()
        loss = directional_contrast_loss(a, b, l1, l2, bank, labels, backend=be)
        out.append((loss.detach(), *torch.autograd.grad(loss, [a, b])))
    assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5, what="loss")
    for x, y in zip(out[1][1:], out[0][1:]):
        assert_close(x, y, rtol=1e-4, atol=1e-8, what="grad")
