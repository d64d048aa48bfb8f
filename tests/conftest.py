"""Shared helpers and fixtures: the real corpus, the CLI, one tiny run trained once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gru_lm import poetry
from gru_lm.cli import app
from gru_lm.download import EMBEDDED_DIR

ROOT = Path(__file__).resolve().parents[1]
# 《论语》学而 and 为政, 《道德经》 1-8 (public domain): 1,518 汉字 and 550 punctuation marks and
# line breaks, 413 distinct. Too small for a model to learn (it memorises: docs/results.md),
# big enough for the tests of Chinese text.
CLASSICS = ROOT / "tests" / "data" / "classics-zh.txt"
ZH = ("data.dataset=null", f"data.path={CLASSICS.name}", "data.preset=raw",
      "data.max_tokens=null")
runner = CliRunner()


def cli(*args: str):
    """Run `gru-lm ARGS` in this process; output holds stdout and stderr."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def train_tiny(name: str, *overrides: str) -> Path:
    """Train configs/tiny.yaml (30 steps) into runs/NAME; use `tiny_run` when any run will do."""
    r = cli("train", "--config", "configs/tiny.yaml", "--name", name, "--quiet", *overrides)
    assert r.exit_code == 0, r.output
    return Path("runs") / name


def reseed(run: Path, seed: int) -> Path:
    """Mark a copied run as another seed's (config.yaml's train.seed): compare counts a
    plain copy as the same experiment, once."""
    config = Path(run) / "config.yaml"
    text = config.read_text()
    assert "  seed: 0\n" in text
    config.write_text(text.replace("  seed: 0\n", f"  seed: {seed}\n"))
    return Path(run)


def one_line_error(r, *parts: str) -> None:
    """A failed command printed one `error:` line holding every part, and no traceback."""
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert r.output.startswith("error: "), r.output
    for p in parts:
        assert p in r.output, r.output


def _corpora() -> Path:
    """Where the tests read the corpora: GRU_LM_DATA_DIR as the session starts (.ci/run sets
    it to a folder that also holds chinese-poetry's files), else the folder of the copy of
    The Time Machine that the package ships. No test assumes this repository's neighbours."""
    env = os.environ.get("GRU_LM_DATA_DIR")
    if env:
        if not Path(env).is_dir():
            raise pytest.UsageError(f"GRU_LM_DATA_DIR={env} is not a folder; point it at the "
                                    "folder holding the corpora, or unset it")
        return Path(env).resolve()
    return EMBEDDED_DIR


# Read once, before any test's monkeypatch can change the variable.
CORPORA = _corpora()


def real_data_dir() -> Path:
    """A folder holding timemachine.txt: CORPORA, or the package's own copy when CORPORA
    holds other corpora only."""
    return CORPORA if (CORPORA / "timemachine.txt").is_file() else EMBEDDED_DIR


def poetry_dir() -> Path:
    """chinese-poetry's files at the pinned commit. Where they are not found the tests that
    need them are skipped, saying why; with GRU_LM_REQUIRE_POETRY=1 (CI) that is a failure."""
    folder = CORPORA / poetry.FOLDER
    if (folder / "COMMIT").is_file():
        return folder
    why = (f"chinese-poetry's files are not in {CORPORA}/{poetry.FOLDER}/: set GRU_LM_DATA_DIR "
           "to a folder holding them (docs/commands.md, 'gru-lm data import')")
    if os.environ.get("GRU_LM_REQUIRE_POETRY") == "1":
        pytest.fail(why + "; GRU_LM_REQUIRE_POETRY=1 asks for them")
    pytest.skip(why)


@pytest.fixture(scope="session", autouse=True)
def _kernels_ready():
    """Build or load the fused kernels before any test, so no test's output holds the
    one-time build notice and no test pays the build."""
    from gru_lm._ext import kernels

    kernels()


@pytest.fixture
def poetry_files() -> Path:
    """chinese-poetry's files (the test is skipped, or under GRU_LM_REQUIRE_POETRY=1 fails,
    where they are not found)."""
    return poetry_dir()


@pytest.fixture
def data_dir(monkeypatch) -> Path:
    d = real_data_dir()
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(d))
    monkeypatch.setenv("GRU_LM_OFFLINE", "1")
    return d


@pytest.fixture
def workdir(tmp_path, monkeypatch, data_dir) -> Path:
    """A fresh working directory with configs/ and the small Chinese fixture
    (classics-zh.txt) copied in and the corpus available offline."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(CLASSICS, tmp_path / CLASSICS.name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def _tiny_template(tmp_path_factory) -> Path:
    """configs/tiny.yaml trained once for the whole session."""
    home = tmp_path_factory.mktemp("tiny")
    shutil.copytree(ROOT / "configs", home / "configs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRU_LM_DATA_DIR", str(real_data_dir()))
        mp.setenv("GRU_LM_OFFLINE", "1")
        mp.chdir(home)
        return home / train_tiny("tiny")


@pytest.fixture
def tiny_run(workdir, _tiny_template):
    """copy(name) puts a finished tiny run at runs/NAME of the work directory."""

    def copy(name: str = "tiny") -> Path:
        dest = Path("runs") / name
        shutil.copytree(_tiny_template, dest)
        return dest

    return copy
