"""pixcon on torch.distributed: the few collectives the losses and banks use, all no-ops (the
single-process behaviour, bit for bit) when no process group is initialised or it has one rank.

    gather_rows(x)          all ranks' rows concatenated in rank order (all_gather_single);
                            differentiable: the backward all-reduces the gradient and keeps this
                            rank's rows, so every rank's loss reaches every rank's rows
    all_reduce_sum(x)       the sum over ranks (all_reduce); differentiable the same way
    agree(op, error, ...)   one all_reduce(MAX) before a collective whose inputs may be bad on one
                            rank: an error on any rank raises on every rank instead of leaving the
                            others waiting in the gather; also agrees on a seed and on shapes
    validated(op, check)    an op's checks run and, with cross-rank collectives ahead, agreed on

Every collective waits at most ``get_timeout()`` seconds (default 600, env
PIXCON_COLLECTIVE_TIMEOUT, or :func:`set_timeout`); past it :class:`CollectiveTimeout` names the
op and the collective (another rank did not reach it: it raised, hung or runs another step).
On gloo that is the collective's own wait; NCCL waits on the device, without the host, so there
the process group's timeout applies (:func:`init_from_env` sets it to the same value; pass
``timeout=`` to your own ``init_process_group``).

Under DDP every rank's gradient is averaged, so a loss that is the same global value on every
rank (sums and counts all-reduced through these functions) gives exactly the gradient of that
loss over the concatenated batch.

Collectives only from torch.distributed; gloo (CPU tensors) and NCCL (CUDA tensors) both work.
"""
from __future__ import annotations

import datetime
import os

import torch

DEFAULT_TIMEOUT = 600.0
_timeout = [float(os.environ.get("PIXCON_COLLECTIVE_TIMEOUT", DEFAULT_TIMEOUT))]


def set_timeout(seconds: float):
    """How long each pixcon collective waits for the other ranks (seconds, > 0)."""
    import math
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
            not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"set_timeout: seconds must be a finite number > 0, got {seconds!r}")
    _timeout[0] = float(seconds)


def get_timeout() -> float:
    """The collective timeout in seconds (:func:`set_timeout`)."""
    return _timeout[0]


def _dist():
    import torch.distributed as dist
    return dist


def is_distributed(group=None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return _dist().get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    return _dist().get_rank(group) if is_distributed(group) else 0


def init_from_env(device: str | torch.device = "cpu"):
    """Under torchrun (WORLD_SIZE > 1 in the environment) initialise the default process group
    unless it is already: NCCL for a CUDA device (one GPU per process: cuda:LOCAL_RANK), gloo
    for the CPU. Returns (rank, world size, the device this process uses); (0, 1, device)
    without torchrun."""
    import os
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not is_distributed():
        return 0, 1, device
    dist = _dist()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=get_timeout()))
    return dist.get_rank(), dist.get_world_size(), device


def shutdown(timeout: float = 60.0):
    """Destroy the default process group if one is initialised, and leave together.

    At the end of a torchrun job a process that exits with gloo's threads still running aborts,
    and so can one still destroying its group when another rank exits and closes its
    connections (seen once in CI: rank 0 aborted, "terminate called without an active
    exception"). So: a barrier, destroy, then a count in the rendezvous store that every rank
    waits on (the store outlives the group) before any returns."""
    import time
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    dist.barrier()
    dist.destroy_process_group()
    try:
        key = "pixcon/shutdown"
        done = store.add(key, 1)
        deadline = time.time() + timeout
        while done % world != 0 and time.time() < deadline:     # several shutdowns: per round
            time.sleep(0.01)
            done = store.add(key, 0)
    except (RuntimeError, OSError):    # the store's host left first: nobody is left to wait for
        pass


def exit_now(code: int = 0):
    """End a process that used a process group without the interpreter's teardown: gloo's
    worker threads can still be alive when static destructors run, which aborts the process
    ("terminate called without an active exception", seen in CI twice even after ``shutdown``)
    although its work is done. Flushes stdout and stderr, then ``os._exit(code)``."""
    import os
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def broadcast_state(module: torch.nn.Module, src: int = 0, *, buffers_only: bool = True,
                    group=None, op: str = "broadcast_state"):
    """Copy rank ``src``'s buffers (and parameters unless buffers_only) to every rank."""
    if not is_distributed(group):
        return
    tensors = list(module.buffers()) if buffers_only else list(module.state_dict().values())
    works = [_dist().broadcast(t.data, src, group=group, async_op=True) for t in tensors]
    for w in works:
        _wait(w, op, "broadcast", group)


class RankError(RuntimeError):
    """Raised on every rank when another rank's input to a collective step was invalid."""


class CollectiveTimeout(RankError):
    """A pixcon collective waited longer than :func:`get_timeout` for the other ranks."""


def _wait(work, op, what, group=None):
    """Wait for a collective's work, at most get_timeout() seconds where the host waits (gloo);
    a timeout is a CollectiveTimeout naming the op."""
    if _dist().get_backend(group) == "nccl":       # a device-side wait; the group's timeout
        work.wait()
        return
    try:
        work.wait(timeout=datetime.timedelta(seconds=get_timeout()))
    except RuntimeError as e:
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise CollectiveTimeout(
            f"{op}: the {what} across ranks did not complete within {get_timeout():g} s "
            f"(rank {rank(group)} waited): another rank did not reach it (it raised, hung or "
            f"runs another step). Set the limit with pixcon.distributed.set_timeout or "
            f"PIXCON_COLLECTIVE_TIMEOUT") from e


def _flag_device(group=None):
    """Where a small control tensor lives: NCCL only reduces CUDA tensors."""
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_into(out, x, group):
    dist = _dist()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group, async_op=True)


def _all_reduce(x, op, group, reduce=None):
    """all_reduce x in place (sum, or ``reduce``), waited with the timeout."""
    dist = _dist()
    kw = {} if reduce is None else {"op": reduce}
    _wait(dist.all_reduce(x, group=group, async_op=True, **kw), op, "all_reduce", group)
    return x


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, op):
        W = world_size(group)
        out = x.new_empty((W * x.shape[0], *x.shape[1:]))
        _wait(_gather_into(out, x.contiguous(), group), op, "all_gather", group)
        ctx.group, ctx.rows, ctx.rank, ctx.op = group, x.shape[0], rank(group), op
        return out

    @staticmethod
    def backward(ctx, g):       # d(sum over ranks' losses) / d(all rows)
        g = _all_reduce(g.contiguous().clone(), f"{ctx.op} (backward)", ctx.group)
        return g[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, op):
        ctx.group, ctx.op = group, op
        return _all_reduce(x.contiguous().clone(), op, group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.contiguous().clone(), f"{ctx.op} (backward)", ctx.group), None, None


def gather_rows(x: torch.Tensor, *, group=None, op: str = "gather_rows") -> torch.Tensor:
    """(W * n, ...) all ranks' x (n, ...) in rank order; x itself without a process group.
    Every rank must pass the same shape (:func:`agree` checks it where inputs vary). The result
    carries gradient to x when x requires it. ``op``: the name a timeout error gives."""
    if not is_distributed(group):
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, group, op)
    return _GatherRows.forward(_Ctx(), x.detach(), group, op)


def gather_many(*xs, group=None, op: str = "gather_many"):
    """gather_rows of several tensors without gradient, the gathers in flight together."""
    if not is_distributed(group):
        return xs
    outs, works = [], []
    for x in xs:
        out = x.new_empty((world_size(group) * x.shape[0], *x.shape[1:]))
        works.append(_gather_into(out, x.detach().contiguous(), group))
        outs.append(out)
    for w in works:
        _wait(w, op, "all_gather", group)
    return tuple(outs)


def all_reduce_sum(x: torch.Tensor, *, group=None, op: str = "all_reduce_sum") -> torch.Tensor:
    """The sum of x over ranks (a new tensor); x itself without a process group. Carries
    gradient to x when x requires it (the backward sums the gradients of every rank's use)."""
    if not is_distributed(group):
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _AllReduceSum.apply(x, group, op)
    return _AllReduceSum.forward(_Ctx(), x.detach(), group, op)


def class_stats(sums: torch.Tensor, counts: torch.Tensor, *, group=None,
                op: str = "class_stats"):
    """Per-class (sums (C, D), counts (C,)) summed over ranks: the statistics of the
    concatenated batch (class means are sums / counts). Sums keep their gradient."""
    return (all_reduce_sum(sums, group=group, op=op),
            all_reduce_sum(counts, group=group, op=op))


def stats_for(op: str, group=None):
    """:func:`class_stats` naming ``op`` in its errors (the ``stats=`` the losses take)."""
    def stats(sums, counts):
        return class_stats(sums, counts, group=group, op=op)
    return stats


def local_stats(sums, counts):
    """The single-process counterpart of :func:`class_stats`."""
    return sums, counts


class _Ctx:
    """Stand-in for the autograd context when no graph is recorded."""


SHAPE_SLOTS = 8


def agree(op: str, error: BaseException | None = None, *, seed: int | None = None,
          shape=(), group=None):
    """Before a collective whose input may be invalid on one rank: one all_reduce(MAX) of
    (error flag, failing rank, seed, shape, -shape). Raises ``error`` on the rank that had it and
    :class:`RankError` on the others; raises on every rank when the shapes differ. Returns the
    common seed (the largest of the ranks' seeds; ``seed`` itself without a process group).
    ``shape``: up to SHAPE_SLOTS ints that must be equal on every rank."""
    if not is_distributed(group):
        if error is not None:
            raise error
        return seed
    me = rank(group)
    bad = error is not None
    shape = [0] * SHAPE_SLOTS if bad else (
        [int(s) for s in shape] + [0] * SHAPE_SLOTS)[:SHAPE_SLOTS]    # a fixed message size
    msg = torch.tensor([int(bad), me if bad else -1, -1 if seed is None else int(seed),
                        *shape, *[-s for s in shape]], dtype=torch.int64,
                       device=_flag_device(group))
    got = _all_reduce(msg, op, group, _dist().ReduceOp.MAX).tolist()   # the agreement
    if bad:
        raise error
    if got[0]:
        raise RankError(f"{op}: the input on rank {got[1]} is invalid (its error is raised "
                        f"there); nothing changed on rank {me} either")
    n = SHAPE_SLOTS
    hi, lo = got[3:3 + n], [-s for s in got[3 + n:]]
    if hi != lo:
        raise RankError(f"{op}: every rank must pass the same shapes; they range from {lo} to "
                        f"{hi} (rank {me} has {shape})")
    return None if seed is None else got[2]


def checked(op: str, check, *, seed: int | None = None, group=None):
    """Run ``check()`` (raising ValueError/TypeError on bad input, else returning the shapes
    that must agree across ranks) and :func:`agree` on its outcome: every rank raises if any
    rank's check failed. Returns the common seed."""
    try:
        shape, err = check() or (), None
    except (ValueError, TypeError) as e:
        shape, err = (), e
    return agree(op, err, seed=seed, shape=shape, group=group)


def validated(op: str, check, *, agree_now: bool, group=None):
    """An op's checks with cross-rank collectives ahead. ``check()`` validates (raising
    ValueError/TypeError) and returns (value, shape): ``value`` is returned, ``shape`` (ints)
    must be equal on every rank. With ``agree_now`` (cross-rank in a process group, and the
    value checks on: a host sync) the outcome is agreed first (:func:`agree`), so a bad input on
    one rank raises on every rank, and a shape or class-count mismatch is a RankError everywhere,
    instead of one rank waiting in a collective the other never reaches."""
    if not (agree_now and is_distributed(group)):
        return check()[0]
    try:
        (value, shape), err = check(), None
    except (ValueError, TypeError) as e:
        value, shape, err = None, (), e
    agree(op, err, shape=shape, group=group)
    return value
