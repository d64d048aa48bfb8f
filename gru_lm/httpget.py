"""Files over HTTP(S): a GET with retries on connection errors and 5xx, redirects followed
one by one (at most MAX_REDIRECTS, never from https down to http), timeouts on connecting,
reading and the whole transfer, a progress bar, and the file moved into place only once its
SHA-1 (or SHA-256) verifies; every failure is one DataError line."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from urllib.parse import urljoin, urlparse

from gru_lm.errors import DataError
from gru_lm.utils import atomic_writer

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
TOTAL_TIMEOUT_S = 600.0
MAX_REDIRECTS = 5


def _session(retries: int):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=retries,
        connect=retries,
        read=0,
        status=retries,
        backoff_factor=0.2,
        status_forcelist=(500, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
        redirect=0,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def download(
    url: str,
    sha1: str | None,
    dest: Path,
    *,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    total_timeout_s: float = TOTAL_TIMEOUT_S,
    retries: int = 3,
    progress: bool = True,
    algorithm: str = "sha1",
) -> Path:
    """Stream `url` into a temp file beside `dest`, verify its digest (`algorithm`: sha1 or
    sha256; None: an archive whose members are verified instead), then move it into place."""
    import requests

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    session = _session(retries)
    deadline = time.monotonic() + total_timeout_s
    try:
        with _follow(session, url, timeout) as resp:
            _save(resp, url, sha1, dest, progress, deadline, total_timeout_s, algorithm)
    except requests.exceptions.RequestException as e:
        raise _request_error(url, e, timeout) from None
    finally:
        session.close()
    return dest


def _follow(session, url: str, timeout: tuple[float, float]):
    """The response at the end of `url`'s redirects (at most MAX_REDIRECTS, never from https
    down to http), checked to be a 200 that is not an HTML page."""
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        resp = session.get(current, stream=True, timeout=timeout, allow_redirects=False)
        if not resp.is_redirect:
            break
        target = urljoin(current, resp.headers.get("Location", ""))
        resp.close()
        if urlparse(current).scheme == "https" and urlparse(target).scheme != "https":
            raise DataError(f"download of {url} refused: redirect from https to {target} "
                            "would downgrade the connection")
        current = target
    else:
        raise DataError(f"download of {url} failed: more than {MAX_REDIRECTS} redirects")
    if resp.status_code != 200:
        resp.close()
        raise DataError(f"download of {url} failed: HTTP {resp.status_code} "
                        f"{resp.reason or ''}".rstrip() + "; check the URL")
    if "text/html" in resp.headers.get("Content-Type", "").lower():
        resp.close()
        raise DataError(f"download of {url} failed: the server sent an HTML page, not the "
                        "text file; check the URL")
    return resp


def _save(resp, url: str, sha1: str | None, dest: Path, progress: bool, deadline: float,
          total_timeout_s: float, algorithm: str = "sha1") -> None:
    """Stream the body into `dest`: the verified file replaces it atomically, and a bad or
    partial one never lands."""
    import hashlib

    total = int(resp.headers.get("Content-Length") or 0) or None
    h = hashlib.new(algorithm)
    with atomic_writer(dest, "wb") as f, progress_bar(progress, dest.name, total) as advance:
        first = True
        for chunk in resp.iter_content(chunk_size=1 << 16):
            if first and chunk.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
                raise DataError(f"download of {url} failed: the server sent an HTML page, "
                                "not the text file; check the URL")
            first = False
            f.write(chunk)
            h.update(chunk)
            advance(len(chunk))
            if time.monotonic() > deadline:
                raise DataError(f"download of {url} took longer than {total_timeout_s:g}s; "
                                "try again later")
        actual = h.hexdigest()
        if sha1 is not None and actual != sha1:
            raise DataError(f"download of {url} has the wrong {DIGEST_NAMES[algorithm]}: "
                            f"expected {sha1}, got {actual}; the file was not saved")


def _request_error(url: str, e: Exception, timeout: tuple[float, float]) -> DataError:
    """A requests failure as one line that says what to check."""
    import requests

    slow = (f"download of {url} timed out (connect {timeout[0]:g}s, read {timeout[1]:g}s); "
            "check the network or use GRU_LM_DATA_DIR")
    if isinstance(e, requests.exceptions.Timeout):
        return DataError(slow)
    broken = requests.exceptions.ConnectionError | requests.exceptions.ChunkedEncodingError
    if isinstance(e, broken):
        if _is_timeout(e):
            return DataError(slow)
        return DataError(f"download of {url} failed: connection error ({type(e).__name__}); "
                         "check the network or use GRU_LM_DATA_DIR")
    return DataError(f"download of {url} failed: {type(e).__name__}: {e}")


def _is_timeout(exc: BaseException) -> bool:
    """urllib3 reports a read timeout under retries as a ConnectionError; look inside (a
    failed name lookup subclasses its ConnectTimeoutError, but is no timeout)."""
    from urllib3.exceptions import NameResolutionError
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    for arg in exc.args:
        for e in (arg, getattr(arg, "reason", None)):
            if isinstance(e, Urllib3Timeout) and not isinstance(e, NameResolutionError):
                return True
    return False


DIGEST_NAMES = {"sha1": "SHA-1", "sha256": "SHA-256"}


@contextlib.contextmanager
def progress_bar(enabled: bool, name: str, total: int | None, count: bool = False):
    """A transient progress bar of bytes (or, `count`, of files) while downloading."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (MofNCompleteColumn(),) if count else (DownloadColumn(), TransferSpeedColumn())
    with Progress(TextColumn("{task.description}"), BarColumn(), *columns,
                  transient=True) as bar:
        task = bar.add_task(f"downloading {name}", total=total)
        yield lambda n: bar.advance(task, n)
