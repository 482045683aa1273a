"""A method is declared once (pixcon.methods): its files exist, and the trainer, the benchmark
suite, the cost model, the compile scenarios and the mutation list each cover it."""
import importlib
import os

import pytest
import torch

from pixcon import methods, nn, ops

from .conftest import bench_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("m", methods.METHODS, ids=methods.NAMES)
def test_declared_files_and_names_exist(m):
    for path in (m.spec, m.tests, m.bench):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    importlib.import_module(f"pixcon.reference.{m.reference}")
    op_module = importlib.import_module(f"pixcon.ops.{m.op}")
    for name in m.losses:
        assert getattr(ops, name) is getattr(op_module, name), name
    if m.module is not None:
        assert issubclass(getattr(nn, m.module), torch.nn.Module)
    for k in m.kernels:
        assert os.path.isfile(os.path.join(ROOT, "pixcon_kernels", f"{k}.py")), k


def test_the_trainer_reads_the_table():
    from pixcon.workbench.config import DEFAULT_WEIGHT, LOSSES, Config
    assert LOSSES == ("none",) + methods.NAMES
    for m in methods.METHODS:
        assert DEFAULT_WEIGHT[m.name] == m.train_weight == Config(loss=m.name).weight
        if m.semi_only:
            with pytest.raises(ValueError, match="needs mode 'semi'"):
                Config(loss=m.name, mode="sup").validate()


def test_suite_cost_model_scenarios_and_mutants_cover_every_method():
    from tools import aot, cost
    suite = bench_module("suite")
    assert set(methods.NAMES) <= set(suite.SUITE)
    modelled = {op.name.split()[0].lower() for op in cost.ops()}
    assert set(cost.MODELS) == set(methods.NAMES) and modelled
    names = [name for name, _ in aot.scenarios()]
    mutate = importlib.import_module("tools.mutate")
    for m in methods.METHODS:
        assert any(n.startswith(p) for p in m.scenarios for n in names), m.name
        files = {f"pixcon/reference/{m.reference}.py", f"pixcon/core/{m.reference}.py",
                 f"pixcon/ops/{m.op}.py"} | {f"pixcon_kernels/{k}.py" for k in m.kernels}
        assert any(path in files for _, path, *_ in mutate.MUTANTS), m.name


def test_a_missing_method_is_an_error_where_the_table_is_read(monkeypatch):
    from tools import cost
    extra = methods.Method("newmethod", "", "", "", "", (), None, "", "", 1.0)
    monkeypatch.setattr(methods, "NAMES", methods.NAMES + ("newmethod",))
    monkeypatch.setattr(methods, "METHODS", methods.METHODS + (extra,))
    with pytest.raises(KeyError, match="newmethod"):
        cost.ops()


def test_contrastiveseg_trains_with_its_bank_and_resumes(tmp_path):
    """--loss contrastiveseg: the projection head and the memory bank live in the module the
    trainer checkpoints; a resumed run repeats an uninterrupted one bit for bit."""
    from pixcon.train.loop import Config, Trainer, train
    kw = dict(mode="semi", loss="contrastiveseg", steps=4, eval_every=4, batch_size=2,
              progress=False, train_length=16, val_length=4, figures=False, memory_size=40)
    full = train(Config(**kw))
    assert all(torch.isfinite(torch.tensor(h["contrast"])) and h["contrast"] > 0
               for h in full["history"])
    out = str(tmp_path / "run")
    Trainer(Config(**kw, out=out, stop_at=2)).run()
    t = Trainer(Config(**kw, out=out, resume=True))
    assert t.step == 2 and int(t.extra.bank.pixel_ptr.sum()) > 0   # the bank came back
    resumed = t.run()
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


def test_mutmut_notes_account_for_survivors_by_function_and_line(tmp_path, monkeypatch):
    """tools/mutmut_pass.py keys a survivor by its function and mutated line (mutmut's numbers
    shift when a function changes), and reads the notes' table rows, `|` inside code escaped."""
    mp = importlib.import_module("tools.mutmut_pass")
    key = mp._key("pixcon.nn.memory.xǁPixelMemoryBankǁ_labels__mutmut_56",
                  ["-    return torch.where(ok, lab, -1)", "+    return torch.where(ok, lab, -2)"])
    assert key == "pixcon.nn.memory.PixelMemoryBank._labels | return torch.where(ok, lab, -2)"
    assert mp._key("pixcon.core.common.x_own_class_prob__mutmut_3", ["+    p = 1"]) == \
        "pixcon.core.common.own_class_prob | p = 1"
    notes = tmp_path / "notes.md"
    notes.write_text("| function | mutated line | verdict |\n|---|---|---|\n"
                     "| `pixcon.nn.memory.PixelMemoryBank._labels` | "
                     "`return torch.where(ok, lab, -2)` | equivalent: readers test < 0 |\n"
                     "| `pixcon.core.common.f` | `a \\| b` | equivalent |\n"
                     "| `pixcon.core.common.g` | `c = 1` | open: no test yet |\n")
    monkeypatch.setattr(mp, "NOTES", notes)
    assert mp.noted() == {key, "pixcon.core.common.f | a | b"}
