"""Find a corpus file: $GRU_LM_DATA_DIR, then the cache, then a verified download."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlparse

from gru_lm.errors import DataError
from gru_lm.utils import atomic_writer, file_digest

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
TOTAL_TIMEOUT_S = 600.0
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str
    sha1: str
    filename: str
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


register_dataset(
    DatasetSpec(
        name="timemachine",
        url="http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
        sha1="090b5e7e70c295757f55df93cb0a180b9691891a",
        filename="timemachine.txt",
        description="H. G. Wells, The Time Machine (d2l's copy)",
    )
)


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset '{name}'; registered: {', '.join(sorted(DATASETS))}, "
            "or set data.path to a local file or data.url + data.sha1"
        )
    return DATASETS[name]


def offline_from_env() -> bool:
    return os.environ.get("GRU_LM_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def fetch(
    spec: DatasetSpec,
    cache_dir: Path,
    *,
    offline: bool | None = None,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    total_timeout_s: float = TOTAL_TIMEOUT_S,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Return a local path to `spec`'s file whose SHA-1 matches, downloading if needed."""
    offline = offline_from_env() if offline is None else offline
    found = find_local(spec, cache_dir)
    if found is not None:
        return found[0]
    env_dir = os.environ.get("GRU_LM_DATA_DIR")
    cached = cache_path(spec, cache_dir)
    if offline:
        where = f"{env_dir}/ or {cache_dir}/" if env_dir else f"{cache_dir}/"
        raise DataError(
            f"offline and {spec.filename} is not available: put the file with SHA-1 "
            f"{spec.sha1} into {where} (or set GRU_LM_DATA_DIR to a folder holding it), "
            "or unset GRU_LM_OFFLINE to download it"
        )
    download(spec.url, spec.sha1, cached, timeout=timeout, total_timeout_s=total_timeout_s,
             retries=retries, progress=progress)
    return cached


def find_local(spec: DatasetSpec, cache_dir: Path) -> tuple[Path, str] | None:
    """A verified copy that needs no download, and where it was found ("GRU_LM_DATA_DIR" or
    "the cache"); None when there is none."""
    env_dir = os.environ.get("GRU_LM_DATA_DIR")
    if env_dir:
        local = _from_data_dir(Path(env_dir), spec)
        if local is not None:
            return local, "GRU_LM_DATA_DIR"
    # Files cached before the name held the hash are still used when they verify.
    for candidate in (cache_path(spec, cache_dir), Path(cache_dir) / spec.filename):
        if candidate.is_file() and file_digest(candidate, "sha1") == spec.sha1:
            return candidate, "the cache"
    return None


def cache_path(spec: DatasetSpec, cache_dir: Path) -> Path:
    """The cache file of `spec`, named by its hash too: a download for one URL or hash never
    replaces the verified file of another dataset that has the same file name."""
    name = Path(spec.filename)
    return Path(cache_dir) / f"{name.stem}-{spec.sha1[:8]}{name.suffix}"


def _from_data_dir(data_dir: Path, spec: DatasetSpec) -> Path | None:
    """$GRU_LM_DATA_DIR/<file> when it verifies; None when the folder lacks the file. A
    folder that is not one, or a file that does not verify, is an error at once: the user
    pointed there on purpose, so a download must not hide the mistake."""
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise DataError(f"GRU_LM_DATA_DIR={data_dir} {what}; point it at a folder holding "
                        f"{spec.filename} or unset it")
    path = data_dir / spec.filename
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"{path} (in GRU_LM_DATA_DIR) is empty or not a file; replace it with "
                        f"the file whose SHA-1 is {spec.sha1}, or unset GRU_LM_DATA_DIR")
    if file_digest(path, "sha1") != spec.sha1:
        raise DataError(f"{path} (in GRU_LM_DATA_DIR) has the wrong SHA-1 (damaged or another "
                        f"file); replace it with the file whose SHA-1 is {spec.sha1}, or unset "
                        "GRU_LM_DATA_DIR")
    return path


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
    sha1: str,
    dest: Path,
    *,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    total_timeout_s: float = TOTAL_TIMEOUT_S,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Stream `url` into a temp file beside `dest`, verify SHA-1, then move it into place."""
    import hashlib

    import requests

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    session = _session(retries)
    deadline = time.monotonic() + total_timeout_s
    current = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            resp = session.get(current, stream=True, timeout=timeout, allow_redirects=False)
            if resp.is_redirect:
                target = urljoin(current, resp.headers.get("Location", ""))
                resp.close()
                if urlparse(current).scheme == "https" and urlparse(target).scheme != "https":
                    raise DataError(f"download of {url} refused: redirect from https to "
                                    f"{target} would downgrade the connection")
                current = target
                continue
            break
        else:
            raise DataError(f"download of {url} failed: more than {MAX_REDIRECTS} redirects")
        with resp:
            if resp.status_code != 200:
                raise DataError(f"download of {url} failed: HTTP {resp.status_code} "
                                f"{resp.reason or ''}".rstrip() + "; check the URL")
            ctype = resp.headers.get("Content-Type", "").lower()
            if "text/html" in ctype:
                raise DataError(f"download of {url} failed: the server sent an HTML page, "
                                "not the text file; check the URL")
            total = int(resp.headers.get("Content-Length") or 0) or None
            h = hashlib.sha1()
            # The verified file replaces `dest` atomically; a bad or partial one never lands.
            with atomic_writer(dest, "wb") as f, _progress(progress, dest.name, total) as advance:
                first = True
                for chunk in resp.iter_content(chunk_size=1 << 16):
                    if first and chunk.lstrip()[:15].lower().startswith(
                        (b"<!doctype html", b"<html")
                    ):
                        raise DataError(f"download of {url} failed: the server sent an "
                                        "HTML page, not the text file; check the URL")
                    first = False
                    f.write(chunk)
                    h.update(chunk)
                    advance(len(chunk))
                    if time.monotonic() > deadline:
                        raise DataError(f"download of {url} took longer than "
                                        f"{total_timeout_s:g}s; try again later")
                actual = h.hexdigest()
                if actual != sha1:
                    raise DataError(f"download of {url} has the wrong SHA-1: expected {sha1}, "
                                    f"got {actual}; the file was not saved")
    except requests.exceptions.Timeout:
        raise DataError(f"download of {url} timed out (connect {timeout[0]:g}s, read "
                        f"{timeout[1]:g}s); check the network or use GRU_LM_DATA_DIR") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
        if _is_timeout(e):
            raise DataError(f"download of {url} timed out (connect {timeout[0]:g}s, read "
                            f"{timeout[1]:g}s); check the network or use GRU_LM_DATA_DIR"
                            ) from None
        raise DataError(f"download of {url} failed: connection error ({type(e).__name__}); "
                        "check the network or use GRU_LM_DATA_DIR") from None
    except requests.exceptions.RequestException as e:
        raise DataError(f"download of {url} failed: {type(e).__name__}: {e}") from None
    finally:
        session.close()
    return dest


def _is_timeout(exc: BaseException) -> bool:
    """urllib3 reports a read timeout under retries as a ConnectionError; look inside."""
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    for arg in exc.args:
        if isinstance(arg, Urllib3Timeout) or isinstance(getattr(arg, "reason", None),
                                                          Urllib3Timeout):
            return True
    return False


@contextlib.contextmanager
def _progress(enabled: bool, name: str, total: int | None):
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=True) as bar:
        task = bar.add_task(f"downloading {name}", total=total)
        yield lambda n: bar.advance(task, n)
