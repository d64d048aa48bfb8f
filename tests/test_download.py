"""Downloads against a local HTTP server on 127.0.0.1: verified, bounded, never half-written."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gru_lm.download import DATASETS, DatasetSpec, cache_path, download, fetch
from gru_lm.errors import DataError

BODY = b"the time machine\n" * 200
STALL = threading.Event()  # /stall.txt answers only once this is set
SHA1 = hashlib.sha1(BODY).hexdigest()
OTHER = b"another book\n" * 50
OTHER_SHA1 = hashlib.sha1(OTHER).hexdigest()


def _zip(member: str, body: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, body)
    return buf.getvalue()


# Small stand-ins for the registered archives: text8's one long line of a-z and spaces,
# enwik8's XML with non-ASCII text.
TEXT8 = b" anarchism originated as a term of abuse first used against early" * 40
ENWIK8 = ("<mediawiki><page><title>Zürich</title><text>Zürich is a city […]</text>"
          "</page></mediawiki>\n" * 30).encode()
ZIPS = {"/text8.zip": _zip("text8", TEXT8), "/enwik8.zip": _zip("enwik8", ENWIK8),
        "/empty.zip": _zip("other", b"x"),
        "/changed.zip": _zip("text8", TEXT8 + b" x"), "/broken.zip": _zip("text8", TEXT8)[:-40]}


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code, body, ctype="text/plain", length=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path == "/good.txt":
            self._send(200, BODY)
        elif self.path == "/other.txt":
            self._send(200, OTHER)
        elif self.path == "/wrong.txt":
            self._send(200, BODY + b"x")
        elif self.path == "/truncated.txt":
            self._send(200, BODY[:100], length=len(BODY))
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/reset.txt":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:50])
            self.wfile.flush()
            self.connection.shutdown(2)
        elif self.path == "/missing.txt":
            self._send(404, b"not found")
        elif self.path == "/error.txt":
            self._send(500, b"boom")
        elif self.path == "/page.txt":
            self._send(200, b"<html><body>hi</body></html>", ctype="text/html; charset=utf-8")
        elif self.path == "/sneaky.txt":
            self._send(200, b"  <!DOCTYPE html><html></html>")
        elif self.path == "/stall.txt":
            STALL.wait(60)
            self._send(200, BODY)
        elif self.path in ZIPS:
            self._send(200, ZIPS[self.path], ctype="application/zip")
        elif self.path == "/moved.txt":
            self.send_response(302)
            self.send_header("Location", "/good.txt")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _spec(base, path, sha1=SHA1):
    return DatasetSpec(name="t", url=f"{base}{path}", sha1=sha1, filename="t.txt")


def _only_final_or_nothing(folder: Path):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("GRU_LM_DATA_DIR", raising=False)
    monkeypatch.delenv("GRU_LM_OFFLINE", raising=False)


def test_good_download_is_verified_and_cached(server, tmp_path):
    path = fetch(_spec(server, "/good.txt"), tmp_path, progress=False)
    assert path == tmp_path / f"t-{SHA1[:8]}.txt" and path.read_bytes() == BODY
    before = Handler.hits.get("/good.txt", 0)
    assert fetch(_spec(server, "/good.txt"), tmp_path, progress=False) == path
    assert Handler.hits.get("/good.txt", 0) == before  # cache hit: no request


def test_redirect_is_followed(server, tmp_path):
    assert download(f"{server}/moved.txt", SHA1, tmp_path / "m.txt", progress=False).is_file()


@pytest.mark.parametrize("path, message", [
    ("/wrong.txt", f"wrong SHA-1: expected {SHA1}, got "),
    ("/truncated.txt", "connection error"),
    ("/reset.txt", "connection error"),
    ("/missing.txt", "HTTP 404"),
    ("/error.txt", "HTTP 500"),
    ("/page.txt", "HTML page"),
    ("/sneaky.txt", "HTML page"),
])
def test_bad_downloads_leave_no_file(server, tmp_path, path, message):
    with pytest.raises(DataError, match=message) as info:
        download(f"{server}{path}", SHA1, tmp_path / "t.txt", retries=1, progress=False)
    assert f"{server}{path}" in str(info.value)
    assert _only_final_or_nothing(tmp_path) == []


def test_server_errors_are_retried(server, tmp_path):
    before = Handler.hits.get("/error.txt", 0)
    with pytest.raises(DataError):
        download(f"{server}/error.txt", SHA1, tmp_path / "t.txt", retries=2, progress=False)
    assert Handler.hits["/error.txt"] - before == 3


def test_stalling_server_times_out_within_the_bound(server, tmp_path):
    # The server holds its answer until the test releases it: only the client's own read
    # timeout can end the download, so no clock is read here.
    STALL.clear()
    try:
        with pytest.raises(DataError, match="timed out"):
            download(f"{server}/stall.txt", SHA1, tmp_path / "t.txt", timeout=(1, 0.5),
                     retries=0, progress=False)
    finally:
        STALL.set()
    assert _only_final_or_nothing(tmp_path) == []


def test_corrupted_cache_is_downloaded_again(server, tmp_path):
    cache_path(_spec(server, "/good.txt"), tmp_path).write_bytes(b"garbage")
    path = fetch(_spec(server, "/good.txt"), tmp_path, progress=False)
    assert path.read_bytes() == BODY


def test_offline_with_cache_makes_no_request(server, tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_bytes(BODY)  # cached under the name used before the hash
    import requests

    def boom(*a, **k):
        raise AssertionError("network used while offline")

    monkeypatch.setattr(requests.Session, "get", boom)
    monkeypatch.setenv("GRU_LM_OFFLINE", "1")
    assert fetch(_spec(server, "/good.txt"), tmp_path) == tmp_path / "t.txt"


def test_offline_without_file_says_where_to_put_it(server, tmp_path, monkeypatch):
    import requests

    monkeypatch.setattr(requests.Session, "get", lambda *a, **k: pytest.fail("network used"))
    with pytest.raises(DataError, match=f"put the file with SHA-1 {SHA1} into {tmp_path}"):
        fetch(_spec(server, "/good.txt"), tmp_path, offline=True)


def test_data_dir_is_searched_first(server, tmp_path, monkeypatch):
    ready = tmp_path / "ready"
    ready.mkdir()
    (ready / "t.txt").write_bytes(BODY)
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(ready))
    assert fetch(_spec(server, "/good.txt"), tmp_path / "cache", offline=True) == ready / "t.txt"


def test_https_to_http_redirect_is_refused(tmp_path, monkeypatch):
    import requests

    class Redirect:
        is_redirect = True
        headers = {"Location": "http://127.0.0.1:9/t.txt"}

        def close(self):
            pass

    calls = []

    def fake_get(self, url, **kwargs):
        calls.append(url)
        return Redirect()

    monkeypatch.setattr(requests.Session, "get", fake_get)
    with pytest.raises(DataError, match="redirect from https to http://127.0.0.1:9/t.txt"):
        download("https://127.0.0.1:9/t.txt", SHA1, tmp_path / "t.txt", progress=False)
    assert calls == ["https://127.0.0.1:9/t.txt"]  # the http URL was never requested
    assert list(tmp_path.iterdir()) == []


def test_downloaded_corpus_gets_the_usual_file_mode(server, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = download(f"{server}/good.txt", SHA1, tmp_path / "c.txt", progress=False)
    finally:
        os.umask(old)
    assert path.read_bytes() == BODY
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["c.txt"]  # no temp file left behind


def test_same_file_name_of_another_dataset_never_replaces_a_verified_file(server, tmp_path):
    ours = fetch(_spec(server, "/good.txt"), tmp_path, progress=False)
    other = DatasetSpec(name="u", url=f"{server}/other.txt", sha1=OTHER_SHA1, filename="t.txt")
    theirs = fetch(other, tmp_path, progress=False)
    assert theirs != ours and ours.read_bytes() == BODY and theirs.read_bytes() == OTHER
    assert fetch(_spec(server, "/good.txt"), tmp_path, offline=True) == ours


@pytest.mark.parametrize("make, message", [
    (lambda d: d.write_text("x"), "is a file, not a folder"),
    (lambda d: None, "does not exist"),
    (lambda d: (d.mkdir(), (d / "t.txt").write_bytes(b"")), "is empty or not a file"),
    (lambda d: (d.mkdir(), (d / "t.txt").write_bytes(b"not it")), "has the wrong SHA-1"),
])
def test_a_bad_data_dir_is_named_before_any_download(server, tmp_path, monkeypatch, make,
                                                     message):
    import requests

    data_dir = tmp_path / "data-dir"
    make(data_dir)
    monkeypatch.setattr(requests.Session, "get", lambda *a, **k: pytest.fail("network used"))
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(data_dir))
    with pytest.raises(DataError, match=message) as info:
        fetch(_spec(server, "/good.txt"), tmp_path / "cache", progress=False)
    assert str(data_dir) in str(info.value) and not (tmp_path / "cache").exists()


def test_data_dir_without_the_file_falls_back_to_the_cache(server, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(tmp_path / "empty"))
    assert fetch(_spec(server, "/good.txt"), tmp_path, progress=False).read_bytes() == BODY


def _standin(server, name, path=None, archive_sha1=None):
    """The registered `name`, served from the local server with a stand-in's hashes."""
    body = {"text8": TEXT8, "enwik8": ENWIK8}[name]
    path = path or f"/{name}.zip"
    return dataclasses.replace(DATASETS[name], url=f"{server}{path}",
                               sha1=hashlib.sha1(body).hexdigest(), archive_sha1=archive_sha1)


@pytest.mark.parametrize("name", ["text8", "enwik8"])
def test_archived_datasets_are_extracted_and_verified(server, tmp_path, name):
    zsha = hashlib.sha1(ZIPS[f"/{name}.zip"]).hexdigest()
    spec = _standin(server, name, archive_sha1=zsha if name == "text8" else None)
    path = fetch(spec, tmp_path, progress=False)
    assert path.read_bytes() == {"text8": TEXT8, "enwik8": ENWIK8}[name]
    assert _only_final_or_nothing(tmp_path) == [path.name]  # the archive is not kept
    before = Handler.hits[f"/{name}.zip"]
    assert fetch(spec, tmp_path, offline=True) == path
    assert Handler.hits[f"/{name}.zip"] == before


def test_registry_holds_the_published_hashes():
    assert DATASETS["text8"].sha1 == "0dc3edebc970dcc96137e7deda4d9995af9d93de"
    assert DATASETS["enwik8"].sha1 == "57b8363b814821dc9d47aa4d41f58733519076b2"
    assert {DATASETS[n].member for n in ("text8", "enwik8")} == {"text8", "enwik8"}


@pytest.mark.parametrize("path, kw, message", [
    ("/text8.zip", {"archive_sha1": "0" * 40}, "wrong SHA-1"),
    ("/changed.zip", {}, "text8 in http://127.0.0.1"),  # the member's hash is checked
    ("/empty.zip", {}, "holds no text8"),
    ("/broken.zip", {}, "not a readable zip archive"),
])
def test_bad_archives_leave_no_file(server, tmp_path, path, kw, message):
    with pytest.raises(DataError, match=message):
        fetch(_standin(server, "text8", path, **kw), tmp_path, progress=False)
    assert _only_final_or_nothing(tmp_path) == []


def test_archive_in_data_dir_is_extracted_offline(server, tmp_path, monkeypatch):
    ready = tmp_path / "ready"
    ready.mkdir()
    (ready / "text8.zip").write_bytes(ZIPS["/text8.zip"])
    monkeypatch.setenv("GRU_LM_DATA_DIR", str(ready))
    spec = _standin(server, "text8")
    path = fetch(spec, tmp_path / "cache", offline=True)
    assert path.read_bytes() == TEXT8 and path.parent == tmp_path / "cache"


def test_text8_trains_through_the_token_store(server, tmp_path, monkeypatch):
    from gru_lm.config import DataConfig
    from gru_lm.data import load_corpus

    monkeypatch.setitem(DATASETS, "text8", _standin(server, "text8"))
    corpus = load_corpus(DataConfig(dataset="text8", cache_dir=tmp_path), progress=False)
    assert corpus.vocab.decode(corpus.train[:20]) == "anarchism originated"
    assert Path(corpus.store).stat().st_size == len(TEXT8.strip())  # uint8: a byte a token
    assert len(corpus.vocab) <= 28
