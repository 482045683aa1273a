"""Contextrast (contextual contrast across layers, boundary-aware negatives) inside a model that
returns only logits: tap two layers, shallow to deep; ContextrastLoss holds a head per layer.
Run: python examples/contextrast.py --steps 20"""
import torch
import torch.nn.functional as F

from pixcon.nn import ContextrastLoss, FeatureTap

from _common import IGNORE, NUM_CLASSES, TinySegNet, args, batches, report

a = args(__doc__)
model = TinySegNet(NUM_CLASSES).to(a.device)
tap = FeatureTap(model, "encoder.1", "encoder.3")             # 32 and 64 channels
crit = ContextrastLoss(in_channels=(32, 64), dim=64, layer_weights=(0.7, 1.0),
                       ignore_index=IGNORE).to(a.device)
opt = torch.optim.SGD([*model.parameters(), *crit.parameters()], lr=0.05, momentum=0.9)
for step, (images, labels) in enumerate(batches(a)):
    logits = model(images)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    contrast = crit(tap.outputs, labels, logits.detach())
    loss = ce + 0.1 * contrast
    opt.zero_grad()
    loss.backward()
    opt.step()
    report(step, ce=ce, contrast=contrast)
