"""A comparison's campaign: every config x seed trained under one budget into one folder,
one member after another here or `--jobs` at a time in processes of their own, kept members
checked against the recipe asked for now; then report.report scores them."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from gru_lm import building
from gru_lm.config import Config, load_config, recipe_key
from gru_lm.distributed import LAUNCHER
from gru_lm.errors import GruLmError, TrainingInterrupted
from gru_lm.report import Comparison, report
from gru_lm.rundir import RunDir
from gru_lm.runner import train_run
from gru_lm.supervisor import Supervisor


@dataclass(frozen=True)
class Budget:
    """One limit imposed on every member run, or None to keep each config's own."""

    seconds: float | None = None
    epochs: int | None = None
    tokens: int | None = None

    def overrides(self, batch_size: int, num_steps: int) -> list[str]:
        given = [x for x in (self.seconds, self.epochs, self.tokens) if x is not None]
        if len(given) > 1:
            raise GruLmError("give at most one of --budget-s, --epochs, --tokens")
        if not given:
            return []
        off = ["train.time_budget_s=null", "train.epochs=null", "train.max_steps=null",
               "train.early_stopping_patience=null"]
        if self.seconds is not None:
            return off + [f"train.time_budget_s={self.seconds}"]
        if self.epochs is not None:
            return off + [f"train.epochs={self.epochs}"]
        assert self.tokens is not None  # (the one left)
        steps = max(1, math.ceil(self.tokens / (batch_size * num_steps)))
        return off + [f"train.max_steps={steps}"]


def _check_budget(budget: Budget) -> None:
    for name, v in (("--budget-s", budget.seconds), ("--epochs", budget.epochs),
                    ("--tokens", budget.tokens)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise GruLmError(f"{name} {v} is invalid; give a finite number > 0")


def run_comparison(configs: list[Path], *, seeds: int, budget: Budget, out: Path,
                   resume: bool, offline: bool | None, console=None, jobs: int = 1
                   ) -> Comparison:
    """Train every config x seed into `out` (`jobs` members at a time, each in a process of
    its own), then write the report."""
    if not configs:
        raise GruLmError("give at least one config (e.g. configs/gru.yaml configs/lstm.yaml) "
                         "or --runs DIR ...")
    if not 1 <= seeds <= 100:
        raise GruLmError(f"--seeds {seeds} is out of range; give 1..100")
    _check_jobs(jobs)
    _check_budget(budget)
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise GruLmError(f"config names must differ, got {', '.join(stems)}")
    loaded = [load_config(c) for c in configs]
    for c, cfg in zip(configs, loaded, strict=True):  # the budget must suit every member
        load_config(c, budget.overrides(cfg.train.batch_size, cfg.train.num_steps))
    recipes: dict[str, Path] = {}
    for c, cfg in zip(configs, loaded, strict=True):
        key = recipe_key(cfg.recipe())
        if key in recipes:
            raise GruLmError(f"{recipes[key]} and {c} are the same recipe (they differ only in "
                             "the seed, the run folder or how progress is shown), so their "
                             "runs of each seed would be one experiment counted twice; give "
                             f"one of them, and --seeds N for more seeds")
        recipes[key] = c
    data0 = loaded[0].data.model_dump(mode="json")
    for c, cfg in zip(configs[1:], loaded[1:], strict=True):
        if cfg.data.model_dump(mode="json") != data0:
            raise GruLmError(f"{c}: its data section differs from {configs[0]}'s; a fair "
                             "comparison needs the same corpus, split and vocabulary")
    if out.exists() and not resume and any(out.iterdir()):
        raise GruLmError(f"{out} already exists; continue it with --resume or pick another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _train_members(configs, loaded, seeds, budget, out, offline, console, jobs)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a comparison that failed to start leaves no empty folder
        raise
    return report([out / f"{Path(c).stem}-s{s}" for c in configs for s in range(seeds)], out,
                  offline)


def _check_jobs(jobs: int) -> None:
    cores = building.usable_cores()
    if not 1 <= jobs <= cores:
        raise GruLmError(f"--jobs {jobs} is out of range: this machine has {cores} usable "
                         f"core(s); give 1..{cores} (each job needs a core)")


@dataclass
class _Member:
    """One config x seed of a comparison: its folder, and how to train (or continue) it."""

    number: int
    name: str
    run: RunDir
    config: Path
    overrides: list[str]


def _members(configs: list[Path], loaded: list[Config], seeds: int, budget: Budget, out: Path
             ) -> list[_Member]:
    """Every member, in order, each kept folder checked against this call's recipe."""
    members: list[_Member] = []
    for cfg_path, cfg in zip(configs, loaded, strict=True):
        for seed in range(seeds):
            name = f"{Path(cfg_path).stem}-s{seed}"
            m = _Member(len(members) + 1, name, RunDir(out / name), Path(cfg_path),
                        [f"train.seed={seed}", f"run.runs_dir={out}",
                         *budget.overrides(cfg.train.batch_size, cfg.train.num_steps)])
            if m.run.config.is_file():
                _check_same_recipe(m.run, m.config, m.overrides)
            if m.run.path.exists() and not m.run.summary.is_file() and \
                    not m.run.checkpoint().is_file():
                raise GruLmError(f"{m.run} exists without a checkpoint; remove that folder "
                                 "and run again with --resume")
            members.append(m)
    return members


def _train_members(configs: list[Path], loaded: list[Config], seeds: int, budget: Budget,
                   out: Path, offline: bool | None, console, jobs: int = 1) -> None:
    members = _members(configs, loaded, seeds, budget, out)
    todo = []
    for m in members:
        if m.run.summary.is_file():
            if console is not None:
                console.print(f"[dim]{escape(f'member {m.number}/{len(members)} {m.name}')}: "
                              "finished earlier, kept[/dim]")
        else:
            todo.append(m)
    try:
        if jobs > 1:
            _train_in_processes(todo, len(members), jobs, offline, console)
        else:
            _train_here(todo, len(members), offline, console)
    except TrainingInterrupted as e:  # (its message: the members it stopped)
        args = " ".join(str(c) for c in configs)
        more = f" --jobs {jobs}" if jobs > 1 else ""
        raise TrainingInterrupted(
            f"comparison interrupted in {e}; finished members are kept. Continue with: gru-lm "
            f"compare {args} --seeds {seeds}{more} --out {out} --resume (and the same budget "
            "option)", exit_code=e.exit_code) from None


def _train_here(todo: list[_Member], total: int, offline: bool | None, console) -> None:
    """The members one after another, in this process."""
    durations: list[float] = []  # wall seconds of the members trained in this call
    for k, m in enumerate(todo):
        if console is not None:
            left = len(todo) - k
            eta = (f", about {_duration(statistics.fmean(durations) * left)} left"
                   if durations else "")
            console.rule(escape(f"member {m.number}/{total}: {m.name}{eta}"))
        started = time.perf_counter()
        try:
            if m.run.checkpoint().is_file():
                train_run(None, [], resume=m.run.path, offline=offline, console=console)
            else:
                train_run(m.config, m.overrides, name=m.name, offline=offline,
                          console=console)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(m.name, exit_code=e.exit_code) from None
        durations.append(time.perf_counter() - started)


def _train_in_processes(todo: list[_Member], total: int, jobs: int, offline: bool | None,
                        console) -> None:
    """The members `jobs` at a time, each a `gru-lm train` process of its own with
    usable cores // jobs threads, its output in OUT/NAME.log. Ctrl-C and SIGTERM reach every
    running member once (each saves a checkpoint and stops; none more is started); a member
    that fails stops none of the others, and the comparison then fails naming it."""
    threads = max(1, building.usable_cores() // jobs)
    by_name = {m.name: m for m in todo}
    pool = Supervisor()

    def say(m: _Member, text: str) -> None:
        if console is not None:
            console.print(escape(f"member {m.number}/{total} {m.name}: {text}"),
                          highlight=False)

    queue = list(todo)
    with pool.forwarding():
        while queue or pool.running:
            while queue and len(pool.running) < jobs and pool.stopped_by is None:
                m = queue.pop(0)
                _start(pool, m, threads, offline)
                say(m, f"started ({threads} thread{'s' * (threads > 1)}, output in {_log(m)})")
            for child in pool.reap():
                if child.code == 0:
                    say(by_name[child.name], f"finished in {_duration(child.seconds)}")
            time.sleep(0.2)
    if pool.stopped_by is not None:
        stopped = [c.name for c in pool.ended if c.code and c.after_stop]
        raise TrainingInterrupted(", ".join(stopped) or "no member",
                                  exit_code=128 + pool.stopped_by)
    failed = pool.failed()
    if failed:
        m = min((by_name[c.name] for c in failed), key=lambda m: m.number)  # (the first)
        code = next(c.code for c in failed if c.name == m.name)
        raise GruLmError(f"member {m.name} (exit {code}: {_last_line(_log(m))}); its output is "
                         f"in {_log(m)}")


def _start(pool: Supervisor, m: _Member, threads: int, offline: bool | None) -> None:
    """Member `m` as a `gru-lm train` process (resumed when it has a checkpoint)."""
    resuming = m.run.checkpoint().is_file()
    args = ["--resume", str(m.run.path)] if resuming else \
        ["--config", str(m.config), "--name", m.name, *m.overrides]
    # A resumed member's output goes on after what it wrote before; a new one's replaces
    # the log of an attempt that left no checkpoint.
    with open(_log(m), "a" if resuming else "w", encoding="utf-8") as f:
        if resuming and f.tell():
            f.write(f"--- resumed by gru-lm compare at {time.strftime('%Y-%m-%d %H:%M:%S')}"
                    " ---\n")
            f.flush()
        # Its own session (a Ctrl-C at the terminal reaches it once, through the
        # supervisor), and the parent-death signal (LAUNCHER): if this process dies, even by
        # kill -9, the member saves a checkpoint and stops instead of training on unseen.
        pool.start(m.name, [sys.executable, "-m", "gru_lm", "train", "--quiet", *args,
                            *(["--offline"] if offline else []), f"train.threads={threads}"],
                   stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                   env={**os.environ, LAUNCHER: str(os.getpid())})


def _log(m: _Member) -> Path:
    return m.run.path.parent / f"{m.name}.log"


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()
             if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def _check_same_recipe(run: RunDir, config: Path, overrides: list[str]) -> None:
    """A member kept from an earlier call must be what this call would train: a config edited
    in between would otherwise be averaged with runs of the old one."""
    kept, wanted = run.read_config().recipe(), load_config(config, overrides).recipe()
    changed = [k for k in wanted if wanted[k] != kept.get(k)]
    if changed:
        k = changed[0]
        raise GruLmError(f"{run} was trained from another recipe than {config} and this budget "
                         f"give now ({k}: {kept.get(k)!r} there, {wanted[k]!r} now); move it out "
                         f"of {run.path.parent} or compare into another --out")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def timestamped_out(runs_dir: Path) -> Path:
    return Path(runs_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
