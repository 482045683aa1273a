"""FeatureTap: the representation a contrastive loss needs, read from inside a model that
returns only logits (a segmentation_models_pytorch, mmseg or torchvision network)."""
from __future__ import annotations

import difflib

import torch


class FeatureTap:
    """Records the outputs of named submodules of ``model`` on every forward (forward hooks),
    with their graph, so a loss can use them after ``logits = model(x)``.

    >>> tap = FeatureTap(model, "decoder")          # any name of model.named_modules()
    >>> logits = model(images)
    >>> loss = ce + 0.1 * crit(tap["decoder"], labels, logits)   # or tap.output

    ``layers``: one or more module names (``model.get_submodule`` paths, e.g.
    ``"decoder.blocks.3"``). ``select``: what to keep of a module whose output is not one
    tensor -- an int (an index into a tuple or list output) or a str (a key of a dict output);
    default: the output itself, which must then be a tensor. ``detach``: keep the outputs without
    their graph (e.g. for a teacher). Each forward replaces the previous outputs; ``clear()``
    drops them, ``remove()`` (or leaving a ``with`` block) removes the hooks.
    """

    def __init__(self, model: torch.nn.Module, *layers: str, select: int | str | None = None,
                 detach: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"FeatureTap: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if not layers:
            raise ValueError("FeatureTap: name at least one layer, e.g. FeatureTap(model, "
                             "'decoder')")
        names = [n for n, _ in model.named_modules() if n]
        self.layers, self.select, self.detach = tuple(layers), select, bool(detach)
        self._out: dict[str, object] = {}
        self._handles = []
        for name in self.layers:
            if not isinstance(name, str) or name not in names:
                close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.4)
                hint = f"; close names: {', '.join(close)}" if close else ""
                raise ValueError(f"FeatureTap: {type(model).__name__} has no submodule "
                                 f"{name!r} (names as in model.named_modules(){hint})")
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            self._out[name] = self._pick(name, output)
        return hook

    def _pick(self, name, output):
        s = self.select
        if s is not None:
            try:
                output = output[s]
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"FeatureTap: select={s!r} does not pick from {name!r}'s "
                                 f"output ({type(output).__name__})") from None
        if not torch.is_tensor(output):
            raise TypeError(f"FeatureTap: {name!r} returned a {type(output).__name__}, not a "
                            f"tensor; pass select= (an index of a tuple output or a key of a "
                            f"dict output)")
        return output.detach() if self.detach else output

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.layers:
            raise KeyError(f"FeatureTap: {name!r} is not tapped (tapped: {self.layers})")
        if name not in self._out:
            raise RuntimeError(f"FeatureTap: no output of {name!r} yet: run the model first "
                               f"(after clear(), or the module was not called)")
        return self._out[name]

    @property
    def output(self) -> torch.Tensor:
        """The output of the only tapped layer (several: use tap[name] or tap.outputs)."""
        if len(self.layers) != 1:
            raise ValueError(f"FeatureTap: {len(self.layers)} layers are tapped; use "
                             f"tap[name] or tap.outputs")
        return self[self.layers[0]]

    @property
    def outputs(self) -> list[torch.Tensor]:
        """The tapped layers' outputs in the order they were named."""
        return [self[n] for n in self.layers]

    def clear(self):
        self._out.clear()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._out.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"FeatureTap(layers={self.layers}, select={self.select!r}, detach={self.detach})"
