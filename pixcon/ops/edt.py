"""Exact Euclidean distance transform, batched, binary or multi-label (specs/edt.md)."""
from __future__ import annotations

import torch

from ..reference import edt as ref
from . import _common as chk
from . import _library as lib

NO_BACKGROUND = -(2**31)     # background=None: a value no label takes (and int32 can hold)
MAX_SIDE = 2**31 - 3         # the compiled kernel's int32 column distances (Triton: 32767)
MAX_SQUARED_SIDE = 2**26     # squared: H^2 + W^2 <= 2^53, exact in float64


def distance_transform(x: torch.Tensor, *, squared: bool = False, labels: bool = False,
                       background: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Exact Euclidean distance transform of every (H, W) map in x.

    Args:
        x: (H, W), (B, H, W) or (B, C, H, W) bool or integer tensor.
        squared: return squared distances, as float64: exact integers (sides up to 2^26, so
            that every squared distance is below 2^53; a larger map is an error).
        labels: False (binary): non-zero pixels are foreground and get the distance to the
            nearest zero pixel, as ``scipy.ndimage.distance_transform_edt``. True
            (multi-label): every pixel whose value is not ``background`` gets the distance to the
            nearest pixel with a *different* value (any other label is a boundary), which equals
            the binary transform of each label's own mask -- one call instead of C.
        background: None (default: every label is a class, 0 included, so that the result
            equals each label's own binary transform) or the value that counts as background
            in multi-label mode (its pixels get 0; BANE uses -1). None is the value -2^31
            internally, which no label may take.
        backend: "auto" (Triton for CUDA tensors; the compiled C++ op -- backend "native", i.e.
            pixcon._C -- for CPU tensors, or the reference if the extension is not built),
            "reference", "triton", "native" ("cuda": its deprecated old name).

    Returns float32 distances (float64 squared distances) of x's shape: 0 on background, +inf for a pixel whose map has no
    boundary for it at all (SciPy returns distances to a phantom pixel there). The image border
    is not a boundary. Not differentiable.
    """
    chk.check_tensor("distance_transform", "x", x, ndim=(2, 3, 4),
                     dtypes=chk.INT_DTYPES + (torch.bool,),
                     kind="(H, W), (B, H, W) or (B, C, H, W)")
    if background is None:
        background = NO_BACKGROUND
    if isinstance(background, bool) or not isinstance(background, int):
        raise TypeError(f"distance_transform: background must be an int or None, got "
                        f"{background!r}")
    H, W = x.shape[-2:]
    if max(H, W) > MAX_SIDE:
        raise ValueError(f"distance_transform: maps up to {MAX_SIDE} pixels a side (int32 "
                         f"column distances), got {H} x {W}")
    if squared and max(H, W) > MAX_SQUARED_SIDE:
        raise ValueError(f"distance_transform: squared distances are float64, exact below "
                         f"2^53: sides up to 2^26 with squared=True, got {H} x {W}")
    if labels:
        lab = x
        bg = background
    else:      # a bool mask is read as its bytes (0 / 1); converting it took 50 ms at 8 x 1024
        lab = x.view(torch.uint8) if x.dtype == torch.bool else (x != 0).to(torch.uint8)
        bg = 0     # x 2048 (as long as the transform), other dtypes are compared with 0
    be = chk.resolve_backend(backend, x.device, "distance_transform",
                             ("reference", "triton", "native"))
    if be == "reference":
        return ref.distance_transform(lab, bg, squared)
    with lib.kernels(be, x.device):
        return edt_exact(lab, bg) if squared else edt(lab, bg, False)


def edt(lab, background: int, squared: bool) -> torch.Tensor:
    """The op pixcon::edt on the device's kernels (the fused form, inside a loss's kernels()
    scope): multi-label, ``background`` pixels 0; labels read in their own dtype. float32:
    squared distances are exact below 2^24 (sides up to 2896), which the losses' feature maps
    are; :func:`edt_exact` for any map."""
    _check_background(lab, background)
    return lib.edt(lab, background, squared)


def edt_exact(lab, background: int) -> torch.Tensor:
    """The op pixcon::edt_exact: float64 squared distances, exact integers."""
    _check_background(lab, background)
    return lib.edt_exact(lab, background)


def _check_background(lab, background):
    if lib.triton_here(lab.device) and not -(2**31) <= background < 2**31:
        raise ValueError("distance_transform: background must fit in int32 on triton")


def distance_transforms(maps, *, squared: bool = False, background: int,
                        backend: str = "auto") -> list[torch.Tensor]:
    """Multi-label distance transforms of several (B, H, W) maps of different sizes (a
    pyramid), as :func:`distance_transform` with ``labels=True``; on Triton all of them in one
    launch per pass (the maps packed one after another, read in their own dtype). The fused
    form of the losses: float32 also when squared (exact below 2^24: feature maps up to 2896 a
    side); the reference returns float64 squared distances."""
    if not maps:
        return []
    be = chk.resolve_backend(backend, maps[0].device, "distance_transform",
                             ("reference", "triton", "native"))
    if be == "reference":
        return [ref.distance_transform(m, background, squared) for m in maps]
    with lib.kernels(be, maps[0].device):
        return edt_pyramid(maps, background, squared)


def edt_pyramid(maps, background: int, squared: bool) -> list[torch.Tensor]:
    """:func:`distance_transforms`' fused form: where the Triton kernels run, every map in one
    launch per pass (pixcon::edt_ragged), else one pixcon::edt per map."""
    if not maps:
        return []
    if not lib.triton_here(maps[0].device):
        return [edt(m, background, squared) for m in maps]
    dt = maps[0].dtype
    flat = torch.cat([m.reshape(-1).to(dt) for m in maps])
    shapes = [d for m in maps for d in (m.numel() // max(m.shape[-2] * m.shape[-1], 1),
                                        *m.shape[-2:])]
    out = lib.edt_ragged(flat, shapes, background, squared)
    parts = torch.split(out, [m.numel() for m in maps])
    return [o.view(m.shape) for o, m in zip(parts, maps)]
