"""Pure-PyTorch references, one module per method, written to read like the method's equations.
They never import kernels; they are the ground truth of the tests and a benchmark provider."""
from . import cac, common, contextrast, contrastiveseg, edt, rng, u2pl
from .reco import reco_loss

__all__ = ["cac", "common", "contextrast", "contrastiveseg", "edt", "rng", "u2pl", "reco_loss"]
