"""Build (once, cached) and load the fused C++ step kernels; None when unavailable.

The kernels need a C++ compiler and ninja at first use (about 40 s, then cached under
~/.cache/torch_extensions). They are compiled with -march=native, so the cache entry is
named by a hash of the source (text and path), the flags, torch's version and this CPU's
model and ISA: a home folder shared by machines with different CPUs never loads code built
for another.
Without a compiler, or with GRU_LM_NO_EXT=1, the scratch cells run the portable PyTorch
loops of gru_lm/cells.py: same results, slower; `why_not()` says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import TypedDict

SOURCE = Path(__file__).with_name("csrc") / "cells.cpp"
# -fopenmp makes at::parallel_for parallel; libgomp is torch's own (same soname, already
# loaded), so there is one OpenMP runtime.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def cpu_signature() -> str:
    """This CPU's model name and instruction-set flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in wanted:
            wanted[key] = value.strip()
    return f"{platform.machine()} " + " | ".join(f"{k}: {v}" for k, v in sorted(wanted.items()))


# The instruction sets that decide which GEMM and kernel code is fastest on a CPU.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
             "asimd", "sve", "bf16")


class CpuSummary(TypedDict):
    model: str
    isa: list[str]
    cores: int | None


def cpu_summary() -> CpuSummary:
    """The CPU's model name and which of ISA_FLAGS it has, for benchmark headers and JSON:
    a speed figure means little without the chip it came from."""
    sig = cpu_signature()
    fields = dict(part.split(": ", 1) for part in sig.split(" ", 1)[-1].split(" | ")
                  if ": " in part)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"model": fields.get("model name") or fields.get("CPU part") or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in flags], "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count()}


BF16_ISA = ("avx512_bf16", "amx_bf16", "bf16")  # x86 and Arm names of bf16 arithmetic


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (without it, bf16 matmuls are emulated)."""
    return any(f in cpu_summary()["isa"] for f in BF16_ISA)


def cpu_line() -> str:
    c = cpu_summary()
    return f"{c['model']}, {c['cores']} usable cores, ISA: {', '.join(c['isa']) or 'baseline'}"


def build_name() -> str:
    import torch

    h = hashlib.sha1(SOURCE.read_bytes())
    # The source's path too: torch's build files name it, so two checkouts sharing one cache
    # would otherwise rebuild each other's entry (silently, ~40 s) on every switch.
    for part in (str(SOURCE.resolve()), " ".join(CFLAGS), torch.__version__, cpu_signature()):
        h.update(b"\0" + part.encode())
    return f"gru_lm_cells_{h.hexdigest()[:12]}"


class Library:
    """The compiled kernels of csrc/cells.cpp: built (or found in torch's cache) on the first
    load() that may build, then kept; `why` says why there are none."""

    def __init__(self) -> None:
        self.module = None
        self.tried = False
        self.why: str | None = None

    def load(self, build: bool = True):
        """The compiled module, or None (reason in `why`); build=False never builds."""
        if self.tried or not build:
            return self.module
        self.tried = True
        if os.environ.get("GRU_LM_NO_EXT", "").strip() in {"1", "true", "yes"}:
            self.why = "disabled by GRU_LM_NO_EXT"
            return None
        try:
            from torch.utils import cpp_extension

            _put_ninja_on_path()
            name = build_name()
            folder = _build_folder(cpp_extension, name)
            _announce_build(folder, name)
            with _build_lock(folder), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.module = cpp_extension.load(
                    name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, no headers: fall back, say why
            last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
            self.why = f"{type(e).__name__}: {last}" if last else type(e).__name__
        return self.module


LIBRARY = Library()  # this process' kernels (a shared library is loaded once a process)


def kernels(load: bool = True):
    """The process' compiled module, or None (reason in `why_not()`); load=False never
    builds."""
    return LIBRARY.load(load)


def _build_folder(cpp_extension, name: str) -> Path | None:
    """Where torch builds and caches `name`; None if its private helper moved."""
    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:
        return None


def _announce_build(folder: Path | None, name: str) -> None:
    """One line on stderr when this CPU has no cached build yet (the wait is ~40 s)."""
    if folder is not None and not any(folder.glob(f"{name}*.so")):
        sys.stderr.write(f"building fused kernels, once, ~40 s (cached in {folder})\n")
        sys.stderr.flush()


@contextlib.contextmanager
def _build_lock(folder: Path | None):
    """Hold an OS lock on the build folder while torch builds or loads the kernels.

    torch's own lock is a file whose existence is the lock: a build killed midway (Ctrl-C
    during the ~40 s compile, a timeout) leaves it behind, and every later start then
    sleeps on it forever. An flock dies with its process, so while this process holds it no
    other gru-lm is building there, and a torch lock file found is stale: remove it.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    if folder is None:
        yield
        return
    with open(folder / "gru_lm.flock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(f"waiting for another process building the fused kernels "
                             f"(in {folder})\n")
            sys.stderr.flush()
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            sys.stderr.write(f"removed a lock left by an interrupted kernel build: {stale}\n")
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _put_ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the pip package's binary is not there unless the
    venv is activated, so add its folder."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def why_not() -> str | None:
    kernels()
    return LIBRARY.why
