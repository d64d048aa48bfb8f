"""Small shared helpers: atomic file writes and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from gru_lm.errors import GruLmError


def flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict as {dotted key: value}: {"train": {"lr": 0.5}} is
    {"train.lr": 0.5} (an empty mapping is a value of its own)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[str(key)] = value
    return out


def missing_reason(path: str | Path) -> str:
    """Why a path is not a file that can be read, in words: a symbolic link that leads back to
    itself (which Python 3.13's pathlib reports as a missing file), a link to a file that is
    gone, "does not exist", a folder, or a pipe or a device."""
    import errno

    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that leads back to itself (a loop)"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno == errno.EACCES:
            return "cannot be reached (permission denied)"
        if e.errno == errno.ENOTDIR:
            return "does not exist (a part of the path is a file, not a folder)"
        return "does not exist"
    return "is a folder, not a file" if os.path.isdir(path) else \
        "is not a regular file (a pipe or a device)"


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file in the same folder, fsync, then os.replace onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **_text(mode)) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_staging(folder: Path, prefix: str) -> None:
    """Remove the folders PREFIX + PID-... in `folder` whose process is gone: what a killed
    writer (an export, an import) left while it staged its files."""
    for p in Path(folder).glob(f"{prefix}*"):
        pid = p.name.removeprefix(prefix).split("-")[0]
        if not (pid.isdigit() and p.is_dir()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # (alive, another user's)
            pass


def _text(mode: str) -> dict:
    return {} if "b" in mode else {"encoding": "utf-8"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_writer(path, "w") as f:
        f.write(text)


def write_output(path: Path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """Write a file the user named (--out, --png, --json) without ever replacing something
    that is not a plain file: a device or FIFO (/dev/stdout, a pipe) is written through, a
    symlink's target is replaced (the link stays), and errors name `path`, not a temp file."""
    import stat

    path = Path(path)
    try:
        info = path.stat()  # follows links
    except FileNotFoundError:
        info = None
    except OSError as e:
        raise GruLmError(f"cannot write {path}: {e.strerror or e}") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise GruLmError(f"{path} is a folder; give a file name inside it")
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if info is None and not target.parent.is_dir():
        raise GruLmError(f"cannot write {path}: the folder {target.parent} does not exist; "
                         "create it first")
    try:
        if info is not None and not stat.S_ISREG(info.st_mode):
            with open(path, mode, **_text(mode)) as f:  # device or FIFO: write through
                write(f)
        else:
            with atomic_writer(target, mode) as f:
                write(f)
    except OSError as e:
        raise GruLmError(f"cannot write {path}: {e.strerror or e}; check the folder's "
                         "permissions and free space") from None


def available_memory() -> int:
    """Bytes this machine can still give: MemAvailable on Linux, else all physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write(2) so a kill never leaves a torn line mid-file."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# SIGINT/SIGTERM that reached one process of a distributed job before its training started
# (record_signals_early); train_run goes on collecting into this same list.
EARLY_SIGNALS: list[int] = []


def record_signals_early() -> None:
    """In a process of a distributed job (WORLD_SIZE > 1: started by torchrun or `--nproc`),
    record SIGINT/SIGTERM from the start of main() on instead of raising KeyboardInterrupt in
    whatever import or collective it lands: the job stops them together at a step boundary."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # (not the main thread)
            signal.signal(sig, lambda signum, frame: EARLY_SIGNALS.append(signum))
    # `--nproc` starts its workers with both blocked (distributed.launch): what arrived while
    # Python started is delivered now, to the handler above
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def caught_signals(signals=(signal.SIGINT, signal.SIGTERM), into: list[int] | None = None
                   ) -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM in the yielded list (`into`, when given) instead of stopping at
    once, so a loop can stop at a safe point; the previous handlers come back on exit."""
    caught: list[int] = into if into is not None else []
    old = {}
    for sig in signals:
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        except ValueError:  # not the main thread: signals stay with their owner
            pass
    try:
        yield caught
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


FIGURE_FORMATS = ("png", "svg", "pdf")


def figure_format(path) -> str:
    """The image format that the suffix of `path` names; refused before anything is drawn."""
    if Path(path).is_dir():
        raise GruLmError(f"{path} is a folder; give a file name ending in .png, .svg or .pdf")
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FIGURE_FORMATS:
        raise GruLmError(f"{path}: a figure is written as .png, .svg or .pdf; end the file "
                         "name with one of them")
    return suffix


def figure(**kwargs):
    """A matplotlib Figure of its own: no pyplot state and no backend switch, so it neither
    needs a display nor disturbs a notebook's plots; SVG keeps its text as text. Chinese
    characters are drawn with an installed font that has them (cjk_font)."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams["svg.fonttype"] = "none"
    cjk_font()
    return Figure(**kwargs)


# Fonts with the Chinese characters, the first installed one drawing what DejaVu Sans lacks.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK JP", "Noto Sans SC",
             "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN",
             "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC",
             "Noto Serif CJK SC", "Arial Unicode MS")
_FONTS: dict[str, str | None] = {}
_GLYPH_NOTE = ("no installed font has Chinese characters, so the figure draws them as boxes; "
               "install one (Debian and Ubuntu: apt-get install fonts-noto-cjk) and draw it "
               "again")


def cjk_font() -> str | None:
    """Once a process: the first of CJK_FONTS that is installed, set behind matplotlib's
    default font (which then draws what it has, and that font the rest); None when there is
    none, and matplotlib's warning per missing character is then silenced (glyph_note says
    it once)."""
    if "cjk" not in _FONTS:
        import warnings

        import matplotlib
        from matplotlib import font_manager

        names = {f.name for f in font_manager.fontManager.ttflist}
        found = next((n for n in CJK_FONTS if n in names), None)
        _FONTS["cjk"] = found
        if found is not None:
            first = matplotlib.rcParams["font.sans-serif"][:1]
            matplotlib.rcParams["font.family"] = [*first, found]
        else:
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from",
                                    category=UserWarning)
    return _FONTS["cjk"]


def glyph_note(fig) -> str | None:
    """A note, once a process, when `fig` has Chinese (or other wide) characters and no
    installed font draws them; None otherwise."""
    import unicodedata

    from matplotlib.text import Text

    if cjk_font() is not None or _FONTS.get("said"):
        return None
    text = "".join(t.get_text() for t in fig.findobj(Text))
    if not any(unicodedata.east_asian_width(c) in "WF" for c in text):
        return None
    _FONTS["said"] = "yes"
    return _GLYPH_NOTE


def say_glyph_note(fig) -> None:
    """glyph_note on stderr, for a figure written where no notes are returned."""
    import sys

    note = glyph_note(fig)
    if note:
        print(f"note: {note}", file=sys.stderr)
