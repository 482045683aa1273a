"""Imports only point downwards (docs/design.md §1): the layers below, written down once, checked
on every import statement of the shipped packages, lazy ones inside functions included."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. A module may import its own unit and any unit of a lower layer, never a unit of
# its own layer or a higher one.
LAYERS = (
    ("pixcon_kernels", "pixcon.core", "pixcon._cli", "pixcon.progress", "pixcon.distributed",
     "pixcon.data", "pixcon.synthetic", "pixcon.measure", "pixcon.methods", "pixcon._C",
     "pixcon._build"),
    ("pixcon.reference",),
    ("pixcon.ops",),
    ("pixcon.nn",),
    ("pixcon.workbench",),
    ("pixcon.viz", "pixcon.demo", "pixcon.build"),
    ("pixcon.train",),
)
# Beyond the order: the references never import kernels; the fused paths and the banks never
# import the references (what both need is pixcon.core).
FORBIDDEN = (
    ("pixcon.reference", "pixcon_kernels"),
    ("pixcon.nn", "pixcon.reference"),
    ("pixcon.ops._library", "pixcon.reference"),
    ("pixcon.ops.anchor_tiles", "pixcon.reference"),
    ("pixcon.core", "pixcon.reference"),
)


def _unit(module):
    """The layer unit a dotted module name belongs to (its longest listed prefix)."""
    best = None
    for layer, units in enumerate(LAYERS):
        for u in units:
            if module == u or module.startswith(u + "."):
                if best is None or len(u) > len(best[1]):
                    best = (layer, u)
    return best


def _modules():
    for pkg in ("pixcon", "pixcon_kernels"):
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield rel[:-len(".__init__")] if rel.endswith(".__init__") else rel, path


def _imports(module, path):
    """Absolute names of everything ``module`` imports (pixcon and pixcon_kernels only)."""
    tree = ast.parse(open(path).read())
    is_pkg = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)    # `from pkg import module`
    return {n for n in out if n.split(".")[0] in ("pixcon", "pixcon_kernels")}


def _known(name):
    """Keep only names that are modules or packages of the tree (not functions)."""
    rel = name.replace(".", os.sep)
    return os.path.isfile(os.path.join(ROOT, rel + ".py")) or \
        os.path.isdir(os.path.join(ROOT, rel)) or name == "pixcon._C"


def test_every_module_is_in_a_layer():
    missing = [m for m, _ in _modules() if m != "pixcon" and _unit(m) is None]
    assert not missing, f"modules outside every layer of tests/test_layers.py: {missing}"


def test_imports_point_downwards():
    bad = []
    for module, path in _modules():
        if module == "pixcon":          # the package's __init__: loaded before anything below
            continue
        here = _unit(module)
        for name in sorted(_imports(module, path)):
            if not _known(name) or name == "pixcon":
                continue
            there = _unit(name)
            if there is None:
                bad.append(f"{module} imports {name}, which is in no layer")
            elif there[1] != here[1] and there[0] >= here[0]:
                bad.append(f"{module} (layer {here[0]}) imports {name} (layer {there[0]})")
    assert not bad, "\n".join(bad)


def test_forbidden_imports():
    bad = []
    for module, path in _modules():
        for low, high in FORBIDDEN:
            if module == low or module.startswith(low + "."):
                bad += [f"{module} imports {n}" for n in _imports(module, path)
                        if n == high or n.startswith(high + ".")]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: a lower module importing a higher one, relatively and lazily."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ..train import loop\n")
    names = _imports("pixcon.ops.x", str(src))
    assert "pixcon.train" in names and "pixcon.train.loop" in names
    assert _unit("pixcon.train.loop")[0] > _unit("pixcon.ops.x")[0]


def test_every_package_is_installed():
    """pyproject.toml lists the packages a wheel carries: every folder of pixcon/ and
    pixcon_kernels/ with an __init__.py is among them (an editable install would not notice
    one missing; a wheel would lack it)."""
    import tomllib
    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
                 ["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".")
             for pkg in ("pixcon", "pixcon_kernels")
             for d, _, files in os.walk(os.path.join(ROOT, pkg)) if "__init__.py" in files}
    assert found == listed, f"in the tree, not listed: {found - listed}; listed, not in the " \
                            f"tree: {listed - found}"
