"""The Python API: the same capabilities as the CLI, as functions and plain results."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import cli

import gru_lm
from gru_lm.errors import ConfigError, GruLmError

TINY = "configs/tiny.yaml"


class _Cells(HTMLParser):
    """Parses HTML (raising on nothing, but counting open/close tags) and keeps its text."""

    def __init__(self):
        super().__init__()
        self.text, self.depth, self.tags = [], 0, 0

    def handle_starttag(self, tag, attrs):
        self.tags += 1
        self.depth += tag not in ("br", "img", "hr")  # void elements have no end tag

    def handle_endtag(self, tag):
        self.depth -= 1

    def handle_data(self, data):
        self.text.append(data)


def _html(obj) -> str:
    p = _Cells()
    p.feed(obj._repr_html_())
    p.close()
    assert p.tags and p.depth == 0  # every tag closed
    return " ".join(p.text)


def test_import_does_not_load_torch():
    code = "import sys, gru_lm; gru_lm.__all__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_api_end_to_end(workdir):
    run = gru_lm.train(TINY, "train.max_steps=20", name="api", train={"eval_interval": 10})
    assert isinstance(run, gru_lm.Run) and run.path == Path("runs/api")
    assert run.summary["steps"] == 20 and [r["step"] for r in run.history] == [10, 20]
    assert run.config.train.max_steps == 20
    text = run.predict("time traveller", 30)
    assert text.startswith("time traveller") and len(text) == len("time traveller") + 30
    assert run.predict("time traveller", 30) == text  # seeded by default
    assert run.predict("time traveller", 30, greedy=True) != text
    samples = run.samples("time", num_samples=3, num_chars=10)
    assert len(samples) == 3 and len(set(samples)) > 1
    ev = run.evaluate("test", mix_ngram=True)
    assert ev.rows[0].name == "static" and ev.ppl == pytest.approx(run.summary["best_test_ppl"])
    assert ev.best is not None and ev.references["ngram_order"] == 5
    gates = run.gates("the time machine")
    assert set(gates.trace.gates) == {"Z", "R"} and len(gates.text) == 16
    loaded = gru_lm.load("runs/api/checkpoints/last.pt")
    assert loaded.path == run.path and loaded.checkpoint.name == "last.pt"
    assert [r.name for r in gru_lm.runs()] == ["api"]
    figure = run.plot()
    assert figure.axes and run.plot("c.svg") == Path("c.svg") and Path("c.svg").exists()
    cmp = gru_lm.compare(runs=["runs/api"], out="cmp")
    assert cmp.rows[0].seeds == 1 and cmp.out == Path("cmp")


def test_bad_input_raises_the_cli_errors(workdir):
    with pytest.raises(ConfigError) as e:
        gru_lm.train(TINY, "train.lr=0")
    assert str(e.value) in cli("train", "--config", TINY, "train.lr=0").output
    with pytest.raises(ConfigError, match="train.optimiser"):
        gru_lm.train(TINY, train={"optimiser": "sgd"})
    with pytest.raises(GruLmError, match="unknown config section 'trian'"):
        gru_lm.train(TINY, trian={"lr": 1})
    with pytest.raises(GruLmError, match="does not exist"):
        gru_lm.load("runs/nothing.pt")
    assert not Path("runs").exists() or not any(Path("runs").iterdir())


def test_a_config_can_be_a_dict_or_a_config(workdir):
    cfg = gru_lm.resolve_config(TINY, train={"max_steps": 5})
    run = gru_lm.train(cfg.to_dict(), name="d")
    assert run.summary["steps"] == 5
    again = gru_lm.train(cfg, name="c")
    assert again.summary["best_val_ppl"] == run.summary["best_val_ppl"]  # same seed, config


def test_the_cli_and_the_api_give_the_same_numbers(tiny_run):
    run = tiny_run()
    ev = gru_lm.evaluate([run], "val", cache=True)
    r = cli("evaluate", "--run", run, "--split", "val", "--cache")
    for row in ev.rows:
        assert f"{row.ppl:.3f}" in r.output
    out = cli("predict", "time traveller", "--run", run, "-n", "20").stdout.removesuffix("\n")
    assert out == gru_lm.load(run).predict("time traveller", 20)


def test_results_render_as_html_tables(tiny_run):
    run = gru_lm.load(tiny_run())
    text = _html(run)
    assert f"{run.summary['best_val_ppl']:,.3f}" in text
    ev = run.evaluate("test")
    assert f"{ev.ppl:,.3f}" in _html(ev)
    gates = run.gates("the time")
    text = _html(gates)
    assert "update gate Z" in text and "reset gate R" in text
    assert gates._repr_html_().count("<span title='Z = ") == len("the time")
    cmp = gru_lm.compare(runs=[run.path], out="cmp")
    assert f"{cmp.rows[0].val_ppl_mean:,.3f}" in _html(cmp)


def test_no_notebook_no_display(workdir, capsys):
    from gru_lm.display import in_notebook

    assert not in_notebook()
    gru_lm.train(TINY, "train.max_steps=5", name="quiet")
    assert capsys.readouterr().out == ""  # the API prints nothing unless asked
    gru_lm.train(TINY, "train.max_steps=5", name="loud", show=True)
    assert "run directory: runs/loud" in capsys.readouterr().out


@pytest.mark.slow  # (each notebook trains its models: ~20 s)
@pytest.mark.parametrize("notebook, runs, trained", [("chapter9", "chapter9", 5),
                                                     ("chapter9.zh-CN", "chapter9.zh-CN", 6)])
def test_the_chapter_9_notebook_runs(workdir, monkeypatch, notebook, runs, trained):
    """docs/chapter9.ipynb and its Chinese edition executed headless, every training cut to
    a few steps (GRU_LM_SMOKE=1): no cell may fail, and training draws its live figure."""
    import nbformat
    from conftest import ROOT, poetry_dir
    from nbclient import NotebookClient

    if notebook == "chapter9.zh-CN":
        poetry_dir()  # it trains on 全唐诗
    Path("docs").mkdir()
    nb = nbformat.read(ROOT / "docs" / f"{notebook}.ipynb", as_version=4)
    monkeypatch.setenv("GRU_LM_SMOKE", "1")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(Path("docs").resolve())}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the live figure
    assert any("text/html" in o.get("data", {}) for o in outputs)  # tables and gates
    assert len(list(Path("runs", runs).iterdir())) >= trained
    assert not Path("docs/data").exists()  # caches stay in the repository's data/


def test_compare_passes_offline_to_the_scoring_of_its_members(tiny_run, monkeypatch):
    import gru_lm.data

    asked = []
    real = gru_lm.data.load_corpus

    def spy(*args, **kwargs):
        asked.append(kwargs.get("offline"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gru_lm.data, "load_corpus", spy)
    gru_lm.compare(runs=[tiny_run()], out="cmp", offline=True)
    assert asked and all(o is True for o in asked)


WRONG_TYPES = [
    (lambda run: run.predict("time", temperature="hot"), "temperature='hot' is a str"),
    (lambda run: run.predict("time", top_k=2.5), "top_k=2.5 is a float, not int | None"),
    (lambda run: run.predict("time", num_chars="5"), "num_chars='5' is a str, not int"),
    (lambda run: run.predict("time", seed=1.5), "seed=1.5 is a float"),
    (lambda run: run.predict(b"time"), "prefix=b'time' is a bytes, not str"),
    (lambda run: run.predict(), "give a prefix to continue"),
    (lambda run: run.gates("the", layer="0"), "layer='0' is a str, not int"),
    (lambda run: run.evaluate(split=1), "split=1 is an int"),
    (lambda run: gru_lm.evaluate(run.path, ngram_order=2.5), "ngram_order=2.5 is a float"),
    (lambda run: gru_lm.evaluate(5), "gru_lm.evaluate: runs=5 is an int"),
    (lambda run: gru_lm.load(None), "run_or_checkpoint=None is a NoneType"),
    (lambda run: gru_lm.list_models(2.5), "num_hiddens=2.5 is a float, not int"),
    (lambda run: gru_lm.train(TINY, name=5), "gru_lm.train: name=5 is an int"),
    (lambda run: gru_lm.train(TINY, train=5), "train=5 is an int, not Mapping"),
    (lambda run: gru_lm.compare(runs=[run.path], seeds=True), "seeds=True is a bool"),
    (lambda run: gru_lm.plot([]), "give at least one run folder"),
    (lambda run: gru_lm.runs(runs_dir=3), "runs_dir=3 is an int"),
    (lambda run: gru_lm.config_sources(5), "config=5 is an int"),
    (lambda run: gru_lm.Run("runs/nothing-here").history, "runs/nothing-here does not exist"),
]


@pytest.mark.parametrize("call, message", WRONG_TYPES)
def test_arguments_of_the_wrong_type_are_one_line_errors(tiny_run, call, message):
    """Every public function checks its arguments at the edge: a GruLmError of one line
    naming the argument, never a TypeError or a multi-line ValidationError from inside."""
    run = gru_lm.load(tiny_run())
    with pytest.raises(GruLmError) as e:
        call(run)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_run_is_a_view_of_its_folder(workdir):
    """A Run reads its folder as it is now: replaced by another run, it samples the new
    weights that its summary describes; deleted, every attribute says so."""
    import shutil

    from conftest import train_tiny

    run = gru_lm.load(train_tiny("r"))
    before = run.predict("time", num_chars=20)
    assert run.config.model.name == "gru-scratch" and run.history
    train_tiny("other", "model.name=lstm", "train.seed=3")
    shutil.rmtree("runs/r")
    shutil.copytree("runs/other", "runs/r")
    assert run.summary["model"] == "lstm" and run.config.model.name == "lstm"
    assert run.predict("time", num_chars=20) == gru_lm.load("runs/other").predict(
        "time", num_chars=20) != before
    shutil.rmtree("runs/r")
    for use in (lambda: run.history, lambda: run.summary, lambda: run.predict("time"),
                lambda: run.config):
        with pytest.raises(GruLmError, match="runs/r does not exist"):
            use()


@pytest.mark.parametrize("notebook", ["chapter9", "chapter9.zh-CN"])
def test_the_notebooks_install_gru_lm_where_it_is_missing(notebook, tmp_path, monkeypatch):
    """The first code cell (for Colab and Kaggle): where gru_lm does not import, it runs
    `pip install -e` on the repository it is opened from (the notebook's torch stays) and
    makes gru_lm importable without a restart; where it imports, it does nothing."""
    import importlib.util
    import subprocess
    import sys

    import nbformat
    from conftest import ROOT

    nb = nbformat.read(ROOT / "docs" / f"{notebook}.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code")
    ran: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(ROOT / "docs")
    exec(cell, {})
    assert ran == []  # gru_lm imports here: nothing to do
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    exec(cell, {})
    assert ran == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(ROOT)]]
    assert sys.path[0] == str(ROOT)
    monkeypatch.chdir(tmp_path)  # not inside a clone: one line says what to do
    with pytest.raises(RuntimeError, match="git clone"):
        exec(cell, {})
