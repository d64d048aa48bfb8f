"""`gru-lm serve`: the JSON API with a real HTTP client on 127.0.0.1, and the page in headless
Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

import gru_lm
from gru_lm.server import Limits, create_app

PREFIX = "time traveller"


@pytest.fixture
def served(tiny_run):
    """start(limits) -> (base url, Run): a server on a free port of 127.0.0.1, in a thread,
    stopped after the test."""
    servers = []

    def start(limits: Limits = Limits()):
        run = gru_lm.load(tiny_run(f"s{len(servers)}"))
        start.app = create_app(run, limits)
        server = uvicorn.Server(uvicorn.Config(start.app, host="127.0.0.1", port=0,
                                               log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
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
    ("/api/continue", {"prefix": "time", "beam": 3, "greedy": True}, 400, "--beam 3 and"),
    ("/api/continue", {"prefix": "time", "beam": 40}, 400, "over this server's limit"),
    ("/api/continue", {"prefix": "time", "num_chars": 5000}, 400, "over this server's limit"),
    ("/api/continue", {"prefix": "x" * 10_001}, 400, "at most 10,000"),
    ("/api/continue", {"prefix": "time", "num_samples": 9}, 400, "num_samples 9"),
    ("/api/continue", {"prefix": "time", "top_k": 0}, 400, "--top-k 0 is invalid"),
    ("/api/stream", {"prefix": "time", "num_samples": 2}, 400, "draws one sample"),
    ("/api/gates", {"text": ""}, 400, ""),
    ("/api/gates", {"text": "time", "units": 0}, 400, "--units 0"),
])
def test_each_bad_request_is_a_4xx_with_one_line(served, path, body, status, message):
    url, _ = served()
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in error
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


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install "
                    "chromium; .ci/run installs it)")
def test_the_page_continues_a_prefix_and_draws_the_gates_in_a_browser(served):
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
        finally:
            browser.close()


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
