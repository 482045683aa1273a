"""The randomness contract (docs/design.md §3): the sampler streams, the seed, and how a
32-bit draw becomes an index. Every backend follows it: the torch Philox of
pixcon.reference.rng, the C++ and the Triton kernels of the op pixcon::philox."""
from __future__ import annotations

import torch


# Streams (counter word c1) of the samplers. Fixed numbers: changing one changes every sample.
STREAM_QUERY = 1       # hard-query sampling


STREAM_NEGATIVE = 2    # negative class (word 0) and negative pixel (word 1)


STREAM_ANCHOR = 3      # ContrastiveSeg anchors: one sort key per pixel (word 0)


def uniform_index(r: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Map 32-bit draws r to integers uniform in [0, n): (r * n) >> 32 (n < 2^31)."""
    if not torch.is_tensor(n):
        n = torch.tensor(n, dtype=torch.int64, device=r.device)
    return (r.to(torch.int64) * n.to(torch.int64)) >> 32


def draw_seed(seed: int | None, op: str | None = None) -> int:
    """The seed contract: an int in [0, 2^63) is used as is (anything else raises, rather than
    wrapping two seeds onto one); None draws one 63-bit seed from torch's default CPU
    generator, so ``torch.manual_seed`` controls every sample. ``op`` prefixes the errors."""
    where = f"{op}: " if op else ""
    if seed is None:
        return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu").item())
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{where}seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{where}seed must be in [0, 2^63), got {seed}")
    return seed
