"""Every signature the README shows (a ``pixcon.ops/nn/data.NAME(...)`` line in a python block)
matches the code's: the same parameters in the same order, of the same kind (positional or
keyword-only), with the same defaults (issue 31 item 5)."""
import ast
import importlib
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = re.compile(r"^(pixcon\.(?:ops|nn|data)\.[A-Za-z_0-9]+)\(")


def _documented():
    blocks, cur = [], None
    for line in open(os.path.join(ROOT, "README.md")).read().splitlines():
        if line.startswith("```"):
            if cur is None and line.strip() == "```python":
                cur = []
            elif cur is not None:
                blocks.append(cur)
                cur = None
        elif cur is not None:
            cur.append(line)
    out = []
    for lines in blocks:
        i = 0
        while i < len(lines):
            m = START.match(lines[i])
            if not m:
                i += 1
                continue
            sig, depth, j = "", 0, i
            while True:                        # up to the closing parenthesis
                line = lines[j].split("#")[0]
                sig += line + " "
                depth += line.count("(") - line.count(")")
                if depth <= 0:
                    break
                j += 1
            out.append((m.group(1), sig[sig.index("(") + 1:sig.rindex(")")]))
            i = j + 1
    return out


DOCUMENTED = _documented()


def _value(node):
    """A default as written: its value when it is a literal, else its source (torch.float32)."""
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def _plain(v):
    return v if v is None or isinstance(v, (bool, int, float, str, tuple, list)) else repr(v)


def _params(text):
    """(name, kind, default) of a parameter list written as Python."""
    fn = ast.parse(f"def f({text}): pass").body[0].args
    out = []
    pos = fn.posonlyargs + fn.args
    defaults = [None] * (len(pos) - len(fn.defaults)) + list(fn.defaults)
    for a, d in zip(pos, defaults):
        out.append((a.arg, "positional", _value(d)))
    if fn.vararg:
        out.append((fn.vararg.arg, "*args", None))
    for a, d in zip(fn.kwonlyargs, fn.kw_defaults):
        out.append((a.arg, "keyword", _value(d)))
    if fn.kwarg:
        out.append((fn.kwarg.arg, "**kwargs", None))
    return out


def _code_params(obj):
    sig = inspect.signature(obj)
    kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional",
             inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
             inspect.Parameter.VAR_POSITIONAL: "*args",
             inspect.Parameter.KEYWORD_ONLY: "keyword",
             inspect.Parameter.VAR_KEYWORD: "**kwargs"}
    return [(p.name, kinds[p.kind],
             None if p.default is inspect.Parameter.empty else _plain(p.default))
            for p in sig.parameters.values()]


def test_the_readme_documents_the_public_functions():
    names = {n for n, _ in DOCUMENTED}
    assert len(names) >= 15, names
    for must in ("pixcon.ops.reco_loss", "pixcon.ops.pixel_contrast_loss",
                 "pixcon.ops.directional_contrast_loss", "pixcon.ops.pixel_anchor_loss",
                 "pixcon.ops.u2pl_loss", "pixcon.nn.PixelContrastLoss"):
        assert must in names, must


@pytest.mark.parametrize("name,text", DOCUMENTED, ids=[n for n, _ in DOCUMENTED])
def test_documented_signature_matches_the_code(name, text):
    module, attr = name.rsplit(".", 1)
    obj = getattr(importlib.import_module(module), attr)
    assert _params(text) == _code_params(obj), f"README: {name}({text.strip()})"


def test_references_default_to_the_public_ops_settings():
    """A reference function (pixcon.reference, pixcon.core) of a public op's name has the op's
    defaults wherever both have one: a reference called with its defaults is the op called with
    its own. Two documented exceptions: ``seed`` (the op's None draws one from torch's
    generator; a reference takes the drawn int, 0 by default) and distance_transform's
    ``background`` (the op's None in binary mode is the reference's 0)."""
    import pkgutil

    import pixcon.core
    import pixcon.ops
    import pixcon.reference
    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for pkg in (pixcon.reference, pixcon.core) for m in pkgutil.iter_modules(pkg.__path__)]
    compared = 0
    for name in pixcon.ops.__all__:
        op = inspect.signature(getattr(pixcon.ops, name)).parameters
        for mod in mods:
            ref = getattr(mod, name, None)
            if not callable(ref):
                continue
            for p, prm in inspect.signature(ref).parameters.items():
                if p not in op or prm.default is inspect.Parameter.empty or \
                        op[p].default is inspect.Parameter.empty:
                    continue
                want = op[p].default
                if p == "seed":
                    want = 0
                if (name, p) == ("distance_transform", "background"):
                    want = 0
                assert prm.default == want, f"{mod.__name__}.{name}({p}={prm.default!r}), op: {want!r}"
                compared += 1
    assert compared >= 40
