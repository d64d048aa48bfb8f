"""The chinese-poetry corpora (tang, songci, tang300, lunyu): verified file by file, offline from
GRU_LM_DATA_DIR or downloaded from a local server, built into one text; and data.script."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cli, one_line_error, poetry_dir, train_tiny

from gru_lm import poetry
from gru_lm.data import preprocess
from gru_lm.download import DATASETS, Collection, collection_text_path, fetch
from gru_lm.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_sums_are_those_of_the_pinned_files():
    found = (poetry_dir() / "SHA256SUMS").read_text().split()
    assert poetry.SUMS.read_text().split() == found
    assert (poetry_dir() / "COMMIT").read_text().strip() == poetry.COMMIT


def test_files_are_read_in_numeric_order():
    files = [p for p, _ in DATASETS["tang"].files]
    assert len(files) == 58 and files[:3] == ["全唐诗/poet.tang.0.json",
                                              "全唐诗/poet.tang.1000.json",
                                              "全唐诗/poet.tang.2000.json"]
    assert files[-1] == "全唐诗/poet.tang.57000.json"
    assert len(DATASETS["songci"].files) == 22


@pytest.mark.parametrize("name, lines, first", [
    ("tang", 57_607, "秦川雄帝宅，函谷壯皇居。綺殿千尋起，離宮百雉餘。"),
    ("songci", 21_050, "气和玉烛，睿化著鸿明。缇管一阳生。"),
    ("tang300", 320, "寥落古行宮，宮花寂寞紅。白頭宮女在，閒坐說玄宗。"),
    ("lunyu", 512, "子曰：“学而时习之，不亦说乎？"),
])
def test_offline_from_the_data_dir_one_poem_a_line(poetry_files, tmp_path, data_dir, name, lines,
                                                    first):
    text = fetch(DATASETS[name], tmp_path, progress=False).read_text(encoding="utf-8")
    assert text.count("\n") == lines and text.endswith("\n")
    assert text.startswith(first)


def test_data_info_of_tang_offline(poetry_files, workdir):
    r = cli("data", "info", "data.dataset=tang", "data.preset=raw")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "3,725,689" in flat and "9,590" in flat  # 9,589 characters and <unk>
    assert "3,353,120 / 186,284 / 186,284" in flat


def test_a_damaged_file_in_the_data_dir_is_refused_naming_it(tmp_path, monkeypatch):
    mine = tmp_path / "corpora"
    shutil.copytree(poetry_dir() / "论语", mine / poetry.FOLDER / "论语")
    damaged = mine / poetry.FOLDER / "论语" / "lunyu.json"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b" ")
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(mine))
    monkeypatch.setenv("GRU_LM_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("data", "info", "data.dataset=lunyu", "data.preset=raw"),
                   f"{damaged} (in GRU_LM_DATA_DIR) has the wrong SHA-256")
    assert not Path("data/tokens").exists()


def test_offline_without_the_files_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GRU_LM_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("data", "info", "data.dataset=songci", "data.preset=raw"),
                   "offline and 22 of the 22 files of songci are not available",
                   f"into {tmp_path}/chinese-poetry/")


# ---------------------------------------------------------------- downloads


FILES = {"a/x.1.json": json.dumps([{"paragraphs": ["床前明月光，", "疑是地上霜。"]}]),
         "a/x.2.json": json.dumps([{"paragraphs": ["舉頭望明月，低頭思故鄉。"]},
                                   {"paragraphs": ["白日依山盡。"]}])}
BODIES = {k: v.encode() for k, v in FILES.items()}


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    fail: set[str] = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        from urllib.parse import unquote

        path = unquote(self.path).removeprefix("/repo/")
        Handler.hits[path] = Handler.hits.get(path, 0) + 1
        body = BODIES.get(path)
        code = 200 if body is not None and path not in Handler.fail else 404
        body = body if code == 200 else b"no"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def collection():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    files = tuple((p, hashlib.sha256(b).hexdigest()) for p, b in BODIES.items())
    yield Collection(name="mini", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/repo/",
                     folder="mini-poetry", files=files,
                     build=poetry.PoetryCorpus("mini", "a/", "").text)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv("GRU_LM_DATA_DIR", raising=False)
    monkeypatch.delenv("GRU_LM_OFFLINE", raising=False)


def test_download_verifies_each_file_and_goes_on_where_it_stopped(tmp_path, collection):
    Handler.fail = {"a/x.2.json"}
    with pytest.raises(DataError, match="x.2.json failed: HTTP 404"):
        fetch(collection, tmp_path, progress=False, retries=0)
    assert (tmp_path / "mini-poetry" / "a" / "x.1.json").read_bytes() == BODIES["a/x.1.json"]
    assert not (tmp_path / "mini-poetry" / "a" / "x.2.json").exists()
    Handler.fail, before = set(), dict(Handler.hits)
    text = fetch(collection, tmp_path, progress=False)
    assert Handler.hits["a/x.1.json"] == before["a/x.1.json"]  # kept, not fetched again
    assert text.read_text(encoding="utf-8") == ("床前明月光，疑是地上霜。\n"
                                                "舉頭望明月，低頭思故鄉。\n白日依山盡。\n")
    assert text == collection_text_path(collection, tmp_path)
    again = dict(Handler.hits)
    assert fetch(collection, tmp_path, progress=False) == text and Handler.hits == again


def test_a_damaged_download_never_lands(tmp_path, collection):
    wrong = dataclasses.replace(collection, files=(("a/x.1.json", "0" * 64),))
    with pytest.raises(DataError, match="wrong SHA-256"):
        fetch(wrong, tmp_path, progress=False, retries=0)
    assert not (tmp_path / "mini-poetry" / "a" / "x.1.json").exists()


def test_a_damaged_built_text_is_built_again(tmp_path, collection):
    text = fetch(collection, tmp_path, progress=False)
    good = text.read_bytes()
    text.write_bytes(good.replace("床".encode(), "牀".encode()))
    assert fetch(collection, tmp_path, progress=False).read_bytes() == good


# ---------------------------------------------------------------- data.script


def test_the_script_is_converted_by_phrases():
    simplified = preprocess("學而時習之，不亦說乎", "raw", script="simplified")
    assert simplified == list("学而时习之，不亦说乎")
    assert "".join(preprocess("头发", "raw", script="traditional")) == "頭髮"  # 发 -> 髮 here
    assert preprocess("學", "raw") == ["學"]


def test_the_d2l_preset_refuses_a_script(workdir):
    one_line_error(cli("train", "-c", "configs/tiny.yaml", "data.script=simplified"),
                   "data: script=simplified: the d2l preset keeps only the letters a-z")


TRADITIONAL = "學而時習之，不亦說乎。有朋自遠方來，不亦樂乎。人不知而不慍，不亦君子乎。\n"


def test_a_run_trained_in_simplified_reads_traditional_prefixes(workdir):
    Path("t.txt").write_text(TRADITIONAL * 80, encoding="utf-8")
    common = ("data.dataset=null", "data.path=t.txt", "data.preset=raw", "data.max_tokens=null")
    run = train_tiny("simp", *common, "data.script=simplified")
    vocab = json.loads((run / "vocab.json").read_text(encoding="utf-8"))["idx_to_token"]
    assert "学" in vocab and "學" not in vocab
    r = cli("predict", "學而", "--run", run, "-n", "5")  # converted like the corpus
    assert r.exit_code == 0 and r.stdout.startswith("学而"), r.output
    as_is = train_tiny("trad", *common)
    one_line_error(cli("predict", "学而时习", "--run", as_is),
                   "the prefix has 3 characters outside the vocabulary: '学时习'",
                   "the run reads traditional characters (its corpus as it is): write '學時習'",
                   "or train with data.script=simplified")


def test_the_chinese_corpora_under_the_d2l_preset_say_to_use_raw(poetry_files, workdir):
    one_line_error(cli("data", "info", "data.dataset=lunyu"),
                   "has 0 token(s) after the 'd2l' preprocessing",
                   "set data.preset=raw for any other script")


def test_a_folder_in_place_of_a_file_is_not_called_damaged(tmp_path, monkeypatch):
    (tmp_path / poetry.FOLDER / "论语" / "lunyu.json").mkdir(parents=True)
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="lunyu.json \\(in GRU_LM_DATA_DIR\\) is not a regular "
                                        "file; replace it with the file whose SHA-256 is"):
        fetch(DATASETS["lunyu"], tmp_path / "cache", offline=True, progress=False)


def test_the_data_dir_pointing_inside_the_collection_is_explained(tmp_path, monkeypatch):
    shutil.copytree(poetry_dir() / "论语", tmp_path / "论语")
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="holds chinese-poetry's files itself; point it at the "
                                        "folder above"):
        fetch(DATASETS["lunyu"], tmp_path / "cache", offline=True, progress=False)


def test_a_failed_name_lookup_is_not_called_a_timeout():
    import requests
    from urllib3.exceptions import MaxRetryError, NameResolutionError

    from gru_lm.httpget import _request_error

    lookup = NameResolutionError("raw.githubusercontent.com", None, OSError("no DNS"))
    e = requests.exceptions.ConnectionError(MaxRetryError(None, "/x", lookup))
    message = str(_request_error("https://host/x", e, (10, 30)))
    assert "connection error" in message and "timed out" not in message


def test_data_info_shows_the_script(poetry_files, workdir):
    r = cli("data", "info", "data.dataset=lunyu", "data.preset=raw", "data.script=traditional")
    assert r.exit_code == 0, r.output
    assert "traditional (data.script: converted by OpenCC)" in " ".join(r.output.split())


def test_evaluate_text_in_the_other_script_says_so(workdir):
    Path("t.txt").write_text(TRADITIONAL * 80, encoding="utf-8")
    run = train_tiny("trad", "data.dataset=null", "data.path=t.txt", "data.preset=raw",
                     "data.max_tokens=null")
    from gru_lm.script import convert

    Path("s.txt").write_text(convert(TRADITIONAL * 3, "simplified"), encoding="utf-8")
    r = cli("evaluate", "--run", run, "--text", "s.txt")
    assert r.exit_code == 0, r.output
    assert "has characters this run does not know in their simplified form but does in " \
           "their traditional one" in " ".join(r.output.split())
