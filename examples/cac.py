"""CAC (directional contrast between two overlapping crops) inside a model that returns only
logits: tap the encoder, run both crops, DirectionalContrastLoss holds the projector and a
NegativeBank the negatives. The classifier's logits at the feature stride give the pseudo-labels.
Run: python examples/cac.py --steps 20"""
import torch
import torch.nn.functional as F

from pixcon.data import overlapping_crops
from pixcon.nn import DirectionalContrastLoss, FeatureTap, NegativeBank

from _common import IGNORE, NUM_CLASSES, TinySegNet, args, batches, report

a = args(__doc__)
CROP, STRIDE = 48, 4                                          # the encoder's stride is 4
model = TinySegNet(NUM_CLASSES).to(a.device)
tap = FeatureTap(model, "encoder")                            # (B, 64, h/4, w/4)
crit = DirectionalContrastLoss(in_channels=64, dim=32, stride=STRIDE,
                               pos_threshold=0.5).to(a.device)   # 0.75 once the net is trained
bank = NegativeBank(step_save=1)
opt = torch.optim.SGD([*model.parameters(), *crit.parameters()], lr=0.05, momentum=0.9)
for step, (images, labels) in enumerate(batches(a)):
    pair = overlapping_crops(64, 64, CROP, stride=STRIDE, seed=step)
    views, enc, small = [], [], []
    for (y, x) in (pair.origin1, pair.origin2):
        views.append(model(images[:, :, y:y + CROP, x:x + CROP]))
        enc.append(tap.output)
        small.append(F.avg_pool2d(views[-1], STRIDE))         # logits at the feature grid
    lab = labels[:, pair.origin1[0]:pair.origin1[0] + CROP, pair.origin1[1]:pair.origin1[1] + CROP]
    ce = F.cross_entropy(views[0], lab, ignore_index=IGNORE)  # supervised on view 1 here
    boxes1 = torch.tensor([pair.box1] * len(images))
    boxes2 = torch.tensor([pair.box2] * len(images))
    no_flip = torch.zeros(len(images), dtype=torch.bool)
    cac = crit(enc[0], enc[1], small[0], small[1], boxes1, boxes2, no_flip, no_flip, bank,
               seed=step)
    loss = ce + cac
    opt.zero_grad()
    loss.backward()
    opt.step()
    report(step, ce=ce, cac=cac)
