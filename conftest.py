"""Root conftest: TRITON_INTERPRET must be set before anything imports triton (DESIGN §4)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
