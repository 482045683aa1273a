"""pixcon.viz: the seed papers' pictures for any trained model, as PNG (matplotlib, the ``viz``
extra; t-SNE through scikit-learn, the ``tsne`` extra). Nothing is imported until used.

- ``prediction_panels``: image, ground truth and several models' predictions side by side
  (ReCo's qualitative figure), VOC / Cityscapes / SUN RGB-D palettes, the ignore label shown.
- ``class_relation`` + ``relation_png`` / ``dendrogram_png``: ReCo's class relation graph and
  its hierarchy.
- ``embedding_tsne``: a class-balanced sample of pixel embeddings in 2-D (ContrastiveSeg's
  cross-entropy vs contrastive figure).
- ``error_distance_curve`` + ``error_distance_png``: Contextrast's Figure 5, error pixels'
  cosine to the class anchors by distance to the error boundary, per layer.

``python -m pixcon.viz CHECKPOINT`` draws them for a pixcon.train checkpoint (see ``cli``).
"""
from .cli import load_checkpoint, main, write_figures
from .errors import distance_bins, error_distance_curve, error_distance_png, error_distance_stats
from .panels import colorize, palette, prediction_panels
from .relation import class_relation, dendrogram_png, relation_png
from .tsne import embedding_tsne, sample_embeddings, tsne_png

__all__ = ["prediction_panels", "palette", "colorize", "class_relation", "relation_png",
           "dendrogram_png", "embedding_tsne", "sample_embeddings", "tsne_png",
           "error_distance_curve", "error_distance_stats", "error_distance_png", "distance_bins",
           "load_checkpoint", "write_figures", "main"]
