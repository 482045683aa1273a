"""nn.Module wrappers of pixcon.ops."""
from __future__ import annotations

import torch

from ..ops import reco_loss


class ReCoLoss(torch.nn.Module):
    """Module form of :func:`pixcon.ops.reco_loss`; keyword arguments are stored and passed on.

    >>> crit = ReCoLoss(num_queries=256, num_negatives=512)
    >>> loss = crit(rep, labels, probs, mask=conf_mask)
    """

    def __init__(self, *, ignore_index=255, strong_threshold=0.97, temperature=0.5,
                 num_queries=256, num_negatives=512, backend="auto", **kwargs):
        super().__init__()
        self.kwargs = dict(ignore_index=ignore_index, strong_threshold=strong_threshold,
                           temperature=temperature, num_queries=num_queries,
                           num_negatives=num_negatives, backend=backend, **kwargs)

    def forward(self, emb, labels, probs, mask=None, seed=None):
        return reco_loss(emb, labels, probs, mask=mask, seed=seed, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


__all__ = ["ReCoLoss"]
