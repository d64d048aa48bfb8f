"""Shared helpers and fixtures: the real corpus, the CLI, one tiny run trained once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gru_lm.cli import app

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


def real_data_dir() -> Path:
    env = os.environ.get("GRU_LM_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "data")
    for c in candidates:
        if (c / "timemachine.txt").is_file():
            return c.resolve()
    pytest.fail("the Time Machine corpus is needed: set GRU_LM_DATA_DIR to a folder holding "
                "timemachine.txt (CI sets it to ../shared/data)")


@pytest.fixture(scope="session", autouse=True)
def _kernels_ready():
    """Build or load the fused kernels before any test, so no test's output holds the
    one-time build notice and no test pays the build."""
    from gru_lm._ext import kernels

    kernels()


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
