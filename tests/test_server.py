"""`gru-lm serve`: the JSON API with a real HTTP client on 127.0.0.1, and the page in headless
Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import cli, one_line_error

import gru_lm
from gru_lm.server import Limits, create_app, make_server

PREFIX = "time traveller"


@pytest.fixture
def served(tiny_run):
    """start(limits) -> (base url, Run): a server on a free port of 127.0.0.1, in a thread,
    stopped after the test."""
    servers = []

    def start(limits: Limits = Limits()):
        run = gru_lm.load(tiny_run(f"s{len(servers)}"))
        start.app = create_app(run, limits)
        server = start.server = make_server(start.app, "127.0.0.1", 0, log_level="error")
        thread = start.thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", run

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def test_the_api_continues_streams_searches_and_shows_gates(served):
    url, run = served()
    with httpx.Client(base_url=url, timeout=60) as c:
        card = c.get("/api/card").json()
        assert card["model"] == "gru-scratch" and card["vocab_size"] == 28
        assert card["test_ppl"] == pytest.approx(run.summary["best_test_ppl"])
        r = c.post("/api/continue", json={"prefix": PREFIX, "num_chars": 30})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == [run.predict(PREFIX, 30).removeprefix(PREFIX)]
        beams = c.post("/api/continue", json={"prefix": PREFIX, "num_chars": 20, "beam": 3}
                       ).json()
        api = run.continuations(PREFIX, num_chars=20, beam=3)
        assert beams["outputs"] == api.outputs and beams["log_losses"] == api.log_losses
        with c.stream("POST", "/api/stream", json={"prefix": PREFIX, "num_chars": 25,
                                                   "seed": 4}) as s:
            lines = [json.loads(line) for line in s.iter_lines() if line]
        assert lines[-1] == {"done": True, "chars": 25}
        assert "".join(x["text"] for x in lines[:-1]) == run.predict(
            PREFIX, 25, seed=4).removeprefix(PREFIX)
        assert len(lines) == 26  # (one line a character, as drawn)
        g = c.post("/api/gates", json={"text": "the time", "units": 4}).json()
        assert g == run.gates("the time", 0, 4).to_json()
        assert "/api/continue" in c.get("/openapi.json").json()["paths"]
        assert c.get("/docs").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and 'id="go"' in page.text


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/continue", {"prefix": ""}, 400, "the prefix is empty"),
    ("/api/continue", {}, 400, "give a prefix"),
    ("/api/continue", {"prefix": "time", "temperature": "hot"}, 422, "temperature"),
    ("/api/continue", {"prefix": "time", "beem": 3}, 422, "beem"),
    ("/api/continue", {"prefix": "time", "beam": 3, "greedy": True}, 400, "beam 3 and greedy"),
    ("/api/continue", {"prefix": "time", "beam": 40}, 400, "over this server's limit"),
    ("/api/continue", {"prefix": "time", "num_chars": 5000}, 400, "num_chars 5,000 is over this "
     "server's limit; give at most 2,000"),
    ("/api/continue", {"prefix": "x" * 10_001}, 400, "at most 10,000"),
    ("/api/continue", {"prefix": "time", "num_samples": 9}, 400, "num_samples 9"),
    ("/api/continue", {"prefix": "time", "top_k": 0}, 400, "top_k 0 is invalid"),
    ("/api/continue", {"prefix": "time", "num_chars": 0}, 400, "num_chars 0 is invalid; give 1 "
     "to 2,000"),
    ("/api/continue", {"prefix": "time", "greedy": True, "seed": 3}, 400, "greedy takes"),
    ("/api/continue", {"prefix": "time", "temperature": 1e39}, 400, "temperature 1e+39 is "),
    ("/api/continue", {"form": "五绝", "num_chars": 5}, 400, "num_chars 5 means nothing with "
     "form"),
    ("/api/stream", {"prefix": "time", "num_samples": 2}, 400, "draws one sample"),
    ("/api/gates", {"text": ""}, 400, ""),
    ("/api/gates", {"text": "time", "units": 0}, 400, "units 0 is invalid"),
])
def test_each_bad_request_is_a_4xx_with_one_line(served, path, body, status, message):
    url, _ = served()
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in error
    assert "--" not in error  # (the request's fields, not the CLI's options)
    bad = httpx.post(url + path, content=b"{not json", timeout=60,
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 422 and "\n" not in bad.json()["error"]


def test_fifty_concurrent_requests_all_finish_and_nothing_is_lost(served):
    url, run = served(Limits(max_concurrent=64))
    expected = {seed: run.predict(PREFIX, 20, seed=seed).removeprefix(PREFIX)
                for seed in range(50)}

    def ask(seed: int):
        r = httpx.post(url + "/api/continue", json={"prefix": PREFIX, "num_chars": 20,
                                                    "seed": seed}, timeout=120)
        return seed, r.status_code, r.json()

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert [s for s, status, _ in answers if status != 200] == []
    assert {s: body["outputs"][0] for s, _, body in answers} == expected


def test_past_the_cap_a_request_gets_429_and_a_freed_slot_serves_again(served):
    url, run = served(Limits(max_concurrent=2))
    slots = served.app.state.slots
    held = [slots.hold(), slots.hold()]  # (two generations running, however fast they are)
    for path, body in (("/api/continue", {"prefix": PREFIX}), ("/api/stream", {"prefix": PREFIX}),
                       ("/api/gates", {"text": "the time"})):
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 429 and "all 2 generation slots are busy" in r.json()["error"]
    held[0]()
    held[0]()  # (given back once, however often it is called)
    assert httpx.post(url + "/api/continue", json={"prefix": PREFIX}, timeout=60
                      ).status_code == 200
    r = httpx.post(url + "/api/continue", json={"prefix": PREFIX}, timeout=60)
    assert r.status_code == 200  # (the request gave its slot back: one is still free)
    held[1]()
    with httpx.stream("POST", url + "/api/stream", json={"prefix": PREFIX, "num_chars": 5},
                      timeout=60) as s:
        assert list(s.iter_lines())[-1] == '{"done": true, "chars": 5}'
    both = [slots.hold(), slots.hold()]  # (the stream gave its slot back too)
    for release in both:
        release()


def test_a_request_past_its_time_gets_504(served):
    url, _ = served(Limits(timeout_s=0.001))
    r = httpx.post(url + "/api/continue", json={"prefix": PREFIX, "num_chars": 2000},
                   timeout=60)
    assert r.status_code == 504 and "longer than the time allowed" in r.json()["error"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser_page(served):
    """The server's page in headless Chromium, once it shows the run's card, and the run;
    skipped where there is no Chromium (.ci/run installs it)."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs "
                    "it)")
    from playwright.sync_api import sync_playwright

    url, run = served()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('card').textContent"
                                   ".includes('gru-scratch')")
            yield page, run
        finally:
            browser.close()


def test_the_page_continues_a_prefix_and_draws_the_gates_in_a_browser(browser_page):
    page, run = browser_page
    page.fill("#prefix", PREFIX)
    page.fill("#length", "40")
    page.fill("#temperature", "0.6")
    page.click("#go")
    page.wait_for_selector("#output[data-done=true]", timeout=60_000)
    shown = page.text_content("#continuation")
    assert shown == run.predict(PREFIX, 40).removeprefix(PREFIX)
    page.wait_for_selector("#heat td", timeout=60_000)
    cells = page.locator("#heat td")
    assert cells.count() > 40
    cells.nth(3).hover()
    assert "character" in page.inner_text("#hover")
    assert page.inner_text("#error") == ""


def test_the_page_says_errors_in_its_own_terms(browser_page):
    page, _ = browser_page
    page.fill("#prefix", PREFIX)
    page.fill("#length", "5000")  # (this server takes at most 2,000)
    page.click("#go")
    error = page.inner_text("#error")
    assert "Characters" in error and "2,000" in error and "num_chars" not in error
    assert page.get_attribute("#length", "aria-invalid") == "true"
    page.fill("#length", "40")
    page.fill("#temperature", "1e39")  # (refused by the server, past float32)
    page.click("#go")
    page.wait_for_function("document.getElementById('error').textContent !== ''")
    error = page.inner_text("#error")
    assert error.startswith("Temperature 1e+39 is invalid"), error
    assert "temperature" not in error and "greedy" not in error and "--" not in error
    assert page.get_attribute("#temperature", "aria-invalid") == "true"
    assert page.get_attribute("#length", "aria-invalid") is None


@pytest.mark.slow  # (a gru-lm serve process, stopped by a signal)
def test_gru_lm_serve_listens_on_loopback_says_where_and_stops_on_ctrl_c(tiny_run):
    import os
    import re
    import signal
    import subprocess
    import sys

    run = tiny_run()
    p = subprocess.Popen([sys.executable, "-m", "gru_lm", "serve", str(run), "--port", "0",
                          "--threads", "1"], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    try:
        line = p.stderr.readline()
        m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        assert httpx.get(m.group(1) + "/api/card", timeout=30).json()["run"] == run.name
        p.send_signal(signal.SIGINT)
        assert p.wait(30) in (0, 130)  # (130: stopped by Ctrl-C, as the shell reports it)
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


def _answers(url: str) -> dict:
    """What each endpoint answers to the same seeded requests."""
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/api/stream", json={"prefix": PREFIX, "num_chars": 20,
                                                   "seed": 7}) as s:
            stream = [json.loads(line) for line in s.iter_lines() if line]
        return {"card": c.get("/api/card").json(),
                "continue": c.post("/api/continue", json={"prefix": PREFIX, "num_chars": 20,
                                                          "seed": 7}).json(),
                "beam": c.post("/api/continue", json={"prefix": PREFIX, "num_chars": 10,
                                                      "beam": 2}).json(),
                "stream": stream,
                "gates": c.post("/api/gates", json={"text": "the time", "units": 3}).json()}


def test_every_endpoint_answers_from_the_model_loaded_at_start(served):
    url, run = served()
    before = _answers(url)
    assert before["continue"]["outputs"][0] == "".join(x.get("text", "") for x in
                                                       before["stream"])
    checkpoint = run.checkpoint
    weights = checkpoint.read_bytes()  # (training went on: other weights, another size)
    checkpoint.write_bytes(weights[: len(weights) // 2])
    assert _answers(url) == before
    shutil.rmtree(run.path)  # (the run deleted while it is served)
    assert _answers(url) == before


def _raw(url: str, request: bytes) -> tuple[int, dict, bytes]:
    """Send bytes as they are (a body the client need not have) and read the response."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_a_body_past_the_limit_is_413_before_the_rest_is_read(served):
    url, _ = served(Limits(max_body=2048))
    assert httpx.get(url + "/api/card", timeout=60).json()["limits"]["max_body"] == 2048
    # Content-Length says 200 MB and not one byte follows: answered from the header alone
    status, headers, body = _raw(url, b"POST /api/continue HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\n"
                                 b"Content-Length: 200000000\r\n\r\n")
    error = json.loads(body)["error"]
    assert status == 413 and headers["connection"] == "close"
    assert "over 2,048 bytes, this server's limit" in error and "\n" not in error
    # chunked, no Content-Length: refused once it passes the limit
    text = json.dumps({"prefix": "x" * 3000}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(text[i:i + 500]), text[i:i + 500])
                      for i in range(0, len(text), 500))
    status, _, body = _raw(url, b"POST /api/continue HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                           b"\r\n" + chunks + b"0\r\n\r\n")
    assert status == 413 and "over 2,048 bytes" in json.loads(body)["error"]
    # a body within the limit, chunked too, is read whole and answered
    small = json.dumps({"prefix": PREFIX, "num_chars": 5}).encode()
    r = httpx.post(url + "/api/continue", content=iter([small[:10], small[10:]]), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and len(r.json()["outputs"][0]) == 5


def test_the_default_body_limit_takes_the_longest_prefix_the_server_allows():
    assert Limits().body_bytes == 256 * 1024
    assert Limits(max_prefix=100_000).body_bytes >= 6 * 100_000  # (every character \uXXXX)


def test_stopping_the_server_ends_a_running_stream_with_an_error_line(served, monkeypatch,
                                                                      caplog):
    import gru_lm.server

    def endless(model, ids, d, deadline=None):  # (a stream as long as the test wants)
        while True:
            time.sleep(0.005)
            yield [ids[-1]]

    monkeypatch.setattr(gru_lm.server, "draw", endless)
    url, _ = served()
    with httpx.stream("POST", url + "/api/stream", json={"prefix": PREFIX, "num_chars": 2000},
                      timeout=60) as s:
        lines = s.iter_lines()
        assert "text" in json.loads(next(lines))
        served.server.handle_exit(2, None)  # (what Ctrl-C, SIGINT, does; SIGTERM alike)
        rest = [json.loads(line) for line in lines if line]
    assert "the server is stopping" in rest[-1]["error"]
    served.thread.join(30)
    assert not served.thread.is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")
            ] == []


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads 0 is invalid; give an integer from 1"),
    (["--threads", "-2"], "--threads -2 is invalid"),
    (["--max-chars", "20000"], "--max-chars 20000 is out of range; give 1..10000"),
    (["--max-samples", "5000"], "--max-samples 5000 is out of range; give 1..1000"),
    (["--max-body", "10"], "--max-body 10 is invalid"),
    (["--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),
])
def test_serve_refuses_what_it_cannot_do_at_startup_in_one_line(tiny_run, args, message):
    r = cli("serve", tiny_run(), "--port", "0", *args)
    one_line_error(r, message)
    assert len(r.output.strip().splitlines()) == 1 and "listening on" not in r.output


def test_serve_on_a_taken_port_is_one_error_line(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("serve", tiny_run(), "--port", port)
    one_line_error(r, f"--port {port} on 127.0.0.1 is taken by another program")
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("method, path, content, status, message", [
    ("GET", "/nothing-here", None, 404, "nothing at /nothing-here; this server answers GET /,"),
    ("GET", "/api/continue", None, 405, "/api/continue does not take GET; use POST"),
    ("POST", "/api/card", b"{}", 405, "/api/card does not take POST; use GET"),
    ("POST", "/api/continue", b'{"prefix": "\xff\xfe"}', 400, "the body is not UTF-8 JSON"),
    ("POST", "/api/continue", b"{not json", 422, "the body is not valid JSON"),
])
def test_every_error_has_the_same_shape(served, method, path, content, status, message):
    url, _ = served()
    r = httpx.request(method, url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert list(r.json()) == ["error"] and message in r.json()["error"], r.text


def test_errors_name_the_field_at_fault(served):
    url, _ = served()
    for body, field in (({"prefix": "time", "num_chars": 5000}, "num_chars"),
                        ({"prefix": "time", "temperature": -1}, "temperature"),
                        ({"prefix": " "}, "prefix"), ({"prefix": "time", "beem": 2}, "beem")):
        r = httpx.post(url + "/api/continue", json=body, timeout=60)
        assert r.json()["field"] == field, r.text


def test_a_cli_hint_is_left_out_of_the_apis_words(tiny_run):
    from gru_lm.errors import GruLmError
    from gru_lm.sampling import encode_prefix
    from gru_lm.server import in_api_terms

    run = gru_lm.load(tiny_run("hint"))
    cfg, vocab, _ = run._model()
    with pytest.raises(GruLmError) as e:
        encode_prefix("time 7", vocab, cfg.data.model_copy(update={"preset": "raw"}))
    assert "--unknown skip" in str(e.value)  # (the CLI's words)
    message, field = in_api_terms(str(e.value))
    assert "--" not in message and "unknown skip" not in message and field == "prefix"
    assert message.endswith("leave them out")


def test_the_docs_load_their_script_and_styles_from_this_server(served):
    url, _ = served()
    with httpx.Client(base_url=url, timeout=60) as c:
        for page in ("/docs", "/redoc"):
            html = c.get(page).text
            assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
            assert any(a.endswith(".js") for a in assets), html
            for a in assets:
                assert a.startswith("/"), f"{page} loads {a} from elsewhere"
                r = c.get(a)
                assert r.status_code == 200 and len(r.content) > 100, a
