"""A one-line progress bar on stderr, shared by the trainer and the benchmark suite."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, total, label, enabled=True):
        self.total, self.label, self.enabled = total, label, enabled
        self.t0, self.last, self.tty = time.time(), 0.0, sys.stderr.isatty()
        self.next_pct = 10

    def update(self, n, info=""):
        if not self.enabled:
            return
        now = time.time()
        pct = 100 * n // self.total
        if self.tty and (now - self.last > 0.2 or n == self.total):
            el = now - self.t0
            eta = el / max(n, 1) * (self.total - n)
            bar = "#" * (pct // 5) + "." * (20 - pct // 5)
            print(f"\r{self.label} [{bar}] {n}/{self.total} {info} eta {eta:4.0f}s ",
                  end="", file=sys.stderr, flush=True)
            self.last = now
        elif not self.tty and pct >= self.next_pct:
            print(f"{self.label} {n}/{self.total} {info} ({now - self.t0:.0f}s)", file=sys.stderr,
                  flush=True)
            self.next_pct = pct // 10 * 10 + 10

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)
