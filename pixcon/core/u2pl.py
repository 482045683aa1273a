"""U2PL's steps (specs/u2pl.md): the class masks from ranks and thresholds, the queue grouping,
the sampling of anchors and negatives, and the loss's sequence, into which a caller passes its
sampler and its InfoNCE (the reference's gather, or the fused kernels). Shared by the reference
and the fused path."""
from __future__ import annotations

import torch

from .rng import STREAM_NEGATIVE, STREAM_QUERY


def official_onehot(gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C, h, w) bool: what the official ``label_onehot`` returns for labels gt (B, h, w),
    -1 ignored (the official 255). Its ``scatter_`` writes every image's label into image 0
    (the index has size 1 in the batch dimension), the ignored pixels first mapped to class 0;
    then image 0's own ignored pixels are cleared. Image 0 gets the union, the others nothing
    (specs/u2pl.md §3)."""
    B = gt.shape[0]
    cls = torch.arange(num_classes, device=gt.device)[None, :, None, None]
    union = (gt.clamp(min=0)[:, None] == cls).any(dim=0)                     # (C, h, w)
    out = torch.zeros((B, num_classes, *gt.shape[1:]), dtype=torch.bool, device=gt.device)
    if B:
        out[0] = union & (gt[0] >= 0)[None]
    return out


def ranks(prob: torch.Tensor) -> torch.Tensor:
    """(P, C) position of each class in its pixel's descending order of prob (P, C); ties in
    class order (a stable sort)."""
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    pos = torch.arange(prob.shape[1], device=prob.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, pos)


def class_masks(gt, prob, reliable, unreliable, num_labeled, hw, *, low_rank, high_rank,
                anchor_threshold, negative_threshold, official, ranks_of=ranks):
    """(V, A, N) (P, C) masks (see the module docstring) from flat labels gt (P,) (-1 ignored),
    teacher probs (P, C), reliable / unreliable (P,) bool; the first num_labeled * hw pixels
    are labelled. official: the code's reading, its one-hot (per half) included. ranks_of:
    :func:`ranks` or an equal kernel (the op pixcon::class_ranks)."""
    P, C = prob.shape
    cls = torch.arange(C, device=gt.device)
    labelled = torch.arange(P, device=gt.device) < num_labeled * hw
    rank = ranks_of(prob)
    if official:
        g = gt.view(-1, hw)
        halves = [official_onehot(x.view(x.shape[0], 1, hw), C).view(x.shape[0], C, hw)
                  for x in (g[:num_labeled], g[num_labeled:])]
        onehot = torch.cat(halves).permute(0, 2, 1).reshape(P, C)
        valid = onehot & unreliable[:, None]                         # high_valid_pixel
        not_c = ~onehot                                              # label_l[:, c] == 0
    else:
        onehot = gt[:, None] == cls[None, :]
        valid = unreliable[:, None] & (gt >= 0)[:, None]
        not_c = ~onehot
    low_valid = onehot & reliable[:, None]
    anchors = low_valid & (prob > anchor_threshold)
    class_mask = torch.where(labelled[:, None], (rank < low_rank) & not_c,
                             (rank >= low_rank) & (rank < high_rank))
    negatives = (prob < negative_threshold) & valid & class_mask
    return low_valid, anchors, negatives


def group_columns(mask: torch.Tensor):
    """(order, offsets, counts) grouping the rows p of a (P, C) mask by column c, ascending p
    within a column: the layout the samplers draw from."""
    P, C = mask.shape
    dev = mask.device
    # A stable partition of the column-major (class, row) pairs, kept ones first, without a sort
    # (31 ms for U2PL's 1.4M pairs on CPU; this, 5 ms) nor a compaction (a host sync on CUDA):
    # a kept pair goes to its rank among the kept ones, every other pair after them in order,
    # so the destinations are a permutation and the scatter writes each place once.
    m = mask.T.reshape(-1)
    kept = torch.cumsum(m, 0)                                  # kept pairs up to and including j
    j = torch.arange(C * P, device=dev)
    dest = torch.where(m, kept - 1, kept[-1:] + (j - kept))   # kept[-1:]: all kept, no sync
    order = torch.empty(C * P, dtype=torch.int64, device=dev).scatter_(0, dest, j % P)
    counts = mask.sum(dim=0)
    offsets = torch.cumsum(counts, 0) - counts
    return order, offsets, counts


def sample(anchors, bank, num_queries, num_negatives, seed, sampler, grouped=group_columns):
    """(a_idx (C*Q,) pixel of each anchor slot or -1, neg_idx (C*Q, N) bank rows or -1): anchor
    (c, q) uniform among A[:, c] (counter c*Q + q, STREAM_QUERY), each of its negatives uniform
    among c's filled queue slots (counter (c*Q + q)*N + n, STREAM_NEGATIVE). sampler: a
    ``sample_in_groups`` (pixcon.ops.primitives) bound to a backend; grouped:
    :func:`group_columns` or an equal kernel (the op pixcon::group_columns)."""
    C = anchors.shape[1]
    dev = anchors.device
    cls = torch.arange(C, device=dev)
    a = sampler(*grouped(anchors), cls, num_queries, seed, STREAM_QUERY).reshape(-1)
    row_class = cls.repeat_interleave(num_queries)
    neg = sampler(*bank.slots(), row_class, num_negatives, seed, STREAM_NEGATIVE)
    return a, torch.where(a[:, None] >= 0, neg, -1)


def u2pl_loss(emb, teacher_emb, bank, masks, *, temperature, num_queries, num_negatives,
              prototype, seed, reduction, sampler, contrast, push_backend, check_values=None,
              grouped=group_columns):
    """The loss on (B, D, h, w) student / teacher embeddings given the (V, A, N) (P, C) masks of
    :func:`class_masks` (the op makes them once, for its checks and this). Pushes the negative
    candidates into ``bank`` first, as the official code does. sampler: a backend's
    ``sample_in_groups``; contrast(emb, a_idx, pos (M, D), keys, neg_idx, t): the per-anchor
    InfoNCE (the reference's gather, or the sparse InfoNCE kernels); check_values: the push's
    (the pushed teacher rows finite), as the op's; grouped: as :func:`sample`'s."""
    V, A, N = masks
    C = V.shape[1]
    dt = torch.promote_types(emb.dtype, torch.float32)
    B, D = teacher_emb.shape[:2]
    teacher = teacher_emb.detach().reshape(B, D, -1).to(dt)      # (B, D, HW): no row copy
    bank.push(teacher, N.T, backend=push_backend, check_values=check_values)
    counts = V.sum(dim=0)
    valid = counts > 0
    if prototype is None:                  # class sums, one (D, HW) @ (HW, C) product per image
        sums = torch.bmm(teacher, V.to(dt).view(B, -1, C)).sum(dim=0)          # (D, C)
        pos = sums.T / counts.clamp(min=1)[:, None].to(dt)
    else:
        pos = prototype.detach().to(dt)
    a_idx, neg_idx = sample(A, bank, num_queries, num_negatives, seed, sampler, grouped)
    per_anchor = contrast(emb, a_idx, pos.repeat_interleave(num_queries, 0), bank.keys,
                          neg_idx, temperature)
    # per_anchor hangs off emb whatever was sampled (both contrasts read emb's rows), so every
    # result stays connected to emb without adding an emb-sized zero gradient (35 ms at VOC)
    per_class = per_anchor.view(C, num_queries).mean(dim=1) * valid
    if reduction == "none":
        return per_class
    total = per_class.sum()
    if reduction == "mean":
        n = valid.sum()
        total = torch.where(n > 1, total / n.clamp(min=1), 0.0)
    return total
