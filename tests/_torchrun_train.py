"""Run by tests/test_distributed.py under torchrun: a few steps of pixcon.train's Trainer, then
each rank saves what it ends with (argv: output folder, loss)."""
import sys

import torch

from pixcon import distributed as pdist
from pixcon.train.cli import TINY
from pixcon.train.loop import Config, Trainer

out, loss = sys.argv[1], sys.argv[2]
cfg = Config(**{**TINY, "steps": 3, "eval_every": 3}, loss=loss, progress=False)
trainer = Trainer(cfg)
init = {k: v.clone() for k, v in trainer.student.state_dict().items()}
trainer.run()
torch.save({"rank": trainer.rank, "world": trainer.world, "init": init,
            "student": trainer.student.state_dict(),
            "teacher": trainer.teacher.model.state_dict() if trainer.teacher else {},
            "extra": trainer.extra.state_dict() if trainer.extra is not None else {},
            "bank": trainer.bank.negatives() if trainer.bank is not None else None,
            "losses": [h["loss"] for h in trainer.history]}, f"{out}/rank{trainer.rank}.pt")
pdist.shutdown()
pdist.exit_now(0)          # no interpreter teardown for gloo's threads to abort
