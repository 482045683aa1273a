"""Every method pixcon implements, declared once. The trainer (its ``--loss`` choices, default
weights, which runs need a representation head or unlabelled images), the benchmark suite, the
compile scenarios and the cost model (tools/), and the mutation list read this table; the
tests check that each of them covers every method and that the files it names exist.

Adding a method means writing its own files (docs/design.md §1 lists them: spec, reference,
op, kernels if any, nn module, tests, benchmark) and one ``Method`` here. Pure data: this
module imports nothing of pixcon, so every layer may read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str                  # the trainer's --loss, the suite's --only, the cost model's op
    paper: str
    spec: str                  # specs/<name>.md
    reference: str             # pixcon.reference.<module>
    op: str                    # pixcon.ops.<module>: the public loss functions it defines
    losses: tuple              # their names in pixcon.ops
    module: str | None         # the nn.Module the trainer builds (pixcon.nn), None: the op
    tests: str                 # tests/test_<name>.py
    bench: str                 # benchmarks/bench_<name>.py
    train_weight: float        # the trainer's default weight of the loss
    semi_only: bool = False    # trains on unlabelled images only (needs --mode semi)
    representation: bool = False   # contrasts the model's representation head, not features
    scenarios: tuple = ()      # tools.aot scenario names that launch its kernels (prefixes)
    kernels: tuple = ()        # its own Triton modules in pixcon_kernels (shared ones are not)


METHODS = (
    Method("reco", "ReCo (Liu et al., ICLR 2022)", "specs/reco.md", "reco", "reco",
           ("reco_loss",), None, "tests/test_reco.py", "benchmarks/bench_reco.py",
           train_weight=1.0, representation=True, scenarios=("ReCo",), kernels=("reco",)),
    Method("contrastiveseg", "ContrastiveSeg (Wang et al., ICCV 2021)",
           "specs/contrastiveseg.md", "contrastiveseg", "contrastiveseg",
           ("pixel_contrast_loss", "dense_contrast_loss"), "PixelContrastLoss",
           "tests/test_contrastiveseg.py", "benchmarks/bench_contrastiveseg.py",
           train_weight=0.1, scenarios=("ContrastiveSeg",)),
    Method("cac", "CAC (Lai et al., CVPR 2021)", "specs/cac.md", "cac", "cac",
           ("directional_contrast_loss",), "DirectionalContrastLoss", "tests/test_cac.py",
           "benchmarks/bench_cac.py", train_weight=0.1, semi_only=True, scenarios=("CAC",)),
    Method("contextrast", "Contextrast (Sung et al., CVPR 2024)", "specs/contextrast.md",
           "contextrast", "contextrast", ("pixel_anchor_loss", "bane_negatives"),
           "ContextrastLoss", "tests/test_contextrast.py", "benchmarks/bench_contextrast.py",
           train_weight=0.1, scenarios=("Contextrast",), kernels=("anchor", "edt")),
    Method("u2pl", "U2PL (Wang et al., CVPR 2022)", "specs/u2pl.md", "u2pl", "u2pl",
           ("u2pl_loss",), "U2PLLoss", "tests/test_u2pl.py", "benchmarks/bench_u2pl.py",
           train_weight=1.0, semi_only=True, representation=True, scenarios=("U2PL",),
           kernels=("bank",)),
)

BY_NAME = {m.name: m for m in METHODS}
NAMES = tuple(BY_NAME)
