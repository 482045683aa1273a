"""What every pixcon command line shares."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the description's layout. Flags and options whose
    default is None or False say in their own words what happens when they are left out."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or \
                isinstance(action, (argparse._StoreFalseAction, argparse._StoreTrueAction)):
            return action.help                   # a flag's default is its absence
        return super()._get_help_string(action)


def check_device(prog: str, text: str | None) -> None:
    """Exit with one line naming what is missing when ``text`` (a --device value) is not a
    device this machine has: not a device name, CUDA on a CPU build of torch or on a machine
    without a visible GPU, a GPU index past the last. None (the command's default) passes."""
    import sys

    import torch
    if text is None:
        return
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        sys.exit(f"{prog}: --device {text!r} is not a device name (cpu, cuda, cuda:1)")
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            sys.exit(f"{prog}: --device {text} needs a CUDA build of torch; this one "
                     f"({torch.__version__}) is CPU-only (use --device cpu)")
        if not torch.cuda.is_available():
            sys.exit(f"{prog}: --device {text}: no CUDA device is visible on this machine "
                     "(use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            sys.exit(f"{prog}: --device {text}: this machine has {torch.cuda.device_count()} "
                     "CUDA device(s)")
    elif dev.type != "cpu":
        sys.exit(f"{prog}: --device {text}: only cpu and cuda are supported")


THREADS_HELP = ("CPU threads for torch and pixcon's compiled kernels: a number, or 'auto' (the "
                "cores this process may use minus the 1-minute load average, divided among "
                "torchrun's local ranks, at least 1: one thread on a 2-core machine whose other "
                "core is busy, where two threads stall)")


def auto_threads() -> int:
    """The thread policy of --threads auto: cores available to this process minus the load
    other processes put on them (the 1-minute load average, rounded), shared among torchrun's
    local ranks; at least 1. On an idle machine every core; with one of two cores kept busy,
    one thread (a parallel region waits for its slowest thread, and a thread sharing a core
    with another process runs at half speed or less: README "Threads")."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = os.getloadavg()[0]
    except OSError:                       # no load average on this platform
        busy = 0.0
    ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, int(round(cores - busy)) // ranks)


def apply_threads(prog: str, value: str) -> int:
    """Set torch's and pixcon's thread count from a --threads value; exit with one line on a
    bad value. Returns the count."""
    import sys

    import torch

    import pixcon
    if value == "auto":
        n = auto_threads()
    else:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            sys.exit(f"{prog}: --threads must be a positive integer or 'auto', got {value!r}")
    torch.set_num_threads(n)
    pixcon.set_num_threads(n)
    return n
