"""Find a corpus file: $GRU_LM_DATA_DIR, then the copy the package ships (The Time Machine),
then the cache, then a verified download. A
collection (several files of one repository at one commit, such as chinese-poetry's) is
found file by file the same way and turned into one text, written once into the cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from gru_lm import poetry
from gru_lm.errors import DataError
from gru_lm.httpget import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    TOTAL_TIMEOUT_S,
    download,
    progress_bar,
)
from gru_lm.utils import atomic_write_text, atomic_writer, file_digest


@dataclass(frozen=True)
class DatasetSpec:
    """A corpus file; `member` set: the file is that member of the zip archive at `url`
    (saved as `archive`, verified by `archive_sha1` when given), and `sha1` is the
    extracted file's."""

    name: str
    url: str
    sha1: str
    filename: str
    description: str = ""
    member: str | None = None
    archive: str | None = None
    archive_sha1: str | None = None
    embedded: bool = False  # a copy ships inside the package (gru_lm/corpora/FILENAME)
    digest_name = "SHA-1"


@dataclass(frozen=True)
class Collection:
    """A corpus made from several files of one repository at one commit: every file verified
    by its SHA-256 (found under GRU_LM_DATA_DIR/`folder`/ at its repository path, or in the
    cache's `folder`/, or downloaded there from `base_url` + its path), then turned into one
    text by `build` (the verified files, in `files`' order), written once into the cache
    as NAME-KEY.txt (KEY: of the files' sums and `version`, the build's format)."""

    name: str
    base_url: str
    folder: str
    files: tuple[tuple[str, str], ...]  # (path inside the repository, SHA-256)
    build: Callable[[list[Path]], str]
    description: str = ""
    version: int = 1
    elsewhere: str = ""  # how else to get the files, said when they cannot be had
    digest_name = "SHA-256"

    @property
    def filename(self) -> str:
        return f"{self.name}.txt"


DATASETS: dict[str, DatasetSpec | Collection] = {}


def register_dataset(spec: DatasetSpec | Collection) -> DatasetSpec | Collection:
    DATASETS[spec.name] = spec
    return spec


register_dataset(
    DatasetSpec(
        name="timemachine",
        url="http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
        sha1="090b5e7e70c295757f55df93cb0a180b9691891a",
        filename="timemachine.txt",
        description="H. G. Wells, The Time Machine (d2l's copy; ships inside the package)",
        embedded=True,
    )
)


EMBEDDED_DIR = Path(__file__).resolve().parent / "corpora"
# Where find_local says a file was found.
IN_DATA_DIR, IN_PACKAGE, IN_CACHE = "GRU_LM_DATA_DIR", "the package", "the cache"


def embedded_path(spec: DatasetSpec) -> Path | None:
    """The package's own verified copy of `spec`'s file; None when it ships none (or the copy
    was damaged after installing, so a download or GRU_LM_DATA_DIR can still stand in)."""
    if not spec.embedded:
        return None
    path = EMBEDDED_DIR / spec.filename
    return path if path.is_file() and file_digest(path, "sha1") == spec.sha1 else None


# Matt Mahoney's Large Text Compression Benchmark files (mattmahoney.net/dc/textdata.html):
# 10**8 bytes each. The extracted files' SHA-1s are the ones the benchmark publishes.
register_dataset(
    DatasetSpec(
        name="text8",
        url="http://mattmahoney.net/dc/text8.zip",
        sha1="0dc3edebc970dcc96137e7deda4d9995af9d93de",
        filename="text8",
        description="text8: 10**8 characters of cleaned English Wikipedia (a-z and space)",
        member="text8",
        archive="text8.zip",
        archive_sha1="6c70299b93b7e1f927b42cd8f6ac1a31547c7a2e",
    )
)
register_dataset(
    DatasetSpec(
        name="enwik8",
        url="http://mattmahoney.net/dc/enwik8.zip",
        sha1="57b8363b814821dc9d47aa4d41f58733519076b2",
        filename="enwik8",
        description="enwik8: the first 10**8 bytes of an English Wikipedia XML dump "
                    "(use data.preset=raw)",
        member="enwik8",
        archive="enwik8.zip",
    )
)


for _corpus in poetry.CORPORA:
    register_dataset(Collection(name=_corpus.name, base_url=poetry.BASE_URL,
                                folder=poetry.FOLDER, files=tuple(_corpus.files()),
                                build=_corpus.text, description=_corpus.description,
                                elsewhere=poetry.WITHOUT_GITHUB))


def get_dataset(name: str) -> DatasetSpec | Collection:
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset '{name}'; registered: {', '.join(sorted(DATASETS))}, "
            "or set data.path to a local file or data.url + data.sha1"
        )
    return DATASETS[name]


def offline_from_env() -> bool:
    return os.environ.get("GRU_LM_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def fetch(
    spec: DatasetSpec | Collection,
    cache_dir: Path,
    *,
    offline: bool | None = None,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    total_timeout_s: float = TOTAL_TIMEOUT_S,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Return a local path to `spec`'s file whose SHA-1 matches (a collection: its text,
    built from files whose SHA-256 match), downloading if needed."""
    offline = offline_from_env() if offline is None else offline
    if isinstance(spec, Collection):
        return fetch_collection(spec, cache_dir, offline=offline, timeout=timeout,
                                total_timeout_s=total_timeout_s, retries=retries,
                                progress=progress)
    found = find_local(spec, cache_dir)
    if found is not None:
        return found[0]
    env_dir = os.environ.get("GRU_LM_DATA_DIR")
    cached = cache_path(spec, cache_dir)
    if offline:
        where = f"{env_dir}/ or {cache_dir}/" if env_dir else f"{cache_dir}/"
        zipped = f" (or its archive {spec.archive})" if spec.member else ""
        raise DataError(
            f"offline and {spec.filename} is not available: put the file with SHA-1 "
            f"{spec.sha1}{zipped} into {where} (or set GRU_LM_DATA_DIR to a folder holding "
            "it), or unset GRU_LM_OFFLINE to download it"
        )
    if spec.member is None:
        download(spec.url, spec.sha1, cached, timeout=timeout, total_timeout_s=total_timeout_s,
                 retries=retries, progress=progress)
        return cached
    archive = Path(cache_dir) / (spec.archive or Path(spec.url).name)
    download(spec.url, spec.archive_sha1, archive, timeout=timeout,
             total_timeout_s=total_timeout_s, retries=retries, progress=progress)
    try:
        return extract(spec, archive, cached, label=spec.url)
    finally:
        archive.unlink(missing_ok=True)  # the verified member is what is kept


def extract(spec: DatasetSpec, archive: Path, dest: Path, label: str | None = None) -> Path:
    """Stream `spec.member` out of the zip `archive` into `dest`, verified by `spec.sha1`
    (`label`: how errors name the archive, its URL when it was just downloaded)."""
    import hashlib
    import zipfile
    import zlib

    if spec.member is None:
        raise ValueError(f"dataset {spec.name} is not an archive member")
    h = hashlib.sha1()
    label = label or str(archive)
    try:
        with zipfile.ZipFile(archive) as z, z.open(spec.member) as src, \
                atomic_writer(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
            if h.hexdigest() != spec.sha1:
                raise DataError(f"{spec.member} in {label} has the wrong SHA-1: expected "
                                f"{spec.sha1}, got {h.hexdigest()}; the file was not saved")
    except KeyError:
        raise DataError(f"{label} holds no {spec.member}; it is not the {spec.name} "
                        "archive") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"{label} is not a readable zip archive ({e}); replace it or "
                        "download it again") from None
    except OSError as e:
        raise DataError(f"cannot extract {spec.member} to {dest}: {e.strerror or e}; free "
                        "disk space or set data.cache_dir") from None
    return dest


def find_local(spec: DatasetSpec | Collection, cache_dir: Path) -> tuple[Path, str] | None:
    """A verified copy that needs no download, and where it was found (IN_DATA_DIR,
    IN_PACKAGE or IN_CACHE); None when there is none."""
    if isinstance(spec, Collection):
        return _collection_local(spec, cache_dir)
    env_dir = os.environ.get("GRU_LM_DATA_DIR")
    if env_dir:
        local = _from_data_dir(Path(env_dir), spec)
        if local is not None:
            return local, IN_DATA_DIR
        zipped = _archive_in(Path(env_dir), spec)
        if zipped is not None:  # the archive only: extracted once into the cache
            return extract(spec, zipped, cache_path(spec, cache_dir)), IN_DATA_DIR
    shipped = embedded_path(spec)
    if shipped is not None:
        return shipped, IN_PACKAGE
    # Files cached before the name held the hash are still used when they verify.
    for candidate in (cache_path(spec, cache_dir), Path(cache_dir) / spec.filename):
        if candidate.is_file() and file_digest(candidate, "sha1") == spec.sha1:
            return candidate, IN_CACHE
    return None


def _archive_in(data_dir: Path, spec: DatasetSpec) -> Path | None:
    """$GRU_LM_DATA_DIR/<archive> of an archived dataset, when it is there."""
    if spec.member is None:
        return None
    path = data_dir / (spec.archive or Path(spec.url).name)
    return path if path.is_file() else None


# ---------------------------------------------------------------- collections


def collection_text_path(spec: Collection, cache_dir: Path) -> Path:
    """Where a collection's text is built: named by its files' sums and the build's format."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps([spec.version, spec.files]).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{spec.name}-{key}.txt"


def _built(spec: Collection, cache_dir: Path) -> Path | None:
    """The collection's text in the cache, when its SHA-256 is the one recorded beside it."""
    text = collection_text_path(spec, cache_dir)
    sidecar = text.with_suffix(".sha256")
    try:
        recorded = sidecar.read_text(encoding="utf-8").strip()
        return text if text.is_file() and file_digest(text, "sha256") == recorded else None
    except (OSError, UnicodeDecodeError):
        return None


def _member(spec: Collection, path: str, digest: str, cache_dir: Path
            ) -> tuple[Path, str] | None:
    """One file of a collection, verified, and where it was found; None when neither
    GRU_LM_DATA_DIR nor the cache holds it. A damaged file under GRU_LM_DATA_DIR is an error
    naming it: the user pointed there on purpose."""
    env_dir = os.environ.get("GRU_LM_DATA_DIR")
    if env_dir:
        data_dir = Path(env_dir)
        if not data_dir.is_dir():
            what = "is a file, not a folder" if data_dir.exists() else "does not exist"
            raise DataError(f"GRU_LM_DATA_DIR={data_dir} {what}; point it at a folder holding "
                            f"{spec.folder}/ or unset it")
        local = data_dir / spec.folder / path
        if local.exists() or local.is_symlink():
            fix = (f"replace it with the file whose SHA-256 is {digest} ({spec.base_url}"
                   f"{path}), or remove it to download it")
            if not local.is_file():
                what = "a link to nothing" if not local.exists() else "not a regular file"
                raise DataError(f"{local} (in GRU_LM_DATA_DIR) is {what}; {fix}")
            if _digest(local) != digest:
                raise DataError(f"{local} (in GRU_LM_DATA_DIR) has the wrong SHA-256 (damaged, "
                                f"or another version of the file); {fix}")
            return local, IN_DATA_DIR
    cached = Path(cache_dir) / spec.folder / path
    if cached.is_file() and _digest(cached) == digest:
        return cached, IN_CACHE
    return None


def _digest(path: Path) -> str:
    """SHA-256 of a collection's file; a file that cannot be read is an error naming it."""
    try:
        return file_digest(path, "sha256")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; replace the file or fix its "
                        "permissions") from None


def _collection_local(spec: Collection, cache_dir: Path,
                      found: list[tuple[Path, str] | None] | None = None
                      ) -> tuple[Path, str] | None:
    """The collection's text when no download is needed (built now from local files if it
    is not built yet), and where its files were found; None when a file is missing.
    `found`: each file's _member, when already looked up."""
    if found is None:
        found = [_member(spec, path, digest, cache_dir) for path, digest in spec.files]
    where = IN_DATA_DIR if any(f and f[1] == IN_DATA_DIR for f in found) else IN_CACHE
    built = _built(spec, cache_dir)
    if built is not None:
        return built, where
    paths = [f[0] for f in found if f is not None]
    return (_build(spec, paths, cache_dir), where) if len(paths) == len(found) else None


def _build(spec: Collection, paths: list[Path], cache_dir: Path) -> Path:
    """Write the collection's text (and its SHA-256 beside it) into the cache, atomically."""
    import hashlib

    text = spec.build(paths).encode("utf-8")
    dest = collection_text_path(spec, cache_dir)
    try:
        with atomic_writer(dest, "wb") as f:
            f.write(text)
        atomic_write_text(dest.with_suffix(".sha256"), hashlib.sha256(text).hexdigest() + "\n")
    except OSError as e:
        raise DataError(f"cannot write {dest}: {e.strerror or e}; data.cache_dir must be a "
                        "writable folder with free space") from None
    return dest


def fetch_collection(spec: Collection, cache_dir: Path, *, offline: bool,
                     timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                     total_timeout_s: float = TOTAL_TIMEOUT_S, retries: int = 3,
                     progress: bool = True) -> Path:
    """The collection's text: built from verified local files, downloading the missing ones
    into the cache first, one at a time (each lands whole and verified or not at all, so an
    interrupted download goes on from the files it had)."""
    members = [_member(spec, path, digest, cache_dir) for path, digest in spec.files]
    local = _collection_local(spec, cache_dir, members)
    if local is not None:
        return local[0]
    missing = [pd for pd, f in zip(spec.files, members, strict=True) if f is None]
    if offline:
        env_dir = os.environ.get("GRU_LM_DATA_DIR")
        where = f"{env_dir}/{spec.folder}/" if env_dir else f"{cache_dir}/{spec.folder}/"
        if env_dir and (Path(env_dir) / missing[0][0]).exists():
            raise DataError(f"GRU_LM_DATA_DIR={env_dir} holds {spec.folder}'s files itself; "
                            f"point it at the folder above, the one holding {spec.folder}/")
        raise DataError(
            f"offline and {len(missing)} of the {len(spec.files)} files of {spec.name} are not "
            f"available (the first: {missing[0][0]}); put {spec.base_url}'s files under their "
            f"paths into {where} (or set GRU_LM_DATA_DIR to a folder holding {spec.folder}/), "
            "or allow downloads (no --offline, GRU_LM_OFFLINE unset)"
            + (f"; {spec.elsewhere}" if spec.elsewhere else ""))
    with progress_bar(progress, f"{spec.name}: {len(missing)} files", len(missing),
                   count=True) as advance:
        for path, digest in missing:
            try:
                download(spec.base_url + quote(path), digest,
                         Path(cache_dir) / spec.folder / path, timeout=timeout,
                         total_timeout_s=total_timeout_s, retries=retries, progress=False,
                         algorithm="sha256")
            except DataError as e:  # (what else gets the files, where the host is not reached)
                if not spec.elsewhere:
                    raise
                raise DataError(f"{e}; {spec.elsewhere}") from None
            advance(1)
    found = _collection_local(spec, cache_dir)
    if found is None:  # (a file vanished from the cache while the others downloaded)
        raise DataError(f"the files of {spec.name} in {cache_dir}/{spec.folder}/ changed "
                        "while downloading; run the command again")
    return found[0]


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
