"""U2PL (unreliable pixels as negatives, class queues) inside a model that returns only logits:
a mean-teacher copy of the model with its own tap gives the probabilities and representation
U2PLLoss needs; the loss holds the queues. Labelled and unlabelled images in one batch (the
first half labelled). Run: python examples/u2pl.py --steps 20"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixcon.nn import FeatureTap, U2PLLoss

from _common import IGNORE, NUM_CLASSES, TinySegNet, args, batches, report

a = args(__doc__)
model = TinySegNet(NUM_CLASSES).to(a.device)
head = nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                     nn.Conv2d(32, 64, 1)).to(a.device)      # U2PL's representation head
teacher, teacher_head = copy.deepcopy(model), copy.deepcopy(head)
tap = FeatureTap(model, "decoder")
teacher_tap = FeatureTap(teacher, "decoder", detach=True)
crit = U2PLLoss(NUM_CLASSES, 64, size=500, num_queries=32, num_negatives=16,
                ignore_index=IGNORE)
opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
for step, (images, labels) in enumerate(batches(a)):
    n = len(images) // 2                                      # labelled: the first half
    logits = model(images)
    ce = F.cross_entropy(logits[:n], labels[:n], ignore_index=IGNORE)
    rep = head(tap.output)
    with torch.no_grad():
        t_logits = teacher(images)
        t_rep = teacher_head(teacher_tap.output)
        t_probs = F.interpolate(t_logits, size=rep.shape[-2:], mode="bilinear",
                                align_corners=False).softmax(1)
    # labels: ground truth for the labelled half, the teacher's pseudo-labels for the rest
    pseudo = F.interpolate(t_logits, size=labels.shape[-2:], mode="bilinear",
                           align_corners=False).argmax(1)
    targets = torch.cat([labels[:n], pseudo[n:]])
    alpha = 20 * (1 - step / a.steps)                         # alpha_t, the entropy percentile
    u2pl = crit(rep, targets, t_probs, t_rep, num_labeled=n, alpha=alpha, seed=step)
    loss = ce + 0.1 * u2pl
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():                                     # the mean teacher, decay 0.99
        for t, s in zip([*teacher.parameters(), *teacher_head.parameters()],
                        [*model.parameters(), *head.parameters()]):
            t.mul_(0.99).add_(s, alpha=0.01)
    report(step, ce=ce, u2pl=u2pl)
