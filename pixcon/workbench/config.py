"""A run's configuration: everything a training run depends on, read by the trainer and by the
pictures (which rebuild a checkpoint's model from it)."""
from __future__ import annotations

import dataclasses

from .. import methods
from . import protocols


LOSSES = ("none",) + methods.NAMES            # the table of methods: pixcon/methods.py


DEFAULT_WEIGHT = {"none": 0.0, **{m.name: m.train_weight for m in methods.METHODS}}


@dataclasses.dataclass
class Config:
    """Everything a run depends on. Defaults: the embedded scenes with 20 labelled images."""
    dataset: str = "scenes"            # "scenes", "voc:ROOT", "cityscapes:ROOT", "sun:ROOT"
    mode: str = "semi"                 # "sup" (labelled only) or "semi" (Mean Teacher + ClassMix)
    loss: str = "none"                 # "none" or a method of pixcon.methods: "reco",
    #                                    "contrastiveseg", "cac", "contextrast", "u2pl" (cac and
    #                                    u2pl semi only; u2pl also swaps in its unsupervised
    #                                    loss and schedules, specs/u2pl.md §1, §4)
    backend: str = "auto"              # pixcon backend of the contrastive loss
    num_labels: int = 20               # labelled images (class-balanced pick); 0 = all
    partial: str | None = None         # "p0", "p1", "p5", "p25": sparse labels on every image
    min_classes: int = 3               # T of the partial-dataset protocol
    steps: int = 800
    batch_size: int = 8                # labelled and unlabelled images per step (sup: 2x labelled)
    crop: int = 64
    scale: tuple = (0.75, 1.25)        # random rescale of the labelled and the strong view
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    weak_threshold: float = 0.7        # pseudo-label confidence for the contrastive mask
    strong_threshold: float = 0.97     # eta weighting and ReCo's hard-query threshold
    loss_weight: float | None = None   # None: the method's train_weight (pixcon.methods)
    num_queries: int = 64              # ReCo queries per class (official 256)
    num_negatives: int = 128           # ReCo negatives per query (official 512)
    temperature: float = 0.5
    cac_ablation: str = "VIII"         # CAC: a row of the paper's ablation table (VIII = full)
    cac_step_save: int = 1             # CAC: earlier steps kept in the negative bank
    image_level: bool = False          # CAC: the image-level branch (labels from the masks)
    image_level_weight: float = 1.0    # CAC: lambda_w of eq. 10 (the paper gives none)
    memory_size: int = 500             # ContrastiveSeg: queue length per class of its memory
    #                                    bank (official 5000 on Cityscapes; 0: no bank)
    quantize_conf: bool = True         # confidences as k/255 (the official PIL round trip)
    backbone: str = "small"
    rep_dim: int | None = None
    eval_every: int = 100
    eval_batch: int = 50
    seed: int = 0
    device: str = "cpu"
    scene_size: int = 64               # embedded scenes only
    train_length: int | None = None    # embedded scenes only: None = 400 train images
    val_length: int | None = None      # embedded scenes only: None = 100 val images
    out: str | None = None             # folder for checkpoint.pt, report.json, report.md
    resume: bool = False               # continue from out/checkpoint.pt
    stop_at: int | None = None         # stop after this step with a checkpoint (time slices)
    progress: bool = True
    figures: bool = True               # out/figures: prediction panels, relation, dendrogram

    def validate(self):
        if self.mode not in ("sup", "semi"):
            raise ValueError(f"mode must be 'sup' or 'semi', got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.partial is not None and self.partial not in protocols.PARTIAL:
            raise ValueError(f"partial must be one of {tuple(protocols.PARTIAL)}, got {self.partial!r}")
        method = methods.BY_NAME.get(self.loss)
        if method is not None and method.semi_only and self.mode != "semi":
            raise ValueError(f"loss {self.loss!r} trains on unlabelled images (pseudo-labels): "
                             "it needs mode 'semi'")
        if self.loss == "cac":
            from ..nn.cac import ABLATION
            from .model import FEATURE_STRIDE
            if self.cac_ablation not in ABLATION:
                raise ValueError(f"cac_ablation must be one of {tuple(ABLATION)}, got "
                                 f"{self.cac_ablation!r}")
            if self.crop % FEATURE_STRIDE.get(self.backbone, 8):
                raise ValueError(f"loss 'cac' needs crop to be a multiple of the feature stride "
                                 f"{FEATURE_STRIDE.get(self.backbone, 8)}, got {self.crop}")
        elif self.image_level:
            raise ValueError("image_level is CAC's extension: it needs loss 'cac'")
        for name in ("steps", "batch_size", "crop", "eval_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_labels < 0:
            raise ValueError(f"num_labels must be >= 0 (0 = all), got {self.num_labels}")
        if self.resume and not self.out:
            raise ValueError("resume needs out (the folder holding checkpoint.pt)")

    @property
    def weight(self) -> float:
        return DEFAULT_WEIGHT[self.loss] if self.loss_weight is None else self.loss_weight
