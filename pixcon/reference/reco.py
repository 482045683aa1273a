"""ReCo loss (Liu et al., ICLR 2022), pure PyTorch, read off the official ``compute_reco_loss``
(specs/reco.md §1) with pixcon's counter-based sampler in place of the official RNG calls.

    L = 1/|K| * sum_{c in K, hard(c) != {}} 1/Q * sum_{q in Q_c}
            -log( e^{cos(q, m_c)/t} / (e^{cos(q, m_c)/t} + sum_{k in N_c(q)} e^{cos(q, k)/t}) )

K: classes with at least one valid pixel; m_c: mean embedding of the valid pixels of c (detached);
Q_c: Q queries drawn uniformly with replacement among the hard pixels of c (probability of the
own label < strong_threshold); N_c(q): N negatives, each of class j ~ softmax_{j in K, j != c}
(cos(m_c, m_j) / t) and then a pixel uniform within class j (detached). Gradients reach the
embedding only through the queries.

Split in two, as the spec's parity strategy suggests: ``reco_samples`` (statistics and sampled
indices, no gradient) and ``reco_loss_from_samples`` (the differentiable formula above).
"""
from __future__ import annotations

import torch

from . import common as cm
from .rng import STREAM_NEGATIVE, STREAM_QUERY, philox4x32, uniform_index


def reco_samples(x, lab, hard, num_classes, *, num_queries, num_negatives, seed,
                 relation_temperature, stats=None):
    """x (P, D) pixel rows, lab (P,) classes (-1 invalid), hard (P,) bool.

    Returns (queries (C, Q) pixel indices, -1 for classes without hard pixels or when fewer than
    two classes are present; negatives (C, Q, N); means (C, D); K = number of present classes).
    Query (c, q) uses counter c*Q + q of STREAM_QUERY; its negative n uses counter
    (c*Q + q)*N + n of STREAM_NEGATIVE (word 0: class, word 1: pixel).
    stats: None, or a function (sums, counts) -> (sums, counts) giving the statistics the means
    come from (pixcon.distributed.class_stats: over all ranks); presence stays this batch's."""
    C, Q, N = num_classes, num_queries, num_negatives
    dev = lab.device
    sums, counts = cm.class_sums(x.detach(), lab, C)
    present = counts > 0
    means = cm.class_means_from_sums(*(stats(sums, counts) if stats is not None else
                                       (sums, counts)))                 # m_c, detached
    K = int(present.sum())
    queries = torch.full((C, Q), -1, dtype=torch.int64, device=dev)
    negatives = torch.full((C, Q, N), -1, dtype=torch.int64, device=dev)
    if K < 2:
        return queries, negatives, means, K
    cdf = cm.relation_cdf(means, present, relation_temperature)         # P(j | c) as thresholds
    order, offsets, _ = cm.group_by_class(lab, C)
    for c in torch.nonzero(present)[:, 0].tolist():
        hard_c = torch.nonzero(hard & (lab == c))[:, 0]                 # ascending pixel index
        if len(hard_c) == 0:
            continue                                                    # still counted in K
        rows = c * Q + torch.arange(Q, device=dev)                      # counter of query (c, q)
        queries[c] = hard_c[uniform_index(philox4x32(rows, seed, STREAM_QUERY)[:, 0], len(hard_c))]
        r = philox4x32(rows[:, None] * N + torch.arange(N, device=dev), seed, STREAM_NEGATIVE)
        neg_cls = torch.searchsorted(cdf[c].expand(Q, C).contiguous(), r[..., 0].contiguous(),
                                     right=True)
        negatives[c] = cm.pick_in_class(order, offsets, counts, neg_cls, r[..., 1])
    return queries, negatives, means, K


def reco_loss_from_samples(x, keys, queries, negatives, means, temperature):
    """Per-query InfoNCE (C, Q) of the sampled queries (rows of x, with gradient) against their
    class mean (positive) and their negatives (rows of ``keys``, constants: ReCo passes
    x.detach()); zero rows for classes without queries."""
    C, Q = queries.shape
    per_query = x.new_zeros(C, Q)
    for c in range(C):
        if queries[c, 0] < 0:
            continue
        anchor = cm.normalize(x[queries[c]])                            # (Q, D), with grad
        pos = cm.normalize(means[c].detach())                           # (D,)
        neg = cm.normalize(keys[negatives[c]])                          # (Q, N, D)
        logits = torch.cat([(anchor @ pos)[:, None],
                            torch.einsum("qd,qnd->qn", anchor, neg)], dim=1) / temperature
        per_query[c] = torch.logsumexp(logits, dim=1) - logits[:, 0]    # CE with target 0
    return per_query + 0.0 * x.sum()  # degenerate batches stay connected to the graph


def reco_loss(emb, labels, probs, mask=None, *, ignore_index=255, strong_threshold=0.97,
              temperature=0.5, num_queries=256, num_negatives=512, seed=0,
              relation_temperature=None, reduction="mean", stats=None):
    """Reference ReCo loss. Arguments as ``pixcon.ops.reco_loss`` (already validated, seed an int).

    Computes in float32 (float64 for float64 embeddings) whatever the input dtype.
    reduction="none" returns the (C, Q) per-query losses (zero rows for classes without queries).
    """
    B, D, h, w = emb.shape
    C = probs.shape[1]
    lab = cm.pixel_labels(labels, (h, w), C, ignore_index, mask)       # (P,), -1 = not valid
    x = cm.pixel_rows(emb).to(torch.promote_types(emb.dtype, torch.float32))   # (P, D)
    hard = cm.hard_pixels(probs, lab, strong_threshold)                 # (P,)
    queries, negatives, means, K = reco_samples(
        x, lab, hard, C, num_queries=num_queries, num_negatives=num_negatives, seed=seed,
        relation_temperature=temperature if relation_temperature is None else relation_temperature,
        stats=stats)
    per_query = reco_loss_from_samples(x, x.detach(), queries, negatives, means, temperature)
    if reduction == "none":
        return per_query
    return per_query.sum() / (num_queries * max(K, 1))
