"""Installed like any package (issue 55): the sdist and wheel `python -m build` makes, the
wheel installed into a clean venv, and gru-lm used from an empty folder with no repository,
no GRU_LM_DATA_DIR and no network: a shipped recipe trains on the shipped corpus, predicts,
exports and serves; the C++ kernels build from the installed package's own source."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("gru_lm/configs/tiny.yaml", "gru_lm/configs/tang.yaml",
           "gru_lm/corpora/timemachine.txt", "gru_lm/csrc/cells.cpp",
           "gru_lm/sums/chinese-poetry.sha256", "gru_lm/web/index.html")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel built from it, as `python -m build` makes them (without build
    isolation: the build tools come from this venv, so no network is needed)."""
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def test_the_sdist_and_the_wheel_carry_the_recipes_the_corpus_and_the_kernels(dist):
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED) <= names
    assert {f"gru_lm/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= names
    with tarfile.open(sdist) as t:
        inside = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert set(SHIPPED) <= inside


@pytest.mark.slow  # (a venv, a kernel build of ~40 s, a training, a server: ~2 minutes)
def test_the_wheel_trains_predicts_exports_and_serves_from_an_empty_folder(dist, tmp_path):
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    # The wheel alone goes into the clean venv; its dependencies are read from this venv's
    # site-packages (a .pth line adds the folder, not its .pth files: this checkout's
    # editable install stays out), so the test needs no network.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "_gru_lm_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    home = tmp_path / "empty"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GRU_LM_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(GRU_LM_OFFLINE="1", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "kernels"))

    def gru_lm(*args: str, timeout: float = 600) -> str:
        r = subprocess.run([str(bin_dir / "gru-lm"), *args], cwd=home, env=env,
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"gru-lm {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r.stdout + r.stderr

    where = subprocess.run([str(bin_dir / "python"), "-c", "import gru_lm; print(gru_lm.__file__)"],
                           cwd=home, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv))  # the wheel's copy, not this checkout

    assert "tiny" in gru_lm("config", "list")
    out = gru_lm("train", "--config", "tiny", "--name", "t", "train.max_steps=10")
    # The kernels were built from the installed source (a fresh TORCH_EXTENSIONS_DIR), or
    # the portable loops ran and the run says why.
    kernels = json.loads((home / "runs/t/summary.json").read_text())["kernels"]
    assert kernels == "fused kernels" and "building fused kernels" in out or \
        kernels.startswith("portable loops: "), out
    assert f"corpus {site}/gru_lm/corpora/timemachine.txt" in out  # the shipped copy
    assert not list(home.glob("data/*.txt"))  # nothing downloaded
    assert gru_lm("predict", "time traveller", "--run", "runs/t", "-n", "20").startswith(
        "time traveller")
    gru_lm("export", "runs/t", "--out", "exported")
    assert gru_lm("predict", "time", "--run", "exported", "-n", "5").startswith("time")

    server = subprocess.Popen([str(bin_dir / "gru-lm"), "serve", "runs/t", "--port",
                               "0", "--threads", "1"], cwd=home, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = None, time.monotonic() + 120
        assert server.stdout is not None
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            found = re.search(r"http://127\.0\.0\.1:\d+", line)
            url = found.group(0) if found else None
        assert url, "the server never said where it listens"
        with urllib.request.urlopen(url + "/", timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        server.terminate()
        server.wait(timeout=60)
