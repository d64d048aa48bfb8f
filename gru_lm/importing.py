"""A collection's files from an archive instead of a download (`gru-lm data import`): for a
machine that reaches the npm registry, or one of its mirrors, but not GitHub. chinese-poetry's
files are published byte for byte as the npm package chinese-poetry 2.0.1 (`npm pack
chinese-poetry@2.0.1` fetches its .tgz), under other paths (dist/quantangshi/ for 全唐诗/,
...), so every file is recognised by its pinned SHA-256, never by its name, and put where the
download would have put it: the cache's FOLDER/ at its repository path."""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gru_lm.download import DATASETS, Collection
from gru_lm.errors import DataError
from gru_lm.poetry import NPM_PACKAGE
from gru_lm.utils import remove_stale_staging

MAX_MEMBER_BYTES = 64 << 20  # larger members are no pinned file (the largest is 6.5 MB)
STAGING = ".import-"  # + PID-: where an import reads an archive into before anything lands
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first bytes (an empty one's too)
COMPRESSED = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh")  # gzip, xz and bzip2 (a tar inside)
# What reading a damaged archive raises: tarfile's and zipfile's own errors, a cut gzip
# (EOFError, zlib.error), a damaged xz (LZMAError), an encrypted zip member (RuntimeError), a
# zip method Python lacks, such as deflate64 (NotImplementedError).
UNREADABLE = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
              RuntimeError, NotImplementedError)


@dataclass(frozen=True)
class Imported:
    """What an import put into the cache."""

    folder: Path  # the cache's FOLDER/
    files: int  # pinned files found in the archive (written or already there)
    total: int  # pinned files of every collection in FOLDER
    complete: list[str]  # collections whose every file is now in the cache
    incomplete: list[str]  # collections still missing files


class Damaged(Exception):
    """The archive cannot be read to its end."""


def _pinned(folder: str) -> dict[str, str]:
    """SHA-256 -> repository path of every file the collections kept in `folder` use."""
    out: dict[str, str] = {}
    for spec in DATASETS.values():
        if isinstance(spec, Collection) and spec.folder == folder:
            out.update({digest: path for path, digest in spec.files})
    return out


def _folder_files(root: Path) -> Iterator[bytes]:
    """A folder's regular files, every subfolder read (one that cannot be is an error)."""

    def refuse(e: OSError) -> None:
        raise Damaged(f"{e.filename}: {e.strerror or e}")

    for here, dirs, files in os.walk(root, onerror=refuse):
        dirs.sort()
        for name in sorted(files):
            path = Path(here) / name
            try:
                if path.is_file() and path.stat().st_size <= MAX_MEMBER_BYTES:
                    yield path.read_bytes()
            except OSError as e:
                raise Damaged(f"{path}: {e.strerror or e}") from None


def _tar_files(archive: Path) -> Iterator[bytes]:
    """A tar's regular files (compressed or not). A tar ends with two zero blocks; Python's
    tarfile takes a short or missing header for the end, so a tar cut between two members
    would read as a smaller whole one: its end is checked."""
    with tarfile.open(archive, "r:*") as t:
        for member in t:
            if member.isfile() and member.size <= MAX_MEMBER_BYTES:
                f = t.extractfile(member)
                if f is not None:
                    yield f.read()
        assert t.fileobj is not None
        t.fileobj.seek(t.offset)
        end = t.fileobj.read(2 * tarfile.BLOCKSIZE)
        if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
            raise Damaged("it ends inside the archive, before the tar's end-of-archive blocks")


def _members(archive: Path) -> Iterator[bytes]:
    """The contents of the archive's regular files (a tar, compressed or not, a zip, or a
    folder), one at a time; members too large to be a pinned file are passed over."""
    if archive.is_dir():
        yield from _folder_files(archive)
        return
    with open(archive, "rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
    if head[:4] in ZIP_MAGIC:  # (by its first bytes: a tar may end with a zip member)
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and info.file_size <= MAX_MEMBER_BYTES:
                    yield z.read(info)
        return
    if not (head.startswith(COMPRESSED) or head[257:262] == b"ustar"):
        raise DataError(f"{archive} is not a tar, .tgz, .tar.xz or zip archive, nor a folder; "
                        f"give the .tgz that npm pack {NPM_PACKAGE} writes")
    yield from _tar_files(archive)


def _check_archive(archive: Path, fix: str) -> None:
    """A regular file or a folder; a device, a pipe or nothing is refused before it is read."""
    try:
        mode = archive.stat().st_mode
    except OSError as e:
        what = "does not exist" if isinstance(e, FileNotFoundError) else e.strerror or str(e)
        raise DataError(f"{archive} {what}; {fix}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(f"{archive} is not a regular file or a folder (a device or a pipe); "
                        f"{fix}")


def import_archive(archive: Path, cache_dir: Path, folder: str = "chinese-poetry") -> Imported:
    """Copy every pinned file of `folder`'s collections found in `archive` into
    cache_dir/folder/ at its repository path. The archive is read whole, and every target
    checked, before anything is put in place, so a damaged archive leaves the cache as it
    was."""
    archive, cache_dir = Path(archive), Path(cache_dir)
    pinned = _pinned(folder)
    fix = f"fetch it again (npm pack {NPM_PACKAGE}) and import the .tgz it writes"
    _check_archive(archive, fix)
    dest = cache_dir / folder
    space = "free disk space or give --cache-dir a writable folder"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(cache_dir, STAGING)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=cache_dir))
    except OSError as e:
        raise DataError(f"cannot write into {cache_dir}: {e.strerror or e}; {space}") from None
    try:
        found: dict[str, Path] = {}  # repository path -> staged file
        try:
            for data in _members(archive):
                path = pinned.get(hashlib.sha256(data).hexdigest())
                if path is None or path in found:
                    continue
                found[path] = staging / f"{len(found)}.json"
                try:
                    found[path].write_bytes(data)
                except OSError as e:
                    raise DataError(f"cannot write into {cache_dir}: {e.strerror or e}; "
                                    f"{space}; nothing was imported") from None
        except (Damaged, OSError, *UNREADABLE) as e:
            why = ("its compressed tar is damaged or cut short" if isinstance(e, tarfile.ReadError)
                   else " ".join(str(getattr(e, "strerror", None) or e).split())[:200])
            raise DataError(f"{archive} cannot be read to the end ({type(e).__name__}: {why}); "
                            f"nothing was imported; {fix}") from None
        if not found:
            raise DataError(f"{archive} holds none of the {len(pinned)} files of {folder} that "
                            f"gru-lm pins; nothing was imported; it is not {NPM_PACKAGE}: {fix}")
        for path in found:  # every target checked before the first lands
            target = dest / path
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(f"cannot make the folder of {target}: {e.strerror or e} (a file "
                                "in its way?); move it away; nothing was imported") from None
            if target.is_dir() or (target.exists() and not target.is_file()):
                raise DataError(f"{target} is in the way (not a regular file); move it away; "
                                "nothing was imported")
        for path, staged in found.items():  # all read and checked: now each lands whole
            os.replace(staged, dest / path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    complete: list[str] = []
    incomplete: list[str] = []
    for name, spec in DATASETS.items():
        if isinstance(spec, Collection) and spec.folder == folder:
            ready = all((dest / p).is_file() for p, _ in spec.files)
            (complete if ready else incomplete).append(name)
    return Imported(dest, len(found), len(pinned), complete, incomplete)
