"""Official-style baselines: pixcon's own code with the cost structure of the official
implementations as the specs describe it (Python loops over images and classes, host syncs,
full-size copies, materialised matrices), so that benchmarks compare pixcon with what users run
today. Written here from the specs' descriptions; no official code is copied. Results are the
methods' values (checked against pixcon's references in tests/test_bench.py), the cost is the
official one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --- ReCo (specs/reco.md §1.2, cost profile §6) ----------------------------------------------
def reco_official_style(emb, labels, probs, mask=None, *, ignore_index=255,
                        strong_threshold=0.97, temperature=0.5, num_queries=256,
                        num_negatives=512):
    """ReCo's loss with the official cost structure, on pixcon's inputs (labels (B, h, w) at
    feature resolution, optional bool mask).

    Per class in ascending order: a validity count read back to the host, masked selects of the
    class's pixels and hard pixels from the permuted embedding (copies, with gradient), the mean;
    then per present class with hard pixels: queries from torch.randint on the CPU generator,
    negative classes from torch.multinomial over the rotated relation softmax, and one numpy
    randint per (query, negative class) with the count read from the device each time, into a
    Python list of Q * N indices; the (Q, 1 + N, D) keys materialised and cosine similarities
    taken over them. Returns the mean over present classes (a graph-less zero when fewer than
    two are present, as the official code)."""
    import numpy as np
    B, D, h, w = emb.shape
    C = probs.shape[1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < C)
    if mask is not None:
        valid &= mask.bool()
    pix = emb.permute(0, 2, 3, 1)                                         # (B, h, w, D) view
    feats, hards, means = [], [], []
    for c in range(C):
        of_c = valid & (labels == c)
        if int(of_c.sum()) == 0:                                          # host sync per class
            continue
        feats.append(pix[of_c])                                           # copy, with grad
        hards.append(pix[of_c & (probs[:, c] < strong_threshold)])
        means.append(feats[-1].mean(dim=0, keepdim=True))
    K = len(feats)
    if K <= 1:
        return torch.tensor(0.0)
    means = torch.cat(means)
    loss = 0.0
    Q, N = num_queries, num_negatives
    for i in range(K):
        if hards[i].shape[0] == 0:
            continue                                                      # still counted in K
        anchor = hards[i][torch.randint(hards[i].shape[0], (Q,))]         # (Q, D), with grad
        with torch.no_grad():
            order = list(range(i + 1, K)) + list(range(i))                # rotated negatives
            sim = F.cosine_similarity(means[i:i + 1], means[order], dim=1)
            p = torch.softmax(sim / temperature, dim=0)
            draws = torch.multinomial(p, Q * N, replacement=True).view(Q, N)
            per_class = torch.stack([(draws == j).sum(dim=1) for j in range(K - 1)], dim=1)
            pool = torch.cat([feats[j] for j in order])
            sizes = [feats[j].shape[0] for j in order]
            index = []
            for q in range(Q):
                for j in range(K - 1):
                    lo = sum(sizes[:j])
                    index += np.random.randint(lo, lo + sizes[j],
                                               size=int(per_class[q, j])).tolist()
            neg = pool[index].reshape(Q, N, D)
            keys = torch.cat([means[i].expand(Q, 1, D), neg], dim=1)       # (Q, 1 + N, D)
        logits = F.cosine_similarity(anchor[:, None, :], keys, dim=2) / temperature
        loss = loss + F.cross_entropy(logits, torch.zeros(Q, dtype=torch.long,
                                                          device=emb.device))
    return loss / K


def reco_official_inputs(labels, probs, mask=None, ignore_index=255):
    """pixcon's ReCo inputs in the official calling form: one-hot labels (B, C, h, w) float,
    zero where a pixel is not valid, and the validity mask (B, 1, h, w) float."""
    C = probs.shape[1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < C)
    if mask is not None:
        valid &= mask.bool()
    onehot = F.one_hot(labels.clamp(0, C - 1).long(), C).permute(0, 3, 1, 2) * valid[:, None]
    return onehot.to(probs.dtype), valid[:, None].to(probs.dtype)


# --- the real official code, from the user's own checkout ------------------------------------
OFFICIAL_FILES = {"reco": "module_list.py"}     # where each method's loss lives in its repository


def load_official(arg: str):
    """``METHOD=PATH`` (e.g. ``reco=~/src/reco``): the official loss function loaded at run time
    from the user's checkout of the official repository (never copied into pixcon), wrapped to
    pixcon's calling form. Returns (method, fn)."""
    import importlib.util
    import os
    import sys
    method, sep, path = arg.partition("=")
    if not sep or method not in OFFICIAL_FILES:
        raise ValueError(f"--official wants METHOD=PATH with METHOD in {sorted(OFFICIAL_FILES)}, "
                         f"got {arg!r}")
    path = os.path.expanduser(path)
    file = os.path.join(path, OFFICIAL_FILES[method])
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--official {method}: no {OFFICIAL_FILES[method]} in {path} "
                                f"(point it at a checkout of the official repository)")
    sys.path.insert(0, path)                  # the file may import its siblings
    spec = importlib.util.spec_from_file_location(f"official_{method}", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def reco(emb, labels, probs, *, num_queries, num_negatives, strong_threshold=0.97,
             temperature=0.5):
        onehot, mask = reco_official_inputs(labels, probs)
        return mod.compute_reco_loss(emb, onehot, mask, probs, strong_threshold, temperature,
                                     num_queries, num_negatives)
    return method, {"reco": reco}[method]


# --- ContrastiveSeg (specs/contrastiveseg.md §2-§4, §6.3, cost profile §9) ------------------
def _official_split(n_hard: int, n_easy: int, n_view: int) -> tuple[int, int]:
    if n_hard >= n_view / 2 and n_easy >= n_view / 2:
        return n_view // 2, n_view - n_view // 2
    if n_hard >= n_view / 2:
        return n_view - n_easy, n_easy
    return n_hard, n_view - n_hard


def contrastiveseg_official_style(emb, labels, predict, *, ignore_index=255, max_samples=1024,
                                  max_views=100, temperature=0.1, base_temperature=0.07,
                                  queue=None):
    """ContrastiveSeg's pixel contrast with the official cost structure.

    Labels resized by F.interpolate on a float copy; the whole embedding permuted into a
    contiguous (B, h*w, D) copy; per image a unique() and per class a count read back to the
    host; per kept class two nonzero() and two randperm() on the global CPU generator and a row
    copy into a zero (T, n_view, D) buffer; then the anchors x keys logits, masks and
    exponentials all materialised (keys: the anchors, or with ``queue`` (C, R2, D) the queue
    concatenated and copied into a flat key buffer, class 0 skipped as in the official code).
    Returns the loss (0 when no class is kept)."""
    B, D, h, w = emb.shape
    lab = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    lab, pred = lab.reshape(B, -1), predict.reshape(B, -1)
    feats = emb.permute(0, 2, 3, 1).contiguous().reshape(B, h * w, D)

    kept = []
    for b in range(B):
        for c in torch.unique(lab[b]).tolist():
            if c != ignore_index and int((lab[b] == c).sum()) > max_views:
                kept.append((b, c))
    if not kept:
        return emb.sum() * 0.0
    n_view = min(max_samples // len(kept), max_views)
    anchors = torch.zeros(len(kept), n_view, D, dtype=emb.dtype, device=emb.device)
    anchor_y = torch.zeros(len(kept), device=emb.device)
    for t, (b, c) in enumerate(kept):
        hard = ((lab[b] == c) & (pred[b] != c)).nonzero()
        easy = ((lab[b] == c) & (pred[b] == c)).nonzero()
        kh, ke = _official_split(hard.shape[0], easy.shape[0], n_view)
        hard = hard[torch.randperm(hard.shape[0])[:kh]]
        easy = easy[torch.randperm(easy.shape[0])[:ke]]
        anchors[t] = feats[b, torch.cat([hard, easy])[:, 0]]
        anchor_y[t] = c

    z = torch.cat(torch.unbind(anchors, dim=1))                          # view-major (N, D)
    y = anchor_y.repeat(n_view)
    N = z.shape[0]
    if queue is None:
        keys, key_y = z, y
    else:
        C, R2, _ = queue.shape
        flat = torch.zeros(C * R2, D, dtype=queue.dtype, device=queue.device)
        key_y = torch.zeros(C * R2, device=queue.device)
        at = 0
        for c in range(1, C):                                               # class 0 skipped
            flat[at:at + R2] = queue[c]
            key_y[at:at + R2] = c
            at += R2
        keys = flat
    logits = z @ keys.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    same = (y[:, None] == key_y[None, :]).float()
    negatives = 1.0 - same
    not_self = torch.ones_like(same).scatter_(1, torch.arange(N, device=z.device)[:, None], 0)
    positives = same * not_self
    exp_logits = torch.exp(logits)
    neg_mass = (exp_logits * negatives).sum(dim=1, keepdim=True)
    log_prob = logits - torch.log(exp_logits + neg_mass)
    mean_pos = (positives * log_prob).sum(dim=1) / positives.sum(dim=1)
    return -(temperature / base_temperature) * mean_pos.mean()


# --- CAC (specs/cac.md §5-§7, cost profile §11) ----------------------------------------------
def _cac_chunk_sums(anchor, keys, key_labels, anchor_labels, pos, stabiliser, temperature):
    """One bank chunk: masked exp-sum of the logits under the given stabiliser (a float mask of
    the chunk's size, as the official code builds it)."""
    logits = anchor @ keys.T / temperature
    mask = (key_labels[None, :] != anchor_labels[:, None]).float()
    return (torch.exp(logits - stabiliser[:, None]) * mask).sum(dim=1)


def _cac_first_chunk(anchor, keys, key_labels, anchor_labels, pos, temperature):
    logits = anchor @ keys.T / temperature
    full = torch.cat([pos[:, None], logits], dim=1)
    m = full.max(dim=1).values
    mask = torch.cat([torch.ones_like(pos)[:, None],
                      (key_labels[None, :] != anchor_labels[:, None]).float()], dim=1)
    return (torch.exp(full - m[:, None]) * mask).sum(dim=1), m


def cac_official_style(feat1, feat2, logits1, logits2, negatives, negative_labels, *,
                       pos_threshold=0.75, temperature=0.1, chunk=8000):
    """CAC's loss with the official cost structure: for each direction, the bank streamed in
    ``chunk``-column blocks, each block's logits, float mask and exponentials materialised
    inside torch.utils.checkpoint (recomputed in backward), the first block's maximum as the
    stabiliser, 1e-8 inside and outside the log."""
    from torch.utils.checkpoint import checkpoint
    p1, p2 = torch.softmax(logits1.detach(), 1), torch.softmax(logits2.detach(), 1)
    c1, y1 = p1.max(dim=1)
    c2, y2 = p2.max(dim=1)
    bank = negatives.detach()
    total = 0.0
    for fa, ft, ya, ca, ct in ((feat1, feat2, y1, c1, c2), (feat2, feat1, y2, c2, c1)):
        pos = (fa * ft.detach()).sum(dim=1) / temperature
        den, m = checkpoint(_cac_first_chunk, fa, bank[:chunk], negative_labels[:chunk], ya,
                            pos, temperature, use_reentrant=False)
        for s in range(chunk, bank.shape[0], chunk):
            den = den + checkpoint(_cac_chunk_sums, fa, bank[s:s + chunk],
                                   negative_labels[s:s + chunk], ya, pos, m, temperature,
                                   use_reentrant=False)
        ell = -torch.log(torch.exp(pos - m) / (den + 1e-8) + 1e-8)
        d = ((ct > pos_threshold) & (ca < ct)).float()
        total = total + (ell * d).sum() / (d.sum() + 1e-12)
    return total


# --- U2PL (specs/u2pl.md §2, §3) -------------------------------------------------------------
def _scatter_onehot(gt, C):
    """The official one-hot's cost and result: a (C, B, h, w) zero buffer and a scatter_ along
    classes whose index has batch size 1 (every image lands in image 0, §3), ignored pixels
    (-1 here) mapped to 0 first and cleared in their own image afterwards."""
    out = torch.zeros(C, *gt.shape, dtype=torch.float32, device=gt.device)
    out.scatter_(0, gt.clamp(min=0)[:, None], 1.0)
    out[:, gt < 0] = 0
    return out.permute(1, 0, 2, 3)


def u2pl_official_style(rep, gt, prob, low_mask, high_mask, rep_teacher, queues, *,
                        num_labeled, sizes, low_rank=3, high_rank=20, anchor_threshold=0.3,
                        negative_threshold=1.0, temperature=0.5, num_queries=256,
                        num_negatives=50):
    """U2PL's contrastive loss with the official cost structure: per class a Python loop with
    masked-select copies of the student and teacher rows, a class mask from a full sort of the
    probabilities, the negatives appended to a CPU list queue by concatenation (a copy of the
    queue per class per step), host reads of the counts, and for sampling the whole queue of
    the class cloned and its Q x N x D negatives gathered. gt (B, h, w) at feature resolution
    (-1 ignored); queues: a list of C (n_c, D) CPU tensors, replaced in place. Returns the
    loss (0 with at most one valid class)."""
    B, D, h, w = rep.shape
    C = prob.shape[1]
    L = num_labeled
    onehot = torch.cat([_scatter_onehot(gt[:L], C), _scatter_onehot(gt[L:], C)]).bool()
    labelled = (torch.arange(B, device=rep.device) < L)[:, None, None]
    by_prob = torch.sort(prob, dim=1, descending=True).indices           # a full sort
    rows, trows = rep.permute(0, 2, 3, 1), rep_teacher.detach().permute(0, 2, 3, 1)
    anchors, means, present = {}, {}, []
    for c in range(C):                        # per class: masks, copies, the queue on the host
        reliable = onehot[:, c] & low_mask[:, 0].bool()
        rank = (by_prob == c).int().argmax(dim=1)                        # where c sits
        wanted = torch.where(labelled, (rank < low_rank) & ~onehot[:, c],
                             (rank >= low_rank) & (rank < high_rank))
        negative = (onehot[:, c] & high_mask[:, 0].bool() & wanted
                    & (prob[:, c] < negative_threshold))
        anchors[c] = rows[reliable & (prob[:, c] > anchor_threshold)]
        means[c] = trows[reliable].mean(dim=0)
        queues[c] = torch.cat([queues[c], trows[negative].cpu()])[-sizes[c]:]
        if int(reliable.sum()):
            present.append(c)
    total = rep.sum() * 0
    if len(present) <= 1:
        return total
    for c in present:
        n_anchor, n_queue = anchors[c].shape[0], queues[c].shape[0]
        if n_anchor == 0 or n_queue == 0:
            continue
        a = anchors[c][torch.randint(n_anchor, (num_queries,))]
        with torch.no_grad():                  # the whole queue to the device, then a gather
            queue = queues[c].clone().to(rep.device)
            neg = queue[torch.randint(n_queue, (num_queries, num_negatives))]  # (Q, N, D)
            keys = torch.cat([means[c].expand(num_queries, 1, D), neg], dim=1)
        sim = F.normalize(a, dim=1, eps=1e-8)[:, None] * F.normalize(keys, dim=2, eps=1e-8)
        logits = sim.sum(dim=2) / temperature
        total = total + (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    return total / len(present)
