"""Argument validation and backend choice shared by every public op."""
from __future__ import annotations

import importlib.util
import math
import os

import torch

BACKENDS = ("auto", "reference", "triton", "native", "cuda")
# "cuda" was the first name of the compiled extension's backend, which also runs on CPU tensors;
# accepted for one release as an alias of "native", with a DeprecationWarning.
DEPRECATED = {"cuda": "native"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> tuple[bool, str]:
    if not triton_available():
        return False, "triton is not installed (pip install 'triton>=3.6')"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (f"Triton kernels need CUDA tensors (got {device.type}); on CPU they run only "
                   "under the interpreter (TRITON_INTERPRET=1 set before triton is imported)")


def native_available() -> bool:
    import pixcon
    return pixcon.HAS_C


class ExtensionWarning(UserWarning):
    """pixcon's compiled CPU kernels are not built: CPU tensors run the reference path."""


_WARNED_NO_KERNELS = [False]


def _warn_no_kernels(op: str):
    """Once per process, where "auto" runs the reference because the kernels are missing."""
    if _WARNED_NO_KERNELS[0] or os.environ.get("PIXCON_EXTENSION", "").lower() == "off":
        return
    _WARNED_NO_KERNELS[0] = True
    import warnings
    warnings.warn(f"{op}: pixcon's compiled CPU kernels are not built (pip installed pixcon "
                  "without them, or this checkout was never built), so CPU tensors run the "
                  "reference path: slower, with more memory. Build them once against this "
                  "torch with `python -m pixcon.build` (needs a C++ compiler), or install with "
                  "`pip install --no-build-isolation .` (this warning shows once per process)",
                  ExtensionWarning, stacklevel=4)


def resolve_backend(backend: str | None, device: torch.device, op: str,
                    implemented=("reference", "triton")) -> str:
    """'auto' (or None) means $PIXCON_BACKEND if set, else the fused Triton kernels for CUDA
    tensors, the CPU kernels ("native", compiled in pixcon._C, which must be built) for CPU
    tensors where the op has them, and the reference otherwise. A forced backend that cannot run
    raises; it never falls back."""
    native_ok = native_available()
    if backend is None or backend == "auto":
        env = os.environ.get("PIXCON_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"PIXCON_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend in DEPRECATED:
        import warnings
        warnings.warn(f"{op}: backend {backend!r} is renamed {DEPRECATED[backend]!r} (the compiled "
                      "extension pixcon._C, which runs on CPU tensors too); the old name goes in "
                      "the next release", DeprecationWarning, stacklevel=3)
        backend = DEPRECATED[backend]
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and "native" in implemented:
            if native_ok:
                return "native"
            _warn_no_kernels(op)
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in implemented:
        raise NotImplementedError(
            f"{op}: backend {backend!r} is not implemented for this op; available: "
            f"{', '.join(implemented)}")
    if backend == "triton":
        ok, why = triton_usable(device)
        if not ok:
            raise RuntimeError(f"{op}: backend 'triton' cannot run: {why}")
    if backend == "native" and device.type != "cpu":
        raise RuntimeError(f"{op}: backend 'native' runs on CPU tensors; got {device.type} "
                           "tensors (use 'triton' or 'auto')")
    if backend == "native" and not native_ok:
        raise RuntimeError(f"{op}: backend 'native' needs pixcon's compiled CPU kernels, which "
                           "are not built: `python -m pixcon.build`, or install with "
                           "`pip install --no-build-isolation .`")
    return backend


class SelectedNothingWarning(UserWarning):
    """A loss is exactly zero because one of its settings selected nothing (no class with
    enough views, no pixel above a confidence threshold). Silence it with
    ``warnings.filterwarnings("ignore", category=pixcon.SelectedNothingWarning)``."""


_WARNED: set = set()


def warn_selected_nothing(op: str, setting: str, nothing, device, check_values, hint: str,
                          stacklevel: int = 3):
    """Warn once per process and (op, setting) that the loss is zero because ``setting``
    selected nothing. ``nothing``: a callable giving a 0-d bool tensor, evaluated only where
    value checks run (CPU tensors by default: no host sync on a GPU). stacklevel: the user's
    frame as warnings.warn counts from here (3: the caller of the function that calls this)."""
    if (op, setting) in _WARNED or not want_value_checks(None if check_values is None
                                                         else check_values, device):
        return
    if bool(nothing()):
        import warnings
        _WARNED.add((op, setting))
        warnings.warn(f"{op}: the loss is 0 because {setting} selected nothing: {hint} "
                      "(this warning shows once per process)", SelectedNothingWarning,
                      stacklevel=stacklevel)


def want_value_checks(check_values: bool | None, device: torch.device) -> bool:
    """Value checks (NaN, label range, probability range) read data back to the host, so they
    default to on for CPU tensors and off for CUDA tensors; PIXCON_CHECK_VALUES=1/0 overrides.

    Under torch.compile the default is off on every device: a check that reads data back is a
    graph break (and an error with fullgraph=True). Run the step once eagerly to have its inputs
    checked; an explicit check_values=True still asks for them (and breaks the graph)."""
    if check_values is not None:
        return bool(check_values)
    env = os.environ.get("PIXCON_CHECK_VALUES")
    if env is not None:
        return env.lower() in ("1", "true", "yes", "on")
    if torch.compiler.is_compiling():
        return False
    return device.type != "cuda"


# Every validation message starts with the op's name ("reco_loss: emb must have ..."): the
# checks below take it first.
def check_tensor(op: str, name: str, t, *, ndim=None, dtypes=None, device=None, kind: str = "",
                 like: str = "emb"):
    """t is a tensor with these dimensions and dtypes, on ``device`` (the device of the input
    named ``like``)."""
    if not torch.is_tensor(t):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{op}: {name} must have {ndim} dimensions {kind}, got shape "
                         f"{tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but {like} is on {device}: all tensors "
                         "must be on the same device")


def check_positive_int(op: str, name: str, v, upper: int | None = None):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
    if upper is not None and v > upper:
        raise ValueError(f"{op}: {name} must be at most {upper}, got {v}")


def check_positive_float(op: str, name: str, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or \
            not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be a positive number, and finite; got {v!r}")


# Logits are cos / t with |cos| <= 1: at t = 1e-4 they reach 1e4, whose exp overflows in any
# float type, but every log-sum-exp here subtracts its maximum first. Below, 1 / t and the
# gradients' 1 / t factors leave float32's range (t = 1e-38 gave inf, 1e-39 NaN).
MIN_TEMPERATURE = 1e-4


def check_temperature(op: str, name: str, v):
    """A temperature: positive, finite, at least MIN_TEMPERATURE (no paper uses below 0.01)."""
    check_positive_float(op, name, v)
    if v < MIN_TEMPERATURE:
        raise ValueError(f"{op}: {name} must be at least {MIN_TEMPERATURE:g} (below, the "
                         f"logits' 1/{name} factor leaves float32's range), got {v!r}")


PRECISIONS = ("fp32", "tf32", "bf16")   # the tiled contrast's products (pixcon_kernels.tiled)


def check_precision(op: str, precision):
    """The tiled contrast's opt-in precision: one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {PRECISIONS} ('fp32': fp32-level "
                         f"accuracy, the default), got {precision!r}")


def _check_binary_mask(op, mask, check_values):
    """A numeric mask must hold only 0 and 1: a confidence map passed as the mask would count
    every non-zero pixel as valid. Read back on CPU (value checks on), a device assert on CUDA."""
    binary = ((mask == 0) | (mask == 1)).all()
    if mask.device.type == "cuda":
        torch._assert_async(binary, f"{op}: mask must be bool or hold only 0/1")
    elif want_value_checks(check_values, mask.device) and not bool(binary):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(f"{op}: mask must be bool or hold only 0 and 1, found {bad}; for a "
                         f"confidence map write the threshold yourself, e.g. mask=conf >= 0.7")


def check_pixel_inputs(op: str, emb, labels, probs=None, mask=None, check_values=None):
    """Shapes, dtypes and devices of the common (emb, labels, probs, mask) arguments."""
    check_tensor(op, "emb", emb, ndim=4, dtypes=FLOAT_DTYPES, kind="(B, D, h, w)")
    dev = emb.device
    B, D, h, w = emb.shape
    if B == 0 or D == 0 or h == 0 or w == 0:
        raise ValueError(f"{op}: emb must be non-empty, got shape {tuple(emb.shape)}")
    check_tensor(op, "labels", labels, ndim=3, dtypes=INT_DTYPES, device=dev, kind="(B, H, W)")
    if labels.shape[0] != B:
        raise ValueError(f"{op}: labels has batch size {labels.shape[0]} but emb has {B}")
    if labels.shape[1] < h or labels.shape[2] < w:
        raise ValueError(f"{op}: labels spatial size {tuple(labels.shape[1:])} is smaller than "
                         f"emb's ({h}, {w}); give labels at image or feature resolution")
    if probs is not None:
        check_tensor(op, "probs", probs, ndim=4, dtypes=FLOAT_DTYPES, device=dev,
                     kind="(B, C, h, w)")
        if probs.shape[0] != B or probs.shape[2:] != emb.shape[2:]:
            raise ValueError(f"{op}: probs must have shape (B, C, h, w) = ({B}, C, {h}, {w}) to "
                             f"match emb, got {tuple(probs.shape)}")
        if probs.shape[1] < 1:
            raise ValueError(f"{op}: probs must have at least one class")
    if mask is not None:
        check_tensor(op, "mask", mask, device=dev)
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.dim() != 3 or mask.shape[0] != B:
            raise ValueError(f"{op}: mask must have shape (B, H, W) or (B, 1, H, W) with B = {B}, "
                             f"got {tuple(mask.shape)}")
        if tuple(mask.shape[1:]) not in (tuple(labels.shape[1:]), (h, w)):
            # downsampled on its own grid, a mask at a third size would mark other pixels
            raise ValueError(f"{op}: mask spatial size {tuple(mask.shape[1:])} must be the "
                             f"labels' {tuple(labels.shape[1:])} or emb's ({h}, {w})")
        if mask.dtype != torch.bool:
            if mask.dtype not in FLOAT_DTYPES + INT_DTYPES:
                raise TypeError(f"{op}: mask must be bool (or 0/1 numbers), got {mask.dtype}")
            _check_binary_mask(op, mask, check_values)
            mask = mask != 0
    return mask


def check_pixel_values(op: str, emb, labels, num_classes: int, ignore_index: int, probs=None,
                       name: str = "emb"):
    """Data checks (host sync): finite embeddings, labels in [0, C) or ignore_index, probs in
    [0, 1]. ``name``: how the message calls emb (e.g. "embs[2]")."""
    if not bool(torch.isfinite(emb).all()):
        raise ValueError(f"{op}: {name} contains NaN or Inf")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        v = int(labels[bad][0])
        raise ValueError(f"{op}: labels must be in [0, {num_classes}) or ignore_index="
                         f"{ignore_index}; found {v}")
    if probs is not None:
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise ValueError(f"{op}: probs must be probabilities in [0, 1] (softmax output), "
                             "found values outside or NaN")


INDEX_LIMIT = 2**31        # int32 pixel indices (the samplers' outputs, the kernels' gathers)


def check_index_space(op: str, name: str, n: int):
    """A pool of n rows (pixels) that int32 indices address: n < 2^31, or an error (the
    samplers would wrap the index, a gather would alias a small valid one)."""
    if n >= INDEX_LIMIT:
        raise ValueError(f"{op}: {name} has {n} rows; int32 indices need fewer than 2^31")


def guard_index_range(op: str, name: str, idx, upper: int, what: str, check_values=None):
    """Every entry of idx in [-1, upper), whatever ``check_values`` says, because a wrong index
    would read memory it must not: with value checks on (CPU default) the host check and its
    message; off, a device-side assert (no host sync on CUDA; on CPU it raises at once).
    Skipped under torch.compile, like the value checks."""
    if want_value_checks(check_values, idx.device):
        return check_index_range(op, name, idx, upper, what)
    if idx.numel() and not torch.compiler.is_compiling():
        torch._assert_async(((idx >= -1) & (idx < upper)).all(),
                            f"{op}: {name} holds an index outside [-1, {upper}) ({what})")


def check_finite(op: str, name: str, x, check_values=None):
    """Data check (host sync, with the value checks): features that enter a sum must be finite
    (a NaN bank row is skipped by one kernel and poisons another's sum)."""
    if want_value_checks(check_values, x.device) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{op}: {name} contains NaN or Inf")


def check_finite_scores(op: str, name: str, scores, check_values=None):
    """Data check (host sync, with the value checks): logits or probabilities that an op
    argmaxes must be finite; a NaN would pick an arbitrary class silently."""
    if scores.is_floating_point() and want_value_checks(check_values, scores.device) and \
            not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{op}: {name} contains NaN or Inf (its argmax would pick an arbitrary "
                         "class)")


def check_index_range(op: str, name: str, idx, upper: int, what: str):
    """Data check (host sync): every entry of idx in [-1, upper) (-1 = absent). An index out of
    range would make a GPU gather read other memory silently."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -1 or hi >= upper:
        bad = lo if lo < -1 else hi
        raise ValueError(f"{op}: {name} must hold row indices of {what} in [-1, {upper}) (-1 = "
                         f"absent); found {bad}")
