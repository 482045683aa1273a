"""The training loop: supervised or semi-supervised (Mean Teacher + ClassMix, specs/reco.md
§2.2) with any pixcon loss or none, mIoU evaluation, checkpoints that resume, JSON/Markdown
reports and a parity mode (same run on the reference and the fused backend).

Every random choice of step t (batch indices, augmentations, ClassMix, the loss's sampling seed)
comes from a generator seeded by (seed, t), so a resumed run repeats an uninterrupted one and
two backends see the same data.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as pdist
from .. import ops
from ..progress import Progress
from ..nn import ContextrastLoss, NegativeBank
from . import metrics, protocols
from . import semisup as ss
from .model import DeepLabV3Plus

LOSSES = ("none", "reco", "contextrast", "cac", "u2pl")
DEFAULT_WEIGHT = {"none": 0.0, "reco": 1.0, "contextrast": 0.1, "cac": 0.1, "u2pl": 1.0}


@dataclasses.dataclass
class Config:
    """Everything a run depends on. Defaults: the embedded scenes with 20 labelled images."""
    dataset: str = "scenes"            # "scenes", "voc:ROOT", "cityscapes:ROOT", "sun:ROOT"
    mode: str = "semi"                 # "sup" (labelled only) or "semi" (Mean Teacher + ClassMix)
    loss: str = "none"                 # "none", "reco", "contextrast", "cac" or "u2pl" (the
    #                                    last two semi only; u2pl also swaps in its unsupervised
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
    loss_weight: float | None = None   # None: 1.0 for reco, 0.1 for contextrast and cac
    num_queries: int = 64              # ReCo queries per class (official 256)
    num_negatives: int = 128           # ReCo negatives per query (official 512)
    temperature: float = 0.5
    cac_ablation: str = "VIII"         # CAC: a row of the paper's ablation table (VIII = full)
    cac_step_save: int = 1             # CAC: earlier steps kept in the negative bank
    image_level: bool = False          # CAC: the image-level branch (labels from the masks)
    image_level_weight: float = 1.0    # CAC: lambda_w of eq. 10 (the paper gives none)
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
        if self.loss == "cac":
            from ..nn.cac import ABLATION
            from .cac import FEATURE_STRIDE
            if self.mode != "semi":
                raise ValueError("loss 'cac' trains on unlabelled images: it needs mode 'semi'")
            if self.cac_ablation not in ABLATION:
                raise ValueError(f"cac_ablation must be one of {tuple(ABLATION)}, got "
                                 f"{self.cac_ablation!r}")
            if self.crop % FEATURE_STRIDE.get(self.backbone, 8):
                raise ValueError(f"loss 'cac' needs crop to be a multiple of the feature stride "
                                 f"{FEATURE_STRIDE.get(self.backbone, 8)}, got {self.crop}")
        elif self.image_level:
            raise ValueError("image_level is CAC's extension: it needs loss 'cac'")
        if self.loss == "u2pl" and self.mode != "semi":
            raise ValueError("loss 'u2pl' contrasts unreliable pseudo-labels: it needs mode 'semi'")
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


# --- data ------------------------------------------------------------------------------------
def load_dataset(cfg: Config, split: str):
    if cfg.dataset == "scenes":
        from .scenes import SceneDataset
        length = cfg.train_length if split == "train" else cfg.val_length
        # fixed splits: the scenes do not depend on the run's seed
        return SceneDataset(split, seed=0, size=cfg.scene_size, length=length)
    from .folders import load_folder
    return load_folder(cfg.dataset, split)


class Splits:
    """Labelled / unlabelled index lists of the training set, with sparse label maps in partial
    mode (then every image is both labelled, sparsely, and unlabelled)."""

    def __init__(self, ds, cfg: Config):
        n, self.sparse = len(ds), None
        if cfg.partial is not None:
            self.labelled = self.unlabelled = list(range(n))
            load = getattr(ds, "load_label", None)       # folders: no image decoding
            labels = [load(i) if load else ds[i][1] for i in range(n)]
            maps = protocols.partial_labels(ds.ids, labels, cfg.partial,
                                            num_classes=ds.num_classes, seed=cfg.seed)
            self.sparse = [torch.as_tensor(m) for m in maps]
        elif cfg.num_labels == 0 or cfg.num_labels >= n:
            self.labelled = self.unlabelled = list(range(n))
        else:
            pos = {k: i for i, k in enumerate(ds.ids)}
            lab, unl = protocols.partial_dataset(ds.ids, lambda k: ds.classes_of(pos[k]),
                                                 cfg.num_labels, ds.num_classes, seed=cfg.seed,
                                                 min_classes=cfg.min_classes)
            self.labelled = [pos[k] for k in lab]
            self.unlabelled = [pos[k] for k in unl]

    def fetch(self, ds, idx):
        """Images and labels (the sparse maps in partial mode) of ``idx``, as lists."""
        items = [ds[i] for i in idx]
        labels = [it[1] if self.sparse is None else self.sparse[i] for i, it in zip(idx, items)]
        return [it[0] for it in items], labels


def same_size_batches(ds, batch: int):
    """(images (b, 3, H, W), labels (b, H, W)) over ``ds`` in order, each batch at most
    ``batch`` consecutive images of one size (folder datasets mix sizes)."""
    items = []
    for i in range(len(ds)):
        it = ds[i]
        if items and (len(items) == batch or it[0].shape != items[0][0].shape):
            yield torch.stack([t[0] for t in items]), torch.stack([t[1] for t in items])
            items = []
        items.append(it)
    if items:
        yield torch.stack([t[0] for t in items]), torch.stack([t[1] for t in items])


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of step ``step`` on process ``rank`` (rank 0: the single-process run)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step + rank * 7_919_000_003) % (2**63))


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# --- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, ds, device, batch: int = 50) -> dict:
    """mIoU of ``model`` (put in eval mode, then restored) over ``ds``: logits upsampled
    bilinearly (align_corners=True) to the label size, confusion matrix over 0..C-1."""
    was = model.training
    model.eval()
    conf = torch.zeros(ds.num_classes, ds.num_classes, dtype=torch.int64)
    for x, y in same_size_batches(ds, batch):
        logits = upsample(model(ss.normalize_images(x.to(device))).logits, y.shape[-2:])
        conf += metrics.confusion_matrix(logits.argmax(1).cpu(), y, ds.num_classes)
    model.train(was)
    iou = metrics.iou_per_class(conf)
    return {"miou": metrics.mean_iou(conf), "iou": [None if math.isnan(v) else v
                                                    for v in iou.tolist()]}


# --- training --------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, train_ds=None, val_ds=None, shadow_backend=None):
        cfg.validate()
        self.cfg, self.shadow_backend = cfg, shadow_backend
        # under torchrun: one process per device, a process group, DDP below (batch_size per process)
        self.rank, self.world, self.device = pdist.init_from_env(cfg.device)
        if self.world > 1 and shadow_backend is not None:
            raise ValueError("parity mode runs in one process, not under torchrun")
        self.train_ds = train_ds if train_ds is not None else load_dataset(cfg, "train")
        self.val_ds = val_ds if val_ds is not None else load_dataset(cfg, "val")
        self.splits = Splits(self.train_ds, cfg)
        C = self.train_ds.num_classes
        torch.manual_seed(cfg.seed)
        self.student = DeepLabV3Plus(C, backbone=cfg.backbone, rep_dim=cfg.rep_dim,
                                     representation=cfg.loss in ("reco", "u2pl")
                                     ).to(self.device)
        self.extra = None
        self.bank = None
        if cfg.loss == "contextrast":
            self.extra = ContextrastLoss(in_channels=self.student.backbone.channels,
                                         dim=self.student.rep_dim,
                                         backend=cfg.backend).to(self.device)
        elif cfg.loss == "cac":
            from .cac import FEATURE_STRIDE, CACBranch
            self.extra = CACBranch(self.student.backbone.channels[-1], self.student.rep_dim, C,
                                   ablation=cfg.cac_ablation, image_level=cfg.image_level,
                                   image_level_weight=cfg.image_level_weight,
                                   stride=FEATURE_STRIDE[cfg.backbone],
                                   backend=cfg.backend).to(self.device)
            self.bank = NegativeBank(step_save=cfg.cac_step_save)
        elif cfg.loss == "u2pl":           # its queues (30,000 keys a class) live in the module
            from ..nn import U2PLLoss
            self.extra = U2PLLoss(C, self.student.rep_dim, num_queries=cfg.num_queries,
                                  num_negatives=cfg.num_negatives, temperature=cfg.temperature,
                                  ignore_index=self.train_ds.ignore_index,
                                  backend=cfg.backend).to(self.device)
        self.net, self.extra_net = self._ddp(self.student), self._ddp(self.extra)
        params = list(self.student.parameters()) + \
            (list(self.extra.parameters()) if self.extra is not None else [])
        self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                   weight_decay=cfg.weight_decay)
        self.teacher = ss.MeanTeacher(self.student) \
            if cfg.mode == "semi" and cfg.loss != "cac" else None
        self.step, self.history, self.evals = 0, [], []
        if cfg.resume and os.path.isfile(self.ckpt_path):
            self.load(self.ckpt_path)

    def _ddp(self, module):
        """DistributedDataParallel under torchrun (no find_unused_parameters: every pixcon loss
        stays connected to the graph), the module itself in one process."""
        if module is None or self.world == 1 or \
                not any(p.requires_grad for p in module.parameters()):
            return module                # (CAC without its projector has no parameter)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    @property
    def main_process(self):
        return self.rank == 0

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg.out, "checkpoint.pt") if self.cfg.out else None

    @property
    def eval_model(self):
        return self.teacher.model if self.teacher is not None else self.student

    def lr_at(self, step):
        """Poly decay (power 0.9, floor 1e-6) over the run, as the official PolyLR."""
        return max(self.cfg.lr * (1 - step / self.cfg.steps) ** 0.9, 1e-6)

    def contrast_loss(self, out, labels, probs, mask, seed, backend=None):
        cfg = self.cfg
        backend = cfg.backend if backend is None else backend
        if cfg.loss == "reco":
            return ops.reco_loss(out.rep, labels, probs, mask=mask, seed=seed,
                                 backend=backend, strong_threshold=cfg.strong_threshold,
                                 temperature=cfg.temperature, num_queries=cfg.num_queries,
                                 num_negatives=cfg.num_negatives)
        lab = torch.where(mask, labels, self.train_ds.ignore_index)
        return self.extra_net(out.features, lab, out.logits, backend=backend)

    def train_step(self):
        cfg, dev, ignore = self.cfg, self.device, self.train_ds.ignore_index
        g = step_generator(cfg.seed, self.step, self.rank)
        seed = int(torch.randint(2**62, (), generator=g))            # the loss's sampling seed
        crop = (cfg.crop, cfg.crop)
        nl = cfg.batch_size * (2 if cfg.mode == "sup" else 1)
        il = [self.splits.labelled[int(k)] for k in
              torch.randint(len(self.splits.labelled), (nl,), generator=g)]
        xl, yl, _ = ss.rescale_crop(*self.splits.fetch(self.train_ds, il), crop=crop,
                                    scale=cfg.scale, ignore_index=ignore, generator=g)
        xl, yl, _ = ss.photometric(xl, yl, generator=g)
        xl, yl = xl.to(dev), yl.to(dev)
        for pg in self.opt.param_groups:
            pg["lr"] = self.lr_at(self.step)
        self.student.train()
        out_l = self.net(ss.normalize_images(xl))
        sup = F.cross_entropy(upsample(out_l.logits, crop), yl, ignore_index=ignore)
        parts = {"sup": sup}
        if cfg.loss == "cac":
            from .cac import cac_step
            parts.update(cac_step(self, g, seed))
        elif cfg.mode == "semi":
            iu = [self.splits.unlabelled[int(k)] for k in
                  torch.randint(len(self.splits.unlabelled), (cfg.batch_size,), generator=g)]
            xu, gu, _ = ss.rescale_crop(*self.splits.fetch(self.train_ds, iu), crop=crop,
                                        ignore_index=ignore, generator=g)
            xu = xu.to(dev)
            with torch.no_grad():                                       # teacher in train mode
                self.teacher.model.train()
                pu = upsample(self.teacher.model(ss.normalize_images(xu)).logits, crop)
                conf, pl = torch.softmax(pu, dim=1).max(dim=1)
                if self.splits.sparse is not None:                      # partial: GT overrides
                    gu = gu.to(dev)
                    pl = torch.where(gu != ignore, gu, pl)
                    conf = torch.where(gu != ignore, torch.ones_like(conf), conf)
                if cfg.quantize_conf:
                    conf = ss.quantize_conf(conf)
            xu, pl, conf = ss.rescale_crop(xu.cpu(), pl.cpu(), conf.cpu(), crop=crop,
                                           scale=cfg.scale, ignore_index=ignore, generator=g)
            xu, pl, conf = ss.classmix(xu, pl, conf, generator=g)
            xu, pl, conf = ss.photometric(xu, pl, conf, generator=g)
            xu, pl, conf = xu.to(dev), pl.to(dev), conf.to(dev)
            out_u = self.net(ss.normalize_images(xu))
            if cfg.loss == "u2pl":      # the teacher on both augmented halves; the schedules
                with torch.no_grad():
                    out_t = self.teacher.model(ss.normalize_images(torch.cat([xl, xu])))
                frac = 1.0 - self.step / cfg.steps          # alpha_t, the dropped share
                parts["unsup"] = ops.u2pl_unsupervised_loss(
                    upsample(out_u.logits, crop), pl, upsample(out_t.logits[nl:], crop),
                    100.0 - 20.0 * frac, ignore_index=ignore)
            else:
                parts["unsup"] = ss.unsupervised_loss(upsample(out_u.logits, crop), pl, conf,
                                                      strong_threshold=cfg.strong_threshold,
                                                      ignore_index=ignore)
            if cfg.loss != "none":
                out = out_l._replace(
                    logits=torch.cat([out_l.logits, out_u.logits]),
                    rep=None if out_l.rep is None else torch.cat([out_l.rep, out_u.rep]),
                    features=[torch.cat([a, b]) for a, b in zip(out_l.features, out_u.features)])
                labels = torch.cat([yl, pl])
                mask = torch.cat([yl != ignore, conf >= cfg.weak_threshold])
        elif cfg.loss != "none":
            out, labels, mask = out_l, yl, yl != ignore
        if cfg.loss == "u2pl":
            parts["contrast"] = self.extra(
                out.rep, labels, torch.softmax(out_t.logits.float(), dim=1), out_t.rep,
                num_labeled=nl, alpha=20.0 * frac, seed=seed)
        if cfg.loss in ("reco", "contextrast"):
            probs = torch.softmax(out.logits.detach().float(), dim=1)
            parts["contrast"] = self.contrast_loss(out, labels, probs, mask, seed)
            if self.shadow_backend is not None:     # parity: the other backend, same inputs
                with torch.no_grad():
                    shadow = self.contrast_loss(out, labels, probs, mask, seed,
                                                backend=self.shadow_backend)
        loss = sum(v * (cfg.weight if k == "contrast" else 1.0) for k, v in parts.items())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.teacher is not None:
            self.teacher.update(self.student)
        rec = {"step": self.step, "loss": float(loss.detach()), "lr": self.lr_at(self.step)}
        rec.update({k: float(v.detach()) for k, v in parts.items()})
        if self.shadow_backend is not None and cfg.loss in ("reco", "contextrast"):
            rec["shadow_contrast"] = float(shadow)
        self.history.append(rec)
        self.step += 1
        return rec

    def run(self) -> dict:
        cfg = self.cfg
        if cfg.out:
            os.makedirs(cfg.out, exist_ok=True)
        t0 = time.time()
        last = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
        label = f"{cfg.mode}+{cfg.loss}" if cfg.loss != "none" else cfg.mode
        if cfg.backend != "auto":                 # parity's two runs, told apart
            label += f" [{cfg.backend}]"
        bar = Progress(last, label, cfg.progress and self.main_process)
        bar.update(self.step)
        while self.step < last:
            rec = self.train_step()
            if (self.step % cfg.eval_every == 0 or self.step == cfg.steps) and self.main_process:
                ev = evaluate(self.eval_model, self.val_ds, self.device, cfg.eval_batch)
                self.evals.append({"step": self.step, **ev})
                if cfg.out:
                    self.save(self.ckpt_path)
            miou = f"mIoU {100 * self.evals[-1]['miou']:.1f}" if self.evals else ""
            bar.update(self.step, f"loss {rec['loss']:.3f} {miou}")
        bar.close()
        self.sync_buffers()
        if cfg.out and self.main_process and self.step == last and \
                (not self.evals or self.evals[-1]["step"] != last):
            self.save(self.ckpt_path)
        report = self.report(time.time() - t0)
        if cfg.out and self.main_process:
            write_report(report, Path(cfg.out) / "report")
            if cfg.figures:
                self.write_figures(Path(cfg.out) / "figures")
        return report

    def write_figures(self, out: Path):
        """The evaluated model's prediction panels, class relation and dendrogram on the
        validation split (pixcon.viz); a one-line note instead when matplotlib is missing."""
        from ..viz import write_figures
        from ..viz.cli import palette_of
        which = f"{'teacher' if self.teacher is not None else 'student'} at step {self.step}, "
        which += f"{self.cfg.mode}+{self.cfg.loss} on {self.cfg.dataset}"
        try:
            write_figures(self.eval_model, self.val_ds, out, which=which,
                          palette_name=palette_of(self.cfg), device=self.device)
        except ImportError as e:
            print(f"pixcon.train: no figures ({e})", file=sys.stderr)

    def sync_buffers(self):
        """Rank 0's BatchNorm statistics everywhere (DDP broadcasts the student's at each forward,
        so after the last one each rank holds its own; the teacher's accumulate per rank)."""
        for m in (self.student, self.extra, self.eval_model):
            if m is not None:
                pdist.broadcast_state(m)

    def report(self, seconds) -> dict:
        final = self.evals[-1] if self.evals else None
        best = max(self.evals, key=lambda e: e["miou"]) if self.evals else None
        return {"config": dataclasses.asdict(self.cfg), "steps_done": self.step,
                "world_size": self.world,
                "seconds": seconds, "num_labelled": len(self.splits.labelled),
                "final_miou": final["miou"] if final else None,
                "best_miou": best["miou"] if best else None,
                "best_step": best["step"] if best else None,
                "class_names": list(self.train_ds.class_names),
                "final_iou": final["iou"] if final else None,
                "evals": self.evals, "history": self.history}

    def save(self, path):
        state = {"config": dataclasses.asdict(self.cfg), "step": self.step,
                 "student": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                 "teacher": self.teacher.state_dict() if self.teacher else None,
                 "extra": self.extra.state_dict() if self.extra is not None else None,
                 "bank": self.bank.state_dict() if self.bank is not None else None,
                 "history": self.history, "evals": self.evals}
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self, path):
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = state["config"]
        for k in ("dataset", "mode", "loss", "seed", "steps", "backbone", "num_labels", "partial"):
            if saved[k] != getattr(self.cfg, k):
                raise ValueError(f"cannot resume from {path}: it was trained with {k}="
                                 f"{saved[k]!r}, this run has {getattr(self.cfg, k)!r}")
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        if self.extra is not None:
            self.extra.load_state_dict(state["extra"])
        if self.bank is not None and state.get("bank") is not None:
            self.bank.load_state_dict(state["bank"])
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]


def train(cfg: Config, **datasets) -> dict:
    """Train one configuration; returns the report (also written to cfg.out when set)."""
    return Trainer(cfg, **datasets).run()


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def write_report(report: dict, stem: Path):
    """report.json (everything) and report.md (summary, per-class IoU)."""
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    cfg = report["config"]
    lines = [f"# pixcon.train: {cfg['mode']} + {cfg['loss']} on {cfg['dataset']}", "",
             f"{report['steps_done']} steps, {report['num_labelled']} labelled images, "
             f"seed {cfg['seed']}, backend {cfg['backend']}, {report['seconds']:.0f} s", "",
             f"final mIoU {_pct(report['final_miou'])}, best {_pct(report['best_miou'])} "
             f"(step {report['best_step']})", "", "| class | IoU |", "|---|---|"]
    for name, v in zip(report["class_names"], report["final_iou"] or []):
        lines.append(f"| {name} | {_pct(v)} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


# --- comparisons -----------------------------------------------------------------------------
COMPARE_ROWS = (("supervised CE", dict(mode="sup", loss="none")),
                ("semi-supervised CE (Mean Teacher + ClassMix)", dict(mode="semi", loss="none")),
                ("semi-supervised CE + ReCo", dict(mode="semi", loss="reco")))


def compare(cfg: Config, rows=COMPARE_ROWS) -> dict:
    """The README's main job: the same data, labels and seed trained as each row's mode and loss.
    Returns {"rows": [{"name", "final_miou", "best_miou", "seconds"}], "table": markdown}."""
    train_ds, val_ds = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    out = []
    for name, over in rows:
        sub = dataclasses.replace(cfg, **over,
                                  out=os.path.join(cfg.out, over["mode"] + "-" + over["loss"])
                                  if cfg.out else None)
        rep = train(sub, train_ds=train_ds, val_ds=val_ds)
        out.append({"name": name, "final_miou": rep["final_miou"], "best_miou": rep["best_miou"],
                    "seconds": rep["seconds"], "num_labelled": rep["num_labelled"]})
    head = (f"{cfg.dataset}, {out[0]['num_labelled']} labelled images, {cfg.steps} steps, seed "
            f"{cfg.seed}")
    lines = [f"| {head} | final mIoU % | best mIoU % | time s |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {_pct(r['final_miou'])} | {_pct(r['best_miou'])} | "
              f"{r['seconds']:.0f} |" for r in out]
    result = {"rows": out, "table": "\n".join(lines), "config": dataclasses.asdict(cfg)}
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        Path(cfg.out, "compare.json").write_text(json.dumps(result, indent=1))
        Path(cfg.out, "compare.md").write_text(result["table"] + "\n")
    return result


def parity(cfg: Config, backends=("triton", "reference")) -> dict:
    """The fused path against the reference, two ways.

    - lockstep: one run trained with ``backends[0]``; at every step the contrastive loss is also
      computed by ``backends[1]`` on the identical inputs (weights, batch, sampling seed). Its
      largest difference is the parity measure: both paths draw the same samples, so it is
      fp32 rounding (~1e-6).
    - trajectories: a second, independent run trained with ``backends[1]``; both final mIoUs and
      the largest per-step difference between the runs are reported. The runs drift apart
      (rounding moves a pixel across the hard-query threshold or the confidence mask, which
      changes discrete samples), so this is information, not a tolerance.
    """
    if cfg.loss not in ("reco", "contextrast"):
        raise ValueError("parity needs loss='reco' or 'contextrast'")
    train_ds, val_ds = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    reps = {}
    for k, be in enumerate(backends):
        sub = dataclasses.replace(cfg, backend=be, out=os.path.join(cfg.out, be) if cfg.out else None)
        reps[be] = Trainer(sub, train_ds, val_ds,
                           shadow_backend=backends[1] if k == 0 else None).run()
    a, b = (reps[be]["history"] for be in backends)
    res = {"backends": list(backends),
           "miou": {be: reps[be]["final_miou"] for be in backends},
           "lockstep_max_contrast_diff": max(abs(x["contrast"] - x["shadow_contrast"]) for x in a),
           "trajectory_max_contrast_diff": max(abs(x["contrast"] - y["contrast"])
                                               for x, y in zip(a, b)),
           "trajectory_max_loss_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)),
           "steps": len(a), "config": dataclasses.asdict(cfg)}
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        Path(cfg.out, "parity.json").write_text(json.dumps(res, indent=1))
    return res
