"""ReCo (regional contrast) inside a model that returns only logits: tap the decoder, add
ReCo's representation head, add the loss. Run: python examples/reco.py --steps 20"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixcon.nn import FeatureTap, ReCoLoss

from _common import IGNORE, NUM_CLASSES, TinySegNet, args, batches, report

a = args(__doc__)
model = TinySegNet(NUM_CLASSES).to(a.device)
tap = FeatureTap(model, "decoder")                            # (B, 32, 16, 16) each forward
head = nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                     nn.Conv2d(32, 64, 1)).to(a.device)       # ReCo's representation head
crit = ReCoLoss(num_queries=64, num_negatives=128, strong_threshold=0.97)
opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
for step, (images, labels) in enumerate(batches(a)):
    logits = model(images)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    rep = head(tap.output)
    probs = F.interpolate(logits, size=rep.shape[-2:], mode="bilinear",
                          align_corners=False).softmax(1)     # the student's, at rep's size
    reco = crit(rep, labels, probs.detach(), seed=step)
    loss = ce + reco
    opt.zero_grad()
    loss.backward()
    opt.step()
    report(step, ce=ce, reco=reco)
