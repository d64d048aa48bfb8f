"""One run folder: its layout, its readers and writers, and the lock that allows one writer.

    runs/<name>/
        config.yaml          the resolved config (validated when read back)
        vocab.json           the vocabulary, so resume and evaluation rebuild the same ids
        metrics.jsonl        one JSON record per evaluation, appended
        samples.txt          greedy samples from the configured prefixes
        summary.json         written once training stops
        checkpoints/         last.pt and best.pt, each with a .sha256 beside it
        .lock                held (flock) by the process training the run
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gru_lm.config import save_config, validate
from gru_lm.errors import CheckpointError, DataError, GruLmError
from gru_lm.utils import append_line, atomic_write_text
from gru_lm.yamlconf import read_yaml

if TYPE_CHECKING:
    from gru_lm.config import Config
    from gru_lm.data import Vocab

LAST, BEST = "last.pt", "best.pt"  # checkpoint names: the latest state, the best val ppl
_SAMPLE_STEP = re.compile(r"step (\d{1,18}): ")


class RunDir:
    """The files of one run; every reader tolerates or names a damaged file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.vocab = self.path / "vocab.json"
        self.metrics = self.path / "metrics.jsonl"
        self.samples = self.path / "samples.txt"
        self.summary = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.lock_file = self.path / ".lock"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def checkpoint(self, name: str = LAST) -> Path:
        return self.checkpoints / name

    # -------------------------------------------------------------- creation

    def create(self) -> None:
        """Make the folder; an existing one is never reused (that is what --resume is for)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.mkdir()
        except FileExistsError:  # another process took the name since the caller looked
            raise self.exists_error() from None
        self.checkpoints.mkdir()

    def resume_command(self, nproc: int = 1) -> str:
        """The command that continues this run (trained by `nproc` processes), quoted so that
        pasting it works."""
        procs = f" --nproc {nproc}" if nproc > 1 else ""
        return f"gru-lm train{procs} --resume {shlex.quote(str(self.path))}"

    def remove_temporaries(self) -> None:
        """Delete the temporary files of writes a kill -9 cut short (atomic_writer's
        .NAME.*.tmp); only the holder of the run's lock may call it."""
        for folder in (self.path, self.checkpoints):
            for tmp in folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def truncate_samples(self, step: int) -> None:
        """Drop the samples written after `step` before a resume writes them again."""
        if not self.samples.is_file():
            return
        lines = self.samples.read_text(encoding="utf-8", errors="replace").splitlines(True)
        keep = [x for x in lines if not ((m := _SAMPLE_STEP.match(x)) and int(m[1]) > step)]
        if len(keep) != len(lines):
            atomic_write_text(self.samples, "".join(keep))

    def exists_error(self) -> GruLmError:
        """The refusal of a new run in this taken folder, with the command that goes on with
        it: a resume, or for a finished run a resume with a higher limit."""
        if self.summary.is_file():
            steps = self._finished_steps()
            more = f"train.max_steps={2 * steps}" if steps else "train.max_steps=N"
            return GruLmError(f"run directory {self.path} already exists and has finished; "
                              f"train it on with `{self.resume_command()} {more}` (a higher "
                              "limit) or pick another --name")
        return GruLmError(f"run directory {self.path} already exists; continue it with "
                          f"`{self.resume_command()}` or pick another --name")

    def _finished_steps(self) -> int | None:
        """The steps summary.json says the run took (None if it cannot be read)."""
        try:
            steps = self.read_summary().get("steps")
        except GruLmError:
            return None
        return steps if isinstance(steps, int) and steps > 0 else None

    def write_start(self, cfg: Config, vocab: Vocab) -> None:
        self.write_config(cfg)
        self.write_vocab(vocab)

    def write_vocab(self, vocab: Vocab) -> None:
        atomic_write_text(self.vocab, json.dumps(vocab.to_dict()) + "\n")

    def clear(self) -> None:
        """Forget the records of a run that saved no checkpoint, before it starts again."""
        for path in (self.metrics, self.samples, self.summary):
            path.unlink(missing_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- config and vocabulary

    def read_config(self) -> Config:
        if not self.config.is_file():
            raise GruLmError(f"{self.path} is not a gru-lm run (no config.yaml); pass a run "
                             "directory")
        return validate(read_yaml(self.config), source=str(self.config))

    def write_config(self, cfg: Config) -> None:
        save_config(cfg, self.config)

    def read_vocab(self) -> Vocab:
        from gru_lm.data import vocab_from_dict

        try:
            return vocab_from_dict(json.loads(self.vocab.read_text(encoding="utf-8")))
        except (OSError, ValueError, RecursionError, DataError) as e:
            raise GruLmError(f"cannot read the run's vocabulary {self.vocab} "
                             f"({str(e)[:120] or type(e).__name__}); the run folder is damaged, "
                             "start a new run") from None

    # -------------------------------------------------------------- metrics

    def records(self) -> list[dict[str, Any]]:
        """Every well-formed record of metrics.jsonl; torn or foreign lines are skipped."""
        try:
            text = self.metrics.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # torn, nested too deep, too long a number
                continue
            if isinstance(rec, dict) and _number(rec.get("step")) and isinstance(rec["step"], int):
                out.append({k: v for k, v in rec.items() if _plain(k, v)})
        return out

    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("kind") == "eval"]

    def append_record(self, rec: dict[str, Any]) -> None:
        append_line(self.metrics, json.dumps(rec))

    def truncate_records(self, step: int) -> None:
        """Drop records written after `step` (and any torn line) before a resume."""
        if self.metrics.exists():
            keep = [json.dumps(r) + "\n" for r in self.records() if r["step"] <= step]
            atomic_write_text(self.metrics, "".join(keep))

    # -------------------------------------------------------------- samples and summary

    def append_samples(self, lines: list[str]) -> None:
        with open(self.samples, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def read_summary(self) -> dict[str, Any]:
        if not self.summary.is_file():
            raise GruLmError(f"{self.path} is not a finished run (no summary.json); finish it "
                             f"with `{self.resume_command()}`")
        try:
            summary = json.loads(self.summary.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8,
            # an integer past Python's 4,300 digits
            raise GruLmError(f"{self.summary} cannot be read ({type(e).__name__}); the run "
                             "folder is damaged, retrain or drop that run") from None
        if not isinstance(summary, dict):
            raise GruLmError(f"{self.summary} is not a JSON object; the run folder is damaged")
        return {k: v for k, v in summary.items() if _plain(k, v)}

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.summary, json.dumps(summary, indent=2) + "\n")

    # -------------------------------------------------------------- checkpoints

    def trained_something(self) -> bool:
        """Whether anything of value is here: a checkpoint, an evaluation, samples or a
        summary (a run that stopped before all of these may start again in place)."""
        return (self.has_checkpoint() or self.summary.exists() or self.samples.exists()
                or bool(self.evals()))

    def has_checkpoint(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.pt"))

    def best_or_last(self) -> Path:
        """best.pt, else last.pt: what predict, evaluate and gates load."""
        if not self.path.is_dir():
            raise GruLmError(f"--run {self.path}: no such run directory")
        for name in (BEST, LAST):
            if self.checkpoint(name).is_file():
                return self.checkpoint(name)
        raise CheckpointError(f"run {self.path} has no checkpoint in {self.checkpoints}/; "
                              "train it first")

    # -------------------------------------------------------------- one writer

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an advisory lock for the whole training; released on any exit, kill included."""
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            yield
            return
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise GruLmError(f"run {self.path} is being trained by another process (pid "
                                 f"{holder}); wait for it to finish or stop it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


# Run files may be edited by hand: a field of the wrong type is dropped, as if absent, so
# that every reader can use .get() and trust the type of what it gets.
TEXT_FIELDS = {"kind", "run", "model", "device", "kernels", "stop_reason", "best_weights",
               "speed_warning", "init_from"}


def _number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return abs(v) < 2**63
    return isinstance(v, float) and math.isfinite(v)


def _plain(key: str, value: Any) -> bool:
    return isinstance(value, str) if key in TEXT_FIELDS else _number(value)


def is_locked(run: RunDir) -> bool:
    """True while another process trains `run` (holds its lock)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(run.lock_file, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def run_row(run: RunDir) -> dict[str, Any]:
    """One line of `gru-lm runs`: what a run is, how far it got and how well it scores."""
    summary: dict[str, Any] = {}
    if run.summary.is_file():
        with contextlib.suppress(GruLmError):
            summary = run.read_summary()
    evals = run.evals()
    vals = [e["val_ppl"] for e in evals if "val_ppl" in e]
    model = summary.get("model")
    if model is None:
        with contextlib.suppress(GruLmError):
            model = run.read_config().model.name
    files = [p for p in (run.metrics, run.summary, run.config, *run.checkpoints.glob("*.pt"))
             if p.is_file()]
    status = ("running" if is_locked(run) else "finished" if summary else
              "interrupted" if run.has_checkpoint() else "not started")
    return {
        "name": run.name, "path": str(run.path), "model": model,
        "steps": summary.get("steps", evals[-1]["step"] if evals else 0),
        "best_val_ppl": summary.get("best_val_ppl", min(vals) if vals else None),
        "test_ppl": summary.get("best_test_ppl"),
        # summaries written before one-stream scoring scored parallel streams from zero states
        "one_stream": not summary or "eval_warmup" in summary,
        "tokens_per_s": summary.get("tokens_per_s",
                                    evals[-1].get("tokens_per_s") if evals else None),
        "status": status,
        "modified": max((p.stat().st_mtime for p in files), default=None),
    }


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run folder (one holding config.yaml) under `runs_dir`, newest first."""
    runs_dir = Path(runs_dir)
    dirs = sorted(d for d in runs_dir.iterdir() if (d / "config.yaml").is_file()) \
        if runs_dir.is_dir() else []
    rows = [run_row(RunDir(d)) for d in dirs]
    return sorted(rows, key=lambda r: r["modified"] or 0, reverse=True)


def find_latest(runs_dir: Path) -> RunDir:
    """The run under `runs_dir` whose checkpoint was written last."""
    runs_dir = Path(runs_dir)
    candidates = [RunDir(d) for d in runs_dir.glob("*/")] if runs_dir.is_dir() else []
    candidates = [r for r in candidates if r.has_checkpoint()]
    if not candidates:
        raise GruLmError(f"no trained run found under {runs_dir}/; train one with "
                         "`gru-lm train --config configs/gru.yaml` or pass --run / --checkpoint")
    return max(candidates, key=lambda r: max(p.stat().st_mtime
                                             for p in r.checkpoints.glob("*.pt")))
