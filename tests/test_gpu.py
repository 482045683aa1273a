"""GPU-only checks (marked ``gpu``; skipped without CUDA): what the interpreter cannot show --
compiled kernels at full size, bfloat16 on the device, TF32 independence, no host syncs."""
import pytest
import torch

from pixcon.ops import class_means, reco_loss
from pixcon.reference import common as cm
from pixcon.synthetic import reco_batch

from .conftest import assert_close

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


def test_fused_no_host_sync():
    emb, labels, probs = reco_batch(4, 64, 33, 33, num_classes=21, present=8, device="cuda")
    emb.requires_grad_()
    reco_loss(emb, labels, probs, seed=1, backend="triton").backward()   # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = reco_loss(emb, labels, probs, seed=1, backend="triton", check_values=False)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
