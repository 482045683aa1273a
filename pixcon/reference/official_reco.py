"""The official ReCo loss as shipped (lorenmt/reco ``module_list.py``, ``compute_reco_loss`` and
``negative_index_sampler``), transcribed with its structure kept: per-class Python loops,
per-query host syncs, numpy's global RNG, materialised Q x (1+N) x D keys. It is the
"official-style" benchmark provider and the fidelity cross-check of the reference; do not use it
for training. Deviations from the original: none in the algorithm; numpy and torch are imported
at module level."""
import numpy as np
import torch
import torch.nn.functional as F


def negative_index_sampler(samp_num, seg_num_list):
    negative_index = []
    for i in range(samp_num.shape[0]):
        for j in range(samp_num.shape[1]):
            negative_index += np.random.randint(low=sum(seg_num_list[:j]),
                                                high=sum(seg_num_list[:j + 1]),
                                                size=int(samp_num[i, j])).tolist()
    return negative_index


def compute_reco_loss(rep, label, mask, prob, strong_threshold=1.0, temp=0.5, num_queries=256,
                      num_negatives=256):
    """rep (B, D, h, w); label (B, C, h, w) one-hot; mask (B, 1, h, w); prob (B, C, h, w)."""
    batch_size, num_feat, im_w_, im_h = rep.shape
    num_segments = label.shape[1]
    device = rep.device

    valid_pixel = label * mask
    rep = rep.permute(0, 2, 3, 1)

    seg_feat_all_list, seg_feat_hard_list, seg_num_list, seg_proto_list = [], [], [], []
    for i in range(num_segments):
        valid_pixel_seg = valid_pixel[:, i]
        if valid_pixel_seg.sum() == 0:
            continue
        prob_seg = prob[:, i, :, :]
        rep_mask_hard = (prob_seg < strong_threshold) * valid_pixel_seg.bool()
        seg_proto_list.append(torch.mean(rep[valid_pixel_seg.bool()], dim=0, keepdim=True))
        seg_feat_all_list.append(rep[valid_pixel_seg.bool()])
        seg_feat_hard_list.append(rep[rep_mask_hard])
        seg_num_list.append(int(valid_pixel_seg.sum().item()))

    if len(seg_num_list) <= 1:
        return torch.tensor(0.0)

    reco_loss = torch.tensor(0.0)
    seg_proto = torch.cat(seg_proto_list)
    valid_seg = len(seg_num_list)
    seg_len = torch.arange(valid_seg)

    for i in range(valid_seg):
        if len(seg_feat_hard_list[i]) > 0:
            seg_hard_idx = torch.randint(len(seg_feat_hard_list[i]), size=(num_queries,))
            anchor_feat = seg_feat_hard_list[i][seg_hard_idx]
        else:
            continue
        with torch.no_grad():
            seg_mask = torch.cat(([seg_len[i:], seg_len[:i]]))
            proto_sim = torch.cosine_similarity(seg_proto[seg_mask[0]].unsqueeze(0),
                                                seg_proto[seg_mask[1:]], dim=1)
            proto_prob = torch.softmax(proto_sim / temp, dim=0)
            negative_dist = torch.distributions.categorical.Categorical(probs=proto_prob)
            samp_class = negative_dist.sample(sample_shape=[num_queries, num_negatives])
            samp_num = torch.stack([(samp_class == c).sum(1) for c in range(len(proto_prob))],
                                   dim=1)
            negative_num_list = seg_num_list[i + 1:] + seg_num_list[:i]
            negative_index = negative_index_sampler(samp_num, negative_num_list)
            negative_feat_all = torch.cat(seg_feat_all_list[i + 1:] + seg_feat_all_list[:i])
            negative_feat = negative_feat_all[negative_index].reshape(num_queries, num_negatives,
                                                                      num_feat)
            positive_feat = seg_proto[i].unsqueeze(0).unsqueeze(0).repeat(num_queries, 1, 1)
            all_feat = torch.cat((positive_feat, negative_feat), dim=1)
        seg_logits = torch.cosine_similarity(anchor_feat.unsqueeze(1), all_feat, dim=2)
        reco_loss = reco_loss + F.cross_entropy(seg_logits / temp,
                                                torch.zeros(num_queries).long().to(device))
    return reco_loss / valid_seg


def official_inputs(labels, probs, mask=None, ignore_index=255):
    """Our calling form (labels (B, h, w) at feature resolution) -> the official one-hot label
    and mask."""
    C = probs.shape[1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < C)
    if mask is not None:
        valid &= mask.bool()
    onehot = F.one_hot(labels.clamp(0, C - 1).long(), C).permute(0, 3, 1, 2).to(probs.dtype)
    return onehot, valid[:, None].to(probs.dtype)
