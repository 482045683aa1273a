"""The examples/ scripts (one per loss, wired into a model that returns only logits through
pixcon.nn.FeatureTap) run as a user runs them, and FeatureTap itself."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pixcon.nn import FeatureTap

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py") if not p.stem.startswith("_"))


def test_there_is_an_example_per_method():
    from pixcon.methods import NAMES
    assert set(EXAMPLES) == set(NAMES), (EXAMPLES, NAMES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_trains_a_few_steps(name, tmp_path):
    """Run from another directory, as a user would: every step prints finite losses, and the
    contrastive term is non-zero at some step (CAC's needs confident pixels: more steps)."""
    steps = 16 if name == "cac" else 3
    r = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--steps",
                        str(steps)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step")]
    assert len(lines) == steps, r.stdout
    values = [[float(v) for v in re.findall(r" ([-\d.eE+naif]+)(?=\s|$)", ln)[1:]]
              for ln in lines]
    assert all(math.isfinite(v) for row in values for v in row), r.stdout
    assert any(row[1] > 0 for row in values), r.stdout


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)
        self.pair = Pair()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = self.body(x)
        a, _ = self.pair(f)
        return self.head(a)


class Pair(nn.Module):
    def forward(self, x):
        return x * 2, {"half": x / 2}


def test_feature_tap_keeps_the_graph_and_picks_from_tuples():
    net = Net()
    x = torch.randn(2, 3, 5, 5)
    with FeatureTap(net, "body") as tap, FeatureTap(net, "pair", select=0) as pair:
        net(x)
        f = tap.output
        assert torch.equal(f, net.body(x)) and torch.equal(pair.output, 2 * f)
        f.sum().backward()                       # the tapped output carries the graph
        assert net.body.weight.grad is not None
    assert not net.body._forward_hooks           # removed on leaving the block
    d = FeatureTap(net, "body", "pair", select=None)
    with pytest.raises(TypeError, match="'pair' returned a tuple, not a tensor; pass select="):
        net(x)
    d.remove()
    k = FeatureTap(net, "body", detach=True)
    net(x)
    assert not k.output.requires_grad
    k.remove()


def test_feature_tap_errors_name_what_is_wrong():
    net = Net()
    with pytest.raises(ValueError, match="no submodule 'bdy'.*close names: body"):
        FeatureTap(net, "bdy")
    with pytest.raises(ValueError, match="name at least one layer"):
        FeatureTap(net)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        FeatureTap(lambda x: x, "body")
    tap = FeatureTap(net, "body", "head")
    with pytest.raises(RuntimeError, match="no output of 'body' yet: run the model first"):
        tap["body"]
    with pytest.raises(ValueError, match="2 layers are tapped"):
        tap.output
    with pytest.raises(KeyError, match="'pair' is not tapped"):
        tap["pair"]
    net(torch.randn(1, 3, 2, 2))
    assert [t.shape[1] for t in tap.outputs] == [4, 2]
    bad = FeatureTap(net, "pair", select="nope")
    with pytest.raises(ValueError, match="select='nope' does not pick from 'pair'"):
        net(torch.randn(1, 3, 2, 2))
    bad.remove()
