"""pixcon.train: a minimal, honest trainer for the end-to-end claim (DESIGN §6).

DeepLabv3+ with a representation head, supervised or semi-supervised (Mean Teacher + ClassMix,
as the official ReCo pipeline) with any pixcon loss or none, mIoU evaluation, checkpoints that
resume, JSON/Markdown reports, and a parity mode that trains the same seed with the reference
and the fused backend. ``python -m pixcon.train`` (or the ``pixcon`` script) runs the default
comparison on the embedded procedural scenes; see ``pixcon.train.cli``.
"""
from ..workbench.config import Config
from ..workbench.model import DeepLabV3Plus
from ..workbench.protocols import partial_dataset, partial_label_map, partial_labels
from ..workbench.scenes import SceneDataset
from .experiments import compare, parity
from .loop import evaluate, train

__all__ = ["Config", "train", "compare", "parity", "evaluate", "DeepLabV3Plus", "SceneDataset",
           "partial_dataset", "partial_labels", "partial_label_map"]
