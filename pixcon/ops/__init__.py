"""pixcon's public functional API. Every op validates its arguments, picks a backend and calls
an autograd-aware fused path or the pure-PyTorch reference."""
from .primitives import (class_means, philox, sample_hard_queries, sample_negatives,
                         sparse_infonce)
from .reco import reco_inputs_from_official, reco_loss

__all__ = ["reco_loss", "reco_inputs_from_official", "class_means", "philox",
           "sample_hard_queries", "sample_negatives", "sparse_infonce"]
from .edt import distance_transform  # noqa: E402

__all__ += ["distance_transform"]
from .contextrast import bane_negatives, pixel_anchor_loss  # noqa: E402

__all__ += ["bane_negatives", "pixel_anchor_loss"]
from .contrastiveseg import dense_contrast_loss, pixel_contrast_loss  # noqa: E402
from .tiled import negative_logsumexp, supervised_contrast  # noqa: E402
from .cac import directional_contrast_loss, overlap_rows  # noqa: E402

__all__ += ["pixel_contrast_loss", "dense_contrast_loss", "supervised_contrast",
            "negative_logsumexp", "directional_contrast_loss", "overlap_rows"]
from .u2pl import u2pl_loss, u2pl_masks, u2pl_unsupervised_loss  # noqa: E402

__all__ += ["u2pl_loss", "u2pl_masks", "u2pl_unsupervised_loss"]
