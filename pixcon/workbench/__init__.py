"""What a run is made of, below both the trainer (pixcon.train) and the pictures (pixcon.viz),
which read checkpoints: its configuration (``config``), its data (``data``: the dataset a
configuration names, the embedded ``scenes``, the ``folders`` loaders of VOC, Cityscapes and
SUN RGB-D, the label ``protocols``), and its ``model`` (DeepLabv3+ with a representation
head)."""
