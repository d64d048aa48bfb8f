"""`gru-lm serve`: a trained model behind a small JSON API and one web page (FastAPI on
uvicorn, the serve extra: pip install "gru-lm[serve]").

    GET  /                 the page: a prefix box, temperature and length, the continuation
                           as it is drawn, the gates of the text as a heat map to hover
    GET  /api/card         the run: model, data, held-out perplexity, the server's limits
    POST /api/continue     continue a prefix (Decoding's fields; beam=K for beam search)
    POST /api/stream       the same, one sample, streamed as it is drawn (NDJSON lines)
    POST /api/gates        the gates of a text, as `gru-lm gates --json` writes them
    GET  /docs             the OpenAPI docs (/openapi.json), their script and styles served
                           from this server (fastapi-offline ships them), so they work offline

The model is loaded once, when the server starts, and every endpoint answers from it: training
on, replacing or deleting the run while it is served changes nothing until a restart. Each
request is bounded: a body of at most `max_body` bytes (HTTP 413, before the rest is read),
prefix and length limits, at most `max_concurrent` generations at a time (HTTP 429 past it),
a per-request time limit (HTTP 504). Every error, a 404 or 405 too, is a 4xx or 5xx whose body
is {"error": "one line"} naming the request's fields (and "field": the one at fault, where
there is one); nothing answers with a traceback. Ctrl-C or SIGTERM ends a running stream with
an {"error": ...} line, and lets other requests finish within their time limit."""

from __future__ import annotations

import errno
import json
import re
import socket
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
from gru_lm.decoding import DEFAULT_CHARS, DEFAULT_TEMPERATURE, MAX_BEAM, MAX_SAMPLES, Decoding
from gru_lm.decoding import MAX_CHARS as DECODING_MAX_CHARS
from gru_lm.errors import GruLmError
from gru_lm.gatereport import MAX_CHARS as GATES_MAX_CHARS
from gru_lm.members import locate
from gru_lm.recurrent import count_parameters
from gru_lm.sampling import MAX_PREFIX_CHARS, TimedOut, draw, encode_prefix
from gru_lm.trained import Run, _check_prompt

EXTRA = 'pip install "gru-lm[serve]"'


BODY_BYTES = 256 * 1024  # the default body limit: 10,000 characters, each \uXXXX-escaped
BYTES_A_CHAR = 6  # (a character's most in JSON, \uXXXX, but for the rare astral ones)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may generate at once."""

    max_prefix: int = 10_000  # characters of a prefix (or of a text's gates)
    max_chars: int = 2_000  # characters a continuation adds
    max_samples: int = 8  # samples (or beams) a request
    max_concurrent: int = 4  # generations at a time; past it HTTP 429
    timeout_s: float = 30.0  # a generation's time; past it HTTP 504
    max_body: int | None = None  # bytes of a request's body; None: BODY_BYTES, or more when
    # max_prefix needs it (BYTES_A_CHAR a character); past it HTTP 413

    @property
    def body_bytes(self) -> int:
        if self.max_body is not None:
            return self.max_body
        return max(BODY_BYTES, BYTES_A_CHAR * self.max_prefix + 4096)

    @property
    def gates_chars(self) -> int:
        """The longest text whose gates a request may ask for."""
        return min(self.max_prefix, GATES_MAX_CHARS)

    def check(self) -> None:
        """Each limit within what the server can honour (checked when it starts, so no
        request is refused by a limit the server was started with)."""
        for name, most in (("max_prefix", MAX_PREFIX_CHARS), ("max_chars", DECODING_MAX_CHARS),
                           ("max_samples", min(MAX_SAMPLES, MAX_BEAM)),
                           ("max_concurrent", None)):
            v = getattr(self, name)
            if most is None and v < 1:
                raise GruLmError(f"--{name.replace('_', '-')} {v} is invalid; give an integer "
                                 ">= 1")
            if most is not None and not 1 <= v <= most:
                raise GruLmError(f"--{name.replace('_', '-')} {v} is out of range; give "
                                 f"1..{most} (a request draws at most {most:,})")
        if not 0 < self.timeout_s <= 3600:
            raise GruLmError(f"--timeout {self.timeout_s} is invalid; give seconds in (0, 3600]")
        if self.max_body is not None and self.max_body < 1024:
            raise GruLmError(f"--max-body {self.max_body} is invalid; give bytes >= 1024 (a "
                             "request's JSON body)")


class Busy(GruLmError):
    """Every generation slot is taken."""


class BadField(GruLmError):
    """A request's field is out of what this server takes (HTTP 400 naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# The request's fields as the CLI's options name them, for the messages of gru_lm.decoding,
# sampling and gatereport, which speak to the CLI: over HTTP they name the JSON fields.
FIELDS = ("num_chars", "num_samples", "temperature", "top_k", "top_p", "seed", "greedy",
          "beam", "no_repeat", "acrostic", "form", "units", "layer")
_OPTION = re.compile(r"--(" + "|".join(f.replace("_", "-") for f in FIELDS) + r")\b")
_CLI_ONLY = re.compile(r",? or --unknown skip drops them|,? or drop --png")


def in_api_terms(message: str) -> tuple[str, str | None]:
    """A domain error's text in the API's terms (`--num-chars` is `num_chars`; no hint about
    CLI options the API has not), and the request field it is about, if any."""
    field = None
    m = _OPTION.search(message)
    if m:
        field = m.group(1).replace("-", "_")
    elif message.startswith("the prefix"):
        field = "prefix"
    elif message.startswith("the text"):
        field = "text"
    message = _CLI_ONLY.sub("", message)
    return _OPTION.sub(lambda m: m.group(1).replace("-", "_"), message), field


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
        import fastapi_offline  # noqa: F401  (the docs' script and styles, served locally)
        import pydantic  # noqa: F401  (FastAPI's own dependency)
    except ImportError as e:
        raise GruLmError(f"gru-lm serve needs {e.name or 'FastAPI'}, which is not installed; "
                         f"{EXTRA}") from None
    return fastapi


def create_app(run: Run, limits: Limits = Limits()):
    """The FastAPI application serving `run` (its model loaded now, once)."""
    _fastapi()
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from fastapi_offline import FastAPIOffline
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    limits.check()
    run = Loaded(run)  # (loaded once: every request shares it, whatever happens on disk)
    cfg, vocab, model = run._model()
    slots = Slots(limits.max_concurrent)
    card = _card(run, limits)

    # FastAPIOffline: FastAPI whose /docs and /redoc load their script from this server
    app = FastAPIOffline(title="gru-lm", version=card["gru_lm"],
                         description=f"The run {card['run']} ({card['model']}), served by "
                         "gru-lm.")
    app.state.slots = slots
    app.state.limits = limits
    app.state.stopping = threading.Event()  # set as the server shuts down: streams end
    app.add_middleware(BodyLimit, limit=limits.body_bytes, max_prefix=limits.max_prefix)

    def one_line(status: int, message: str, field: str | None = None, headers=None):
        body = {"error": " ".join(str(message).split())}
        if field is not None:
            body["field"] = field
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            why = first.get("ctx", {}).get("error", "invalid")
            return one_line(422, f"the body is not valid JSON ({why}); send an object such "
                            f"as {EXAMPLE}")
        where = ".".join(loc) or "the body"
        return one_line(422, f"{where}: {first.get('msg', 'invalid')}",
                        loc[0] if len(loc) == 1 else None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        path, method = request.url.path, request.method
        if e.status_code == 404:
            message = (f"nothing at {path}; this server answers {', '.join(ENDPOINTS)}")
        elif e.status_code == 405:
            allowed = {k.lower(): v for k, v in (e.headers or {}).items()}.get("allow")
            message = f"{path} does not take {method}; use {allowed or 'another method'}"
        elif e.status_code == 400 and "parsing the body" in str(e.detail):
            message = f"the body is not UTF-8 JSON; send an object such as {EXAMPLE}"
        else:
            message = str(e.detail)
        return one_line(e.status_code, message, headers=e.headers)

    @app.exception_handler(Busy)
    async def _busy(request: Request, e: Busy):
        return one_line(429, str(e))

    @app.exception_handler(TimedOut)
    async def _timeout(request: Request, e: TimedOut):
        return one_line(504, str(e))

    @app.exception_handler(GruLmError)
    async def _bad(request: Request, e: GruLmError):
        message, field = in_api_terms(str(e))
        return one_line(400, message, getattr(e, "field", field))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):  # (logged by uvicorn, not shown)
        return one_line(500, f"internal error ({type(e).__name__}); see the server's log")

    def decoding(req: ContinueRequest) -> Decoding:
        """The request's Decoding, its counts checked against this server's limits first
        (Decoding's own ranges are the CLI's, wider than a server's)."""
        if req.prefix is not None and len(req.prefix) > limits.max_prefix:
            raise BadField("prefix", f"the prefix has {len(req.prefix):,} characters; this "
                           f"server takes at most {limits.max_prefix:,}")
        for field, most in (("num_chars", limits.max_chars),
                            ("num_samples", limits.max_samples),
                            ("beam", limits.max_samples)):
            v = getattr(req, field)
            if v is not None:
                _within(field, v, most)
        asked = req.model_dump(exclude={"prefix"}, exclude_unset=True)
        d = Decoding.of(**asked)
        _check_prompt(req.prefix, d, "error")
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
        stopping = app.state.stopping

        def lines() -> Iterator[str]:
            out: list[int] = []
            shown = ""
            try:
                for (t,) in draw(model, ids, d, deadline=_deadline(limits)):
                    if stopping.is_set():  # (Ctrl-C or SIGTERM: the client hears why)
                        yield json.dumps({"error": f"the server is stopping; {len(out)} of "
                                          f"{d.num_chars} characters were drawn"}) + "\n"
                        return
                    assert t is not None
                    out.append(t)
                    text = vocab.decode(out)
                    if len(text) > len(shown):
                        yield json.dumps({"text": text[len(shown):]}, ensure_ascii=False) + "\n"
                        shown = text
                yield json.dumps({"done": True, "chars": len(out)}) + "\n"
            except GruLmError as e:
                yield json.dumps({"error": in_api_terms(str(e))[0]}, ensure_ascii=False) + "\n"
            finally:
                release()

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 background=BackgroundTask(release))

    @app.post("/api/gates")
    def post_gates(req: GatesRequest) -> dict[str, Any]:
        """The gates at every character of `text` (`gru-lm gates --json`'s fields)."""
        if len(req.text) > limits.gates_chars:
            raise BadField("text", f"the text has {len(req.text):,} characters; this server "
                           f"shows the gates of at most {limits.gates_chars:,}")
        with slots.take():
            return run.gates(req.text, req.layer, req.units).to_json()

    return app


EXAMPLE = '{"prefix": "time traveller", "num_chars": 50}'
ENDPOINTS = ("GET /", "GET /api/card", "POST /api/continue", "POST /api/stream",
             "POST /api/gates", "GET /docs", "GET /openapi.json")


def _within(field: str, value: int, most: int) -> None:
    if value < 1:
        raise BadField(field, f"{field} {value:,} is invalid; give 1 to {most:,}")
    if value > most:
        raise BadField(field, f"{field} {value:,} is over this server's limit; give at most "
                       f"{most:,}")


class Loaded(Run):
    """A run as it was when the server started: its model, checkpoint and summary, held in
    memory. (A Run reloads its checkpoint when the file changes; a server must answer every
    request, on every endpoint, from one model, whatever happens to the run on disk.)"""

    def __init__(self, run: Run):
        super().__init__(run.path, checkpoint=run.checkpoint)
        self._member = run._model()
        self._summary = run.summary
        self._pinned = Path(run.checkpoint)

    def _model(self):
        return self._member

    @property
    def checkpoint(self) -> Path:
        return self._pinned

    @property
    def summary(self) -> dict[str, Any] | None:
        return self._summary


class BodyLimit:
    """ASGI middleware: a request's body is read up to `limit` bytes, and past it answered
    with HTTP 413 at once, before the rest is read (a Content-Length over it is refused
    before any byte of the body; a chunked body as soon as it passes the limit)."""

    def __init__(self, app, limit: int, max_prefix: int):
        self.app, self.limit, self.max_prefix = app, limit, max_prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # (the client left)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body, given = b"".join(chunks), False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # (a disconnect, as a stream listens for it)

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        error = (f"the request body is over {self.limit:,} bytes, this server's limit; send "
                 f"a shorter prefix or text (at most {self.max_prefix:,} characters)")
        payload = json.dumps({"error": error}).encode()
        # (Connection: close: the rest of the body is never read, so the connection ends)
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


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
                       "timeout_s": limits.timeout_s, "max_body": limits.body_bytes},
            "gru_lm": __version__}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(run: str | Path | None, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits = Limits(), runs_dir: str | Path = "runs", threads: int | None = None,
          ready=None) -> None:
    """Serve a run (None: the newest under runs_dir) until Ctrl-C. `ready(url)` is called
    once the server listens."""
    _fastapi()
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise GruLmError(f"gru-lm serve needs uvicorn, which is not installed; {EXTRA}"
                         ) from None
    limits.check()
    if threads is not None and (isinstance(threads, bool) or not 1 <= threads <= 1024):
        raise GruLmError(f"--threads {threads} is invalid; give an integer from 1 to 1024 (or "
                         "leave it out for torch's default)")
    if not 0 <= port <= 65535:
        raise GruLmError(f"--port {port} is out of range; give 0..65535 (0: any free port)")
    where = locate(run, runs_dir)
    sock = bind(host, port)  # (before the model loads: a bad address is said at once)
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        app = create_app(Run(where.run.path, checkpoint=where.checkpoint), limits)
        server = make_server(app, host, port)
        if ready is not None:
            _when_started(server, ready)
        server.run(sockets=[sock])
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or one GruLmError saying why not (uvicorn would log its
    own line after ours and exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        if isinstance(e, socket.gaierror) or getattr(e, "errno", None) == errno.EADDRNOTAVAIL:
            raise GruLmError(f"--host {host} is not an address of this machine "
                             f"({getattr(e, 'strerror', None) or e}); give 127.0.0.1 (this "
                             "machine only), 0.0.0.0 (every interface) or one of its "
                             "addresses") from None
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            raise GruLmError(f"--port {port} on {host} is taken by another program; give "
                             "another port, or 0 for any free one") from None
        if getattr(e, "errno", None) == errno.EACCES:
            raise GruLmError(f"--port {port} needs privileges to listen on; give a port "
                             "from 1024, or 0 for any free one") from None
        raise GruLmError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e});"
                         " give another --host or --port") from None
    sock.set_inheritable(True)
    return sock


def make_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """The uvicorn server of an app from create_app. On Ctrl-C or SIGTERM it ends running
    streams at once (each with an {"error": ...} line) and waits for other requests as long
    as their time limit, so none is cancelled midway (with a traceback in the log)."""
    import uvicorn

    stopping: threading.Event = app.state.stopping
    limits: Limits = app.state.limits

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            stopping.set()
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=int(limits.timeout_s) + 2))


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
