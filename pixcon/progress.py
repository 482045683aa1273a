"""A one-line progress bar on stderr, shared by the trainer and the benchmark suite."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr.

    On a terminal the line is redrawn in place (at most 5 times a second). Otherwise (a log file,
    CI) a full line is printed at every 10% and at least every ``every`` seconds, so a long run
    never goes quiet; each line has the rate and the estimated time left."""

    def __init__(self, total, label, enabled=True, every=30.0, stream=None):
        self.total, self.label, self.enabled, self.every = total, label, enabled, every
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.time()
        self.last = self.t0
        self.tty = self.stream.isatty()
        self.next_pct = 10                   # the next 10% boundary that prints a line
        self.n0 = None                       # the first count seen (a resumed run starts above 0)

    def _rate(self, n, el):
        done = n - (self.n0 or 0)
        rate = done / el if el > 0 else 0.0
        eta = (self.total - n) / rate if rate > 0 else float("nan")
        return rate, eta

    def update(self, n, info=""):
        if not self.enabled:
            return
        now = time.time()
        el = now - self.t0
        pct = 100 * n // max(self.total, 1)
        if self.n0 is None:
            self.n0, self.next_pct = n, pct // 10 * 10 + 10
        rate, eta = self._rate(n, el)
        speed = f"{rate:.2f}/s" if rate < 10 else f"{rate:.0f}/s"
        eta_s = "?" if eta != eta else f"{eta:.0f}s"
        if self.tty:
            if now - self.last > 0.2 or n == self.total:
                bar = "#" * (pct // 5) + "." * (20 - pct // 5)
                print(f"\r{self.label} [{bar}] {n}/{self.total} {info} {speed} eta {eta_s} ",
                      end="", file=self.stream, flush=True)
                self.last = now
        elif n > self.n0 and (pct >= self.next_pct or now - self.last >= self.every
                              or n == self.total):
            print(f"{self.label} {n}/{self.total} {info} {speed}, {el:.0f}s elapsed, "
                  f"eta {eta_s}", file=self.stream, flush=True)
            self.next_pct = pct // 10 * 10 + 10
            self.last = now

    def close(self):
        if self.enabled and self.tty:
            print(file=self.stream, flush=True)
