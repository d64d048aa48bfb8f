"""First contact anywhere (issue 55): the embedded corpus, the shipped recipes by name, the
poem corpora imported from an npm archive, and no test or command assuming this repository's
neighbours."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import cli, one_line_error

import gru_lm
from gru_lm import download
from gru_lm.download import DATASETS, EMBEDDED_DIR, Collection, fetch, find_local
from gru_lm.errors import DataError
from gru_lm.importing import NPM_PACKAGE, import_archive
from gru_lm.yamlconf import RECIPES_DIR, recipes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def nowhere(tmp_path, monkeypatch) -> Path:
    """An empty folder as the working directory, no GRU_LM_DATA_DIR, offline."""
    monkeypatch.delenv("GRU_LM_DATA_DIR", raising=False)
    monkeypatch.setenv("GRU_LM_OFFLINE", "1")
    home = tmp_path / "empty"
    home.mkdir()
    monkeypatch.chdir(home)
    return home


# ---------------------------------------------------------------- the embedded corpus


def test_the_package_ships_the_exact_d2l_file():
    spec = DATASETS["timemachine"]
    shipped = EMBEDDED_DIR / spec.filename
    assert hashlib.sha1(shipped.read_bytes()).hexdigest() == spec.sha1
    assert shipped.stat().st_size == 178_979


def test_the_embedded_copy_is_found_offline_with_nothing_set(nowhere):
    path, where = find_local(DATASETS["timemachine"], nowhere / "data")
    assert (path, where) == (EMBEDDED_DIR / "timemachine.txt", "the package")
    assert fetch(DATASETS["timemachine"], nowhere / "data", progress=False) == path
    assert not (nowhere / "data").exists()  # nothing copied, nothing downloaded


def test_the_data_dir_still_wins(nowhere, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "timemachine.txt").write_bytes((EMBEDDED_DIR / "timemachine.txt").read_bytes())
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(mine))
    assert find_local(DATASETS["timemachine"], Path("data")) == (
        mine / "timemachine.txt", "GRU_LM_DATA_DIR")


def test_a_damaged_embedded_copy_is_not_used(nowhere, tmp_path, monkeypatch):
    broken = tmp_path / "corpora"
    broken.mkdir()
    (broken / "timemachine.txt").write_text("not the time machine")
    monkeypatch.setattr(download, "EMBEDDED_DIR", broken)
    assert find_local(DATASETS["timemachine"], Path("data")) is None
    with pytest.raises(DataError, match="offline and timemachine.txt is not available"):
        fetch(DATASETS["timemachine"], Path("data"), progress=False)


def test_data_download_says_the_package_has_it(nowhere):
    r = cli("data", "download")
    assert r.exit_code == 0, r.output
    assert "found in the package, SHA-1 verified; nothing downloaded" in " ".join(r.output.split())


# ---------------------------------------------------------------- shipped recipes


def test_every_recipe_has_a_one_sentence_first_line():
    names = recipes()
    assert {"tiny", "gru", "lstm", "tang", "recipe"} <= set(names)
    for name, path in names.items():
        first = path.read_text(encoding="utf-8").partition("\n")[0]
        assert first.startswith("# ") and first.endswith(".") and len(first) <= 90, name


def test_the_clone_s_configs_folder_is_the_package_s():
    assert (ROOT / "configs").resolve() == RECIPES_DIR
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == \
        sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))


def test_config_list_shows_every_recipe_in_one_line_each(nowhere):
    r = cli("config", "list")
    assert r.exit_code == 0, r.output
    for info in gru_lm.list_recipes():
        line = next(ln for ln in r.output.splitlines() if ln.startswith(f"│ {info.name} "))
        assert info.model in line and info.summary[:20] in line
    tang = next(i for i in gru_lm.list_recipes() if i.name == "tang")
    assert (tang.model, tang.dataset) == ("lstm", "tang")


def test_a_recipe_trains_by_name_from_an_empty_folder(nowhere):
    r = cli("train", "--config", "tiny", "--name", "t", "-q", "train.max_steps=2")
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((nowhere / "runs/t/config.yaml").read_text())
    assert saved["model"]["num_hiddens"] == 32 and saved["data"]["max_tokens"] == 5000
    assert "tiny.yaml" in cli("config", "show", "--config", "tiny.yaml").output


def test_a_path_wins_over_a_recipe_name(nowhere):
    Path("tiny").write_text("model:\n  num_hiddens: 7\n")
    r = cli("config", "show", "--config", "tiny")
    assert r.exit_code == 0 and "num_hiddens: 7" in r.output, r.output


def test_a_missing_config_names_the_recipes(nowhere):
    one_line_error(cli("train", "--config", "nonesuch"),
                   "config file nonesuch does not exist", "a shipped recipe's name (",
                   "tiny", "gru-lm config list")
    one_line_error(cli("train", "--config", "configs/gru.yaml"),
                   "config file configs/gru.yaml does not exist",
                   "the shipped recipe of that name is --config gru")


# ---------------------------------------------------------------- data import


@pytest.fixture
def pins(monkeypatch):
    """论语's one pinned file replaced by a small one of ours (its path kept, its SHA-256
    pinned instead), so the tests build archives without the real files."""
    spec = DATASETS["lunyu"]
    assert isinstance(spec, Collection)
    path = spec.files[0][0]
    body = json.dumps([{"chapter": "学而", "paragraphs": ["子曰：学而时习之。"]}],
                      ensure_ascii=False).encode()
    small = dataclasses.replace(spec, files=((path, hashlib.sha256(body).hexdigest()),))
    monkeypatch.setitem(DATASETS, "lunyu", small)
    return path, body


def _tgz(dest: Path, members: dict[str, bytes], cut: int | None = None) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    dest.write_bytes(data if cut is None else data[:cut])
    return dest


def test_import_puts_each_file_where_the_download_would(nowhere, pins):
    path, body = pins
    archive = _tgz(Path("chinese-poetry-2.0.1.tgz"), {
        "package/LICENSE": b"MIT", "package/dist/lunyu/lunyu.json": body,
        "package/dist/error/lunyu.json": b"[]"})  # same name, other bytes: not taken
    r = cli("data", "import", archive)
    assert r.exit_code == 0, r.output
    assert (Path("data/chinese-poetry") / path).read_bytes() == body
    assert "corpora ready offline: lunyu" in " ".join(r.output.split())
    assert [p.name for p in Path("data/chinese-poetry").iterdir()] == ["论语"]  # no leftovers
    text = fetch(DATASETS["lunyu"], Path("data"), offline=True, progress=False)
    assert text.read_text(encoding="utf-8") == "子曰：学而时习之。\n"


def test_a_zip_or_a_folder_imports_alike(nowhere, pins):
    path, body = pins
    with zipfile.ZipFile("repo.zip", "w") as z:
        z.writestr("chinese-poetry-99ebbef/论语/lunyu.json", body)
    assert import_archive(Path("repo.zip"), Path("a")).files == 1
    Path("folder/x").mkdir(parents=True)
    Path("folder/x/lunyu.json").write_bytes(body)
    assert import_archive(Path("folder"), Path("b")).complete == ["lunyu"]
    assert (Path("b/chinese-poetry") / path).read_bytes() == body


def test_a_truncated_archive_imports_nothing(nowhere, pins):
    _, body = pins
    archive = _tgz(Path("cut.tgz"), {"package/a.json": body * 2000,
                                     "package/dist/lunyu/lunyu.json": body}, cut=400)
    one_line_error(cli("data", "import", archive), "cut.tgz cannot be read to the end",
                   "nothing was imported", f"npm pack {NPM_PACKAGE}")
    assert not any(p.is_file() for p in Path("data").rglob("*"))


def test_an_archive_without_the_files_is_refused(nowhere, pins):
    archive = _tgz(Path("other.tgz"), {"package/index.js": b"module.exports = 1"})
    one_line_error(cli("data", "import", archive), "holds none of the 82 files of "
                   "chinese-poetry that gru-lm pins", "nothing was imported")
    one_line_error(cli("data", "import", "absent.tgz"), "absent.tgz does not exist")
    Path("garbage.tgz").write_bytes(b"\x1f\x8b not really gzip")
    one_line_error(cli("data", "import", "garbage.tgz"), "garbage.tgz cannot be read to the end",
                   "damaged or cut short")


def _tar(dest: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(dest, mode) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return dest


def test_a_tar_cut_between_two_members_imports_nothing(nowhere, pins):
    """tarfile reads a tar cut at a header as a smaller whole one: its end is checked."""
    _, body = pins
    whole = _tar(Path("whole.tar"), {"a/lunyu.json": body, "b/other.json": b"{}" * 600})
    second = tarfile.open(whole).getmembers()[1].offset
    Path("cut.tar").write_bytes(whole.read_bytes()[:second])
    one_line_error(cli("data", "import", "cut.tar"), "cut.tar cannot be read to the end",
                   "before the tar's end-of-archive blocks", "nothing was imported")
    assert not Path("data/chinese-poetry").exists()
    assert import_archive(whole, Path("data")).files == 1  # the whole one imports


@pytest.mark.parametrize("damage", ["xz", "encrypted", "method"])
def test_damaged_compressed_or_encrypted_members_are_one_line(nowhere, pins, damage):
    _, body = pins
    if damage == "xz":
        data = bytearray(_tar(Path("x.tar.xz"), {"a/lunyu.json": body * 50}, "w:xz")
                         .read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path("x.tar.xz").write_bytes(bytes(data))
        name = "x.tar.xz"
    else:
        with zipfile.ZipFile("x.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("a/lunyu.json", body)
        data = bytearray(Path("x.zip").read_bytes())
        for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # the local and the central headers
            at = data.find(sig)
            if damage == "encrypted":  # (what zip -P sets: bit 0 of the flags)
                data[at + (6 if sig == b"PK\x03\x04" else 8)] |= 1
            else:  # deflate64, which Python cannot read
                data[at + (8 if sig == b"PK\x03\x04" else 10)] = 9
        Path("x.zip").write_bytes(bytes(data))
        name = "x.zip"
    one_line_error(cli("data", "import", name), f"{name} cannot be read to the end",
                   "nothing was imported")
    assert not Path("data/chinese-poetry").exists()


def test_what_is_no_archive_is_refused_before_it_is_read(nowhere, pins):
    Path("notes.txt").write_text("hello\n")
    one_line_error(cli("data", "import", "notes.txt"),
                   "notes.txt is not a tar, .tgz, .tar.xz or zip archive, nor a folder")
    os.mkfifo("pipe")  # (read, it would never end: refused by its kind)
    one_line_error(cli("data", "import", "pipe"), "pipe is not a regular file or a folder")
    one_line_error(cli("data", "import", ""), "give the archive to import")
    assert not Path("data/chinese-poetry").exists()


def test_a_tar_that_ends_with_a_zip_member_is_read_as_a_tar(nowhere, pins):
    _, body = pins
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("x.txt", "not it")
    _tar(Path("poly.tar"), {"a/lunyu.json": body, "inner.zip": inner.getvalue()})
    assert import_archive(Path("poly.tar"), Path("data")).complete == ["lunyu"]


def test_a_target_in_the_way_or_a_full_disk_imports_nothing(nowhere, pins, monkeypatch):
    path, body = pins
    archive = _tar(Path("a.tar"), {"a/lunyu.json": body})
    (Path("data/chinese-poetry") / path).mkdir(parents=True)
    one_line_error(cli("data", "import", archive), "is in the way (not a regular file)",
                   "nothing was imported")
    (Path("data/chinese-poetry") / path).rmdir()

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    one_line_error(cli("data", "import", archive), "cannot write into data: No space left",
                   "free disk space")
    assert not any(p.is_file() for p in Path("data").rglob("*"))


def test_a_killed_import_s_staging_is_removed_by_the_next(nowhere, pins):
    _, body = pins
    dead = subprocess.run(["true"], check=True)  # (a process id that is gone)
    assert dead.returncode == 0
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = Path("data") / f".import-{proc.pid}-x"
    stale.mkdir(parents=True)
    (stale / "0.json").write_bytes(body)
    import_archive(_tar(Path("a.tar"), {"a/lunyu.json": body}), Path("data"))
    assert not stale.exists()


def test_without_the_poem_files_the_way_through_npm_is_said(nowhere, pins):
    one_line_error(cli("data", "info", "data.dataset=lunyu", "data.preset=raw"),
                   "offline and 1 of the 1 files of lunyu are not available",
                   f"without GitHub: npm pack {NPM_PACKAGE}, then gru-lm data import")


def test_a_config_name_with_a_line_break_stays_one_line(nowhere):
    one_line_error(cli("config", "show", "--config", "tiny\n"), "config file 'tiny\\n' does "
                   "not exist")


def test_the_pins_are_those_of_every_corpus_file():
    pinned = {d for spec in DATASETS.values() if isinstance(spec, Collection)
              for _, d in spec.files}
    assert len(pinned) == 82


# ---------------------------------------------------------------- no layout assumed


def test_the_suite_reads_the_corpora_through_one_helper():
    """No test reaches outside the repository (ROOT.parent, a parents[2] of a test file) or
    reads GRU_LM_DATA_DIR itself to find a corpus: conftest.CORPORA is the one place (tests
    may still set the variable, to point gru-lm at a folder of their own)."""
    outside = ("ROOT.parent", ".parents[2]", 'environ.get("GRU_LM_DATA_DIR')
    offenders = []
    for path in (ROOT / "tests").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name not in ("conftest.py", Path(__file__).name) and \
                any(needle in text for needle in outside):
            offenders.append(path.name)
    assert offenders == []


def test_ci_requires_the_poem_corpora_and_a_bare_clone_pass():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "GRU_LM_REQUIRE_POETRY=1" in ci
    assert "git clone" in ci and "unset GRU_LM_DATA_DIR" in ci


def test_a_skipped_poem_test_says_why(tmp_path, monkeypatch):
    import conftest

    monkeypatch.setattr(conftest, "CORPORA", tmp_path)
    monkeypatch.delenv("GRU_LM_REQUIRE_POETRY", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chinese-poetry's files are not in"):
        conftest.poetry_dir()
    monkeypatch.setenv("GRU_LM_REQUIRE_POETRY", "1")
    with pytest.raises(pytest.fail.Exception, match="GRU_LM_REQUIRE_POETRY=1 asks for them"):
        conftest.poetry_dir()
    assert os.environ["GRU_LM_REQUIRE_POETRY"] == "1"
