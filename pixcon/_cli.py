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
