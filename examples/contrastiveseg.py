"""ContrastiveSeg (pixel contrast with a memory bank) inside a model that returns only logits:
tap the decoder; PixelContrastLoss holds the projection head and the bank.
Run: python examples/contrastiveseg.py --steps 20"""
import torch
import torch.nn.functional as F

from pixcon.nn import FeatureTap, PixelContrastLoss

from _common import IGNORE, NUM_CLASSES, TinySegNet, args, batches, report

a = args(__doc__)
model = TinySegNet(NUM_CLASSES).to(a.device)
tap = FeatureTap(model, "decoder")
crit = PixelContrastLoss(in_channels=32, num_classes=NUM_CLASSES, dim=64, memory_size=200,
                         max_samples=256, max_views=16, ignore_index=IGNORE).to(a.device)
opt = torch.optim.SGD([*model.parameters(), *crit.parameters()], lr=0.05, momentum=0.9)
for step, (images, labels) in enumerate(batches(a)):
    logits = model(images)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    contrast = crit(tap.output, labels, logits, seed=step)   # then enqueues into its bank
    loss = ce + 0.1 * contrast
    opt.zero_grad()
    loss.backward()
    opt.step()
    report(step, ce=ce, contrast=contrast)
