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
from .. import methods, ops
from ..progress import Progress
from ..nn import ContextrastLoss, NegativeBank
from . import metrics
from . import semisup as ss
from ..workbench import protocols
from ..workbench.checkpoint import read_checkpoint, write_checkpoint
from ..workbench.config import Config
from ..workbench.data import load_dataset, normalize_images, same_size_batches, upsample
from ..workbench.model import DeepLabV3Plus


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


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of step ``step`` on process ``rank`` (rank 0: the single-process run)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step + rank * 7_919_000_003) % (2**63))


# --- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, ds, device, batch: int = 50) -> dict:
    """mIoU of ``model`` (put in eval mode, then restored) over ``ds``: logits upsampled
    bilinearly (align_corners=True) to the label size, confusion matrix over 0..C-1."""
    was = model.training
    model.eval()
    conf = torch.zeros(ds.num_classes, ds.num_classes, dtype=torch.int64)
    for x, y in same_size_batches(ds, batch):
        logits = upsample(model(normalize_images(x.to(device))).logits, y.shape[-2:])
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
        method = methods.BY_NAME.get(cfg.loss)
        self.student = DeepLabV3Plus(C, backbone=cfg.backbone, rep_dim=cfg.rep_dim,
                                     representation=method is not None and method.representation
                                     ).to(self.device)
        self.extra = None
        self.bank = None
        if cfg.loss == "contextrast":
            self.extra = ContextrastLoss(in_channels=self.student.backbone.channels,
                                         dim=self.student.rep_dim,
                                         backend=cfg.backend).to(self.device)
        elif cfg.loss == "contrastiveseg":     # its projection head and memory bank
            from ..nn import PixelContrastLoss
            from ..workbench.model import FEATURE_STRIDE
            fh = cfg.crop // FEATURE_STRIDE.get(cfg.backbone, 8)
            self.extra = PixelContrastLoss(
                self.student.backbone.channels[-1], C, self.student.rep_dim,
                memory_size=cfg.memory_size or None, ignore_index=self.train_ds.ignore_index,
                max_views=max(1, fh * fh // 8), backend=cfg.backend).to(self.device)
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
        if cfg.out:
            _check_writable(cfg.out)
        if cfg.resume:                    # on purpose: a missing checkpoint is an error
            if not os.path.isfile(self.ckpt_path):
                raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path} (run "
                                        "without --resume to start fresh)")
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
        if cfg.loss == "contrastiveseg":         # samples anchors: the step's seed
            return self.extra_net(out.features, lab, out.logits, seed=seed, backend=backend)
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
        out_l = self.net(normalize_images(xl))
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
                pu = upsample(self.teacher.model(normalize_images(xu)).logits, crop)
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
            out_u = self.net(normalize_images(xu))
            if cfg.loss == "u2pl":      # the teacher on both augmented halves; the schedules
                with torch.no_grad():
                    out_t = self.teacher.model(normalize_images(torch.cat([xl, xu])))
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
        if cfg.loss in ("reco", "contextrast", "contrastiveseg"):
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
        write_checkpoint(state, path)

    def load(self, path):
        state = read_checkpoint(path, map_location=self.device)
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


def _check_writable(out: str):
    """--out exists (made if needed) and takes files, checked before the first step."""
    try:
        os.makedirs(out, exist_ok=True)
        # a name of this process's own: every rank of a torchrun job probes the same folder
        probe = os.path.join(out, f".pixcon-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, f"--out {out} is not writable: {e.strerror or e} (checkpoints "
                      "and reports go there; choose another folder or --no-save)") from e


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


