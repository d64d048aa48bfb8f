"""Shared fixtures: the real corpus folder, a tiny run, a local HTTP server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    env = os.environ.get("GRU_LM_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "data")
    for c in candidates:
        if (c / "timemachine.txt").is_file():
            return c.resolve()
    pytest.fail("the Time Machine corpus is needed: set GRU_LM_DATA_DIR to a folder holding "
                "timemachine.txt (CI sets it to ../shared/data)")


@pytest.fixture
def data_dir(monkeypatch) -> Path:
    d = real_data_dir()
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(d))
    monkeypatch.setenv("GRU_LM_OFFLINE", "1")
    return d


@pytest.fixture
def workdir(tmp_path, monkeypatch, data_dir) -> Path:
    """A fresh working directory with configs/ copied in and the corpus available offline."""
    import shutil

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path
