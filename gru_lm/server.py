"""`gru-lm serve`: a trained model behind a small JSON API and one web page (FastAPI on
uvicorn, the serve extra: pip install "gru-lm[serve]").

    GET  /                 the page: a prefix box, temperature and length, the continuation
                           as it is drawn, the gates of the text as a heat map to hover
    GET  /api/card         the run: model, data, held-out perplexity, the server's limits
    POST /api/continue     continue a prefix (Decoding's fields; beam=K for beam search)
    POST /api/stream       the same, one sample, streamed as it is drawn (NDJSON lines)
    POST /api/gates        the gates of a text, as `gru-lm gates --json` writes them
    GET  /docs             the OpenAPI docs (/openapi.json)

The model is loaded once and shared. Each request is bounded: prefix and length limits, at
most `max_concurrent` generations at a time (HTTP 429 past it), a per-request time limit
(HTTP 504). A bad request gets a 4xx whose body is {"error": "one line"}; nothing answers
with a traceback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gru_lm import __version__
from gru_lm.decoding import DEFAULT_CHARS, DEFAULT_TEMPERATURE, Decoding
from gru_lm.errors import GruLmError
from gru_lm.members import locate
from gru_lm.recurrent import count_parameters
from gru_lm.sampling import TimedOut, draw, encode_prefix
from gru_lm.trained import Run, _check_prompt

EXTRA = 'pip install "gru-lm[serve]"'


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may generate at once."""

    max_prefix: int = 10_000  # characters of a prefix (or of a text's gates)
    max_chars: int = 2_000  # characters a continuation adds
    max_samples: int = 8  # samples (or beams) a request
    max_concurrent: int = 4  # generations at a time; past it HTTP 429
    timeout_s: float = 30.0  # a generation's time; past it HTTP 504

    def check(self) -> None:
        for name in ("max_prefix", "max_chars", "max_samples", "max_concurrent"):
            if getattr(self, name) < 1:
                raise GruLmError(f"--{name.replace('_', '-')} {getattr(self, name)} is "
                                 "invalid; give an integer >= 1")
        if not 0 < self.timeout_s <= 3600:
            raise GruLmError(f"--timeout {self.timeout_s} is invalid; give seconds in (0, 3600]")


class Busy(GruLmError):
    """Every generation slot is taken."""


class Slots:
    """At most `n` generations at a time: a request past them is refused at once (429), not
    queued behind a long one."""

    def __init__(self, n: int):
        self._sem = threading.BoundedSemaphore(n)
        self.n = n

    def hold(self):
        """Take a slot (else Busy); the function returned gives it back, once however often
        it is called (a stream gives it back when it ends, or when its client leaves before
        it starts)."""
        if not self._sem.acquire(blocking=False):
            raise Busy(f"all {self.n} generation slots are busy; try again in a moment")
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self._sem.release()

        return release

    @contextmanager
    def take(self):
        release = self.hold()
        try:
            yield
        finally:
            release()


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

class ContinueRequest(Body):
    """Decoding's fields (gru_lm.Decoding); unset ones take its defaults."""

    prefix: str | None = Field(None, description="text to continue (a poem in a form "
                               "needs none)")
    num_chars: int | None = Field(None, description="characters to add (default 50)")
    num_samples: int = 1
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    greedy: bool = False
    beam: int | None = Field(None, description="beam search: the K likeliest")
    no_repeat: int | None = None
    acrostic: str | None = None
    form: str | None = None

class GatesRequest(Body):
    text: str
    layer: int = 0
    units: int = 16


def _fastapi():
    try:
        import fastapi
        import pydantic  # noqa: F401  (FastAPI's own dependency)
    except ImportError:
        raise GruLmError(f"gru-lm serve needs FastAPI and uvicorn, which are not installed; "
                         f"{EXTRA}") from None
    return fastapi


def create_app(run: Run, limits: Limits = Limits()):
    """The FastAPI application serving `run` (its model loaded now, once)."""
    _fastapi()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask

    limits.check()
    cfg, vocab, model = run._model()  # (loaded once: every request shares it)
    slots = Slots(limits.max_concurrent)
    card = _card(run, limits)

    app = FastAPI(title="gru-lm", version=card["gru_lm"],
                  description=f"The run {card['run']} ({card['model']}), served by gru-lm.")
    app.state.slots = slots

    def one_line(status: int, message: str):
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "the body"
        return one_line(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Busy)
    async def _busy(request: Request, e: Busy):
        return one_line(429, str(e))

    @app.exception_handler(TimedOut)
    async def _timeout(request: Request, e: TimedOut):
        return one_line(504, str(e))

    @app.exception_handler(GruLmError)
    async def _bad(request: Request, e: GruLmError):
        return one_line(400, str(e))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):  # (logged by uvicorn, not shown)
        return one_line(500, f"internal error ({type(e).__name__}); see the server's log")

    def decoding(req: ContinueRequest) -> Decoding:
        asked = req.model_dump(exclude={"prefix"}, exclude_unset=True)
        d = Decoding.of(**asked)
        _check_prompt(req.prefix, d, "error")
        if req.prefix is not None and len(req.prefix) > limits.max_prefix:
            raise GruLmError(f"the prefix has {len(req.prefix):,} characters; this server "
                             f"takes at most {limits.max_prefix:,}")
        if d.poem is None and d.num_chars > limits.max_chars:
            raise GruLmError(f"num_chars {d.num_chars:,} is over this server's limit; give "
                             f"at most {limits.max_chars:,}")
        if d.count > limits.max_samples:
            what = "beam" if d.beam is not None else "num_samples"
            raise GruLmError(f"{what} {d.count} is over this server's limit; give at most "
                             f"{limits.max_samples}")
        return d

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("gru_lm").joinpath("web/index.html").read_text(
            encoding="utf-8")

    @app.get("/api/card")
    def get_card() -> dict[str, Any]:
        """The run served: model, data, held-out perplexity, and this server's limits."""
        return card

    @app.post("/api/continue")
    def post_continue(req: ContinueRequest) -> dict[str, Any]:
        """Continue `prefix` (or write a poem in a form): the continuations and, for beam
        search, each one's mean log-loss in nats per character."""
        d = decoding(req)
        with slots.take():
            r = run._continue(req.prefix, d, deadline=_deadline(limits))
        return {"prompt": r.prompt, "outputs": r.outputs, "log_losses": r.log_losses,
                "skipped": r.skipped, "note": d.note, "decoding": _described(d)}

    @app.post("/api/stream")
    def post_stream(req: ContinueRequest):
        """One sample, streamed as it is drawn: NDJSON lines {"text": "..."} (a character,
        or more where the vocabulary's tokens are), then {"done": true, "chars": N}, or
        {"error": "..."} if it stops early."""
        d = decoding(req)
        if d.count != 1 or d.beam is not None or d.poem is not None:
            raise GruLmError("/api/stream draws one sample (no beam, no form); use "
                             "/api/continue for several")
        assert req.prefix is not None
        ids, _ = encode_prefix(req.prefix, vocab, cfg.data)
        release = slots.hold()  # (while the stream runs; the background task gives it
        # back too, should the client leave before the stream starts)

        def lines() -> Iterator[str]:
            out: list[int] = []
            shown = ""
            try:
                for (t,) in draw(model, ids, d, deadline=_deadline(limits)):
                    assert t is not None
                    out.append(t)
                    text = vocab.decode(out)
                    if len(text) > len(shown):
                        yield json.dumps({"text": text[len(shown):]}, ensure_ascii=False) + "\n"
                        shown = text
                yield json.dumps({"done": True, "chars": len(out)}) + "\n"
            except GruLmError as e:
                yield json.dumps({"error": str(e)}) + "\n"
            finally:
                release()

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 background=BackgroundTask(release))

    @app.post("/api/gates")
    def post_gates(req: GatesRequest) -> dict[str, Any]:
        """The gates at every character of `text` (`gru-lm gates --json`'s fields)."""
        if len(req.text) > limits.max_prefix:
            raise GruLmError(f"the text has {len(req.text):,} characters; this server takes "
                             f"at most {limits.max_prefix:,}")
        with slots.take():
            return run.gates(req.text, req.layer, req.units).to_json()

    return app


def _deadline(limits: Limits) -> float:
    return time.monotonic() + limits.timeout_s


def _described(d: Decoding) -> dict[str, Any]:
    return {k: getattr(d, k) for k in ("num_chars", "temperature", "top_k", "top_p", "seed",
                                       "num_samples", "beam", "no_repeat")}


def _card(run: Run, limits: Limits) -> dict[str, Any]:
    cfg, vocab, model = run._model()
    s = run.summary or {}
    d = cfg.data
    return {"run": Path(run.path).resolve().name, "checkpoint": str(run.checkpoint),
            "model": cfg.model.name, "num_hiddens": cfg.model.num_hiddens,
            "num_layers": cfg.model.num_layers,
            "params": count_parameters(model), "data": d.text_name,
            "preset": d.preset, "vocab_size": len(vocab), "steps": s.get("steps"),
            "val_ppl": s.get("best_val_ppl"), "test_ppl": s.get("best_test_ppl"),
            "defaults": {"temperature": DEFAULT_TEMPERATURE, "num_chars": DEFAULT_CHARS},
            "limits": {"max_prefix": limits.max_prefix, "max_chars": limits.max_chars,
                       "max_samples": limits.max_samples,
                       "max_concurrent": limits.max_concurrent,
                       "timeout_s": limits.timeout_s},
            "gru_lm": __version__}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(run: str | Path | None, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits = Limits(), runs_dir: str | Path = "runs", threads: int | None = None,
          ready=None) -> None:
    """Serve a run (None: the newest under runs_dir) until Ctrl-C. `ready(url)` is called
    once the server listens."""
    _fastapi()
    try:
        import uvicorn
    except ImportError:
        raise GruLmError(f"gru-lm serve needs uvicorn, which is not installed; {EXTRA}"
                         ) from None
    if not 0 <= port <= 65535:
        raise GruLmError(f"--port {port} is out of range; give 0..65535 (0: any free port)")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    where = locate(run, runs_dir)
    app = create_app(Run(where.run.path, checkpoint=where.checkpoint), limits)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    if ready is not None:
        _when_started(server, ready)
    server.run()


def _when_started(server, ready) -> None:
    """Call ready(url) from a watcher thread once uvicorn listens (port 0: the port it got)."""

    def watch() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.02)
        sock = server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        ready(f"http://{'[' + host + ']' if ':' in host else host}:{port}")

    threading.Thread(target=watch, daemon=True).start()
