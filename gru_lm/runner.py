"""Running a training: a new run, a resumed one, or a restarted one (torchrun --max-restarts),
in one process or several (every process calls train_run; process 0 alone writes), with
Ctrl-C and a lost process each ending in one line that says how to go on."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from gru_lm import distributed
from gru_lm.building import build_trainer, load_new_config, new_run
from gru_lm.config import Config
from gru_lm.data import load_corpus
from gru_lm.display import Reporter
from gru_lm.distributed import SINGLE, World
from gru_lm.errors import GruLmError, NonFiniteLoss, TrainingInterrupted
from gru_lm.resume import check_run_dir, check_same_data, read_for_resume, renames
from gru_lm.rundir import LAST, RunDir
from gru_lm.utils import EARLY_SIGNALS, caught_signals
from gru_lm.yamlconf import apply_overrides, resolve_yaml

# ---------------------------------------------------------------- building from a config


# ---------------------------------------------------------------- train and resume


def train_run(config: Path | Config | None, overrides: list[str], *, name: str | None = None,
              resume: Path | None = None, offline: bool | None = None, console=None,
              reporter=None) -> dict[str, Any]:
    """Train a new run (from a YAML path or a Config, plus overrides), or continue `resume`;
    returns the run's summary, with "path", its folder. What it shows goes to `reporter`
    (display.Reporter; default: `console`, or nothing). Under torchrun, every process calls
    it; rank 0 alone prints and writes."""
    world = distributed.world_from_env()
    distributed.die_with_launcher()
    out = reporter if reporter is not None else Reporter(console)
    if not world.is_main:
        out = Reporter(None)
    # Several processes: a SIGINT/SIGTERM is recorded from the start, never raised, so that no
    # process leaves a collective the others are in; the training loop stops every process
    # at the first step boundary where they agree on it (a signal before that boundary stops
    # the run at its first step; one after the loop lets the run finish).
    signals = EARLY_SIGNALS if world.active else None
    where: dict[str, RunDir] = {}  # the run, once known: what a lost peer's hint resumes
    together = False  # every process met at the end: they leave the group together
    try:
        with caught_signals(into=signals) if signals is not None else contextlib.nullcontext():
            try:
                summary = _train(world, config, overrides, name, resume, offline, out,
                                 signals, where)
                distributed.barrier(world)  # rank 0 evaluates last: the group ends together
                together = True
                return summary
            except TrainingInterrupted as e:
                distributed.barrier(world)  # raised by every rank at the same step
                together = True
                e.silent = not world.is_main  # (torchrun shows every process' stderr)
                raise
            except NonFiniteLoss:
                distributed.barrier(world)
                together = True
                raise
    except RuntimeError as e:  # a collective failed: another process stopped or was killed
        if not world.active or not distributed.lost_peer(e):
            raise
        run = where.get("run") or (RunDir(resume) if resume is not None else None)
        if run is not None and run.checkpoint(LAST).is_file():
            hint = f"the last checkpoint is kept; resume with: {run.resume_command(world.size)}"
        elif run is not None and run.path.is_dir():
            hint = (f"no checkpoint was written yet; {run.resume_command(world.size)} starts "
                    "it again from step 0")
        else:
            hint = "no run folder was made yet; start it again"
        if distributed.timed_out(e):
            raise GruLmError(f"{distributed.no_answer(world)}; {hint}") from None
        raise GruLmError("another process of this training stopped (killed, or failed: see "
                         f"its message); {hint}") from None
    finally:
        distributed.stop(world, together)


def _load_corpus(world: World, cfg: Config, offline, vocab=None):
    """The corpus, checked to be the same text on every process. Distributed, the first
    process of each node prepares its node's token store before the others open it (nodes
    share no disk), and a node whose text differs from process 0's is refused before the
    first step, naming the node and its file."""
    if world.local_rank != 0:
        distributed.barrier(world)
    corpus = load_corpus(cfg.data, vocab=vocab, offline=offline, progress=world.is_main)
    if world.local_rank == 0:
        distributed.barrier(world)
    distributed.check_same_corpus(world, corpus)
    return corpus


def _train(world: World, config, overrides, name, resume, offline, out, signals, where,
           own_restart: bool = False):
    distributed.start(world)
    if resume is not None:
        _check_same_resume(world, config, overrides)
        if name is not None:
            raise GruLmError(f"--name cannot rename a resumed run; drop --name (the run stays in "
                             f"{resume})")
        run = where["run"] = RunDir(resume)
        # Process 0 alone reads the run folder (with several nodes only its node has it) and
        # hands what it read to every process; its refusal is every process' refusal.
        distributed.from_main(world, lambda: check_run_dir(run))
        with run.lock() if world.is_main else contextlib.nullcontext():
            cfg, ck, vocab = distributed.from_main(world, lambda: read_for_resume(
                run, config, overrides, own_restart))
            if ck is None:
                return _restart(run, cfg, offline, out, world, signals)
            last = run.checkpoint(LAST)
            corpus = _load_corpus(world, cfg, offline, vocab=vocab)
            check_same_data(run, ck, cfg, corpus)
            trainer = build_trainer(cfg, corpus, run, out, world, resuming=True,
                                    signals=signals)
            trainer.restore(ck, last)
            out.note(f"resuming {run} at step {trainer.progress.step}")
            return trainer.fit()
    cfg = load_new_config(config, overrides)
    # Every process must ask for the same training, before the first step.
    distributed.check_same_settings(world, distributed.flat_settings(cfg.to_dict()))
    config = config if isinstance(config, Path) else None  # (its name names the run)
    restarted = _elastic_restart(world, cfg, name)
    if restarted is not None:  # torchrun restarted this launch: go on where it stopped
        return _train(world, config, [o for o in overrides if not renames(o)], None,
                      restarted, offline, out, signals, where, own_restart=True)
    corpus = _load_corpus(world, cfg, offline)
    # Everything that can fail on bad input fails here, before the run directory exists.
    # Rank 0 names the folder (the default name holds the time) and creates it.
    run = where["run"] = RunDir(Path(distributed.from_main(
        world, lambda: str(new_run(cfg, config, name).path))))
    trainer = build_trainer(cfg, corpus, run, out, world, signals=signals)
    if world.is_main:
        run.create()
    with run.lock() if world.is_main else contextlib.nullcontext():
        if world.is_main:
            run.write_start(cfg, corpus.vocab)
            distributed.mark_launch(run.path)
        out.note(f"run directory: {run}{f' ({world.size} processes)' if world.active else ''}")
        return trainer.fit()


def _check_same_resume(world: World, config, overrides: list[str]) -> None:
    """Every process of a resume must change the same settings (its --config and overrides;
    only process 0 reads the run itself)."""
    if not world.active:
        return
    raw = resolve_yaml(config)[0] if isinstance(config, Path) else {}
    raw = apply_overrides(raw, [o for o in overrides if not renames(o)])
    distributed.check_same_settings(world, distributed.flat_settings(raw),
                                    what="resumes with")


def _elastic_restart(world: World, cfg: Config, name: str | None) -> Path | None:
    """Under `torchrun --max-restarts N`: the run folder to continue when torchrun has
    restarted this launch (TORCHELASTIC_RESTART_COUNT > 0) and the folder is the one this
    launch created (its launch mark); None for a first start. A restartable launch needs a
    run name: the default one holds the time, which a restart would not find."""
    elastic = distributed.elastic_env()
    if elastic.max_restarts == 0:
        return None
    run_name = name or cfg.run.name
    if run_name is None:
        raise GruLmError("torchrun --max-restarts restarts every process with the same "
                         "arguments, and the run's folder must be found again: give it a name "
                         "(--name NAME or run.name=NAME)")
    if elastic.restart_count == 0:
        return None
    path = cfg.run.runs_dir / run_name
    ours = distributed.from_main(world, lambda: distributed.launched_here(path))
    return path if ours else None


def _restart(run: RunDir, cfg: Config, offline: bool | None, out,
             world: World = SINGLE, signals: list[int] | None = None) -> dict[str, Any]:
    """A run stopped before its first checkpoint (NaN at step 1, kill, full disk): nothing
    was learnt, so it starts again from step 0 in the same folder."""
    corpus = _load_corpus(world, cfg, offline)
    trainer = build_trainer(cfg, corpus, run, out, world, signals=signals)
    if world.is_main:
        run.clear()
        run.write_vocab(corpus.vocab)
    distributed.barrier(world)
    out.note(f"{run} has no checkpoint yet: starting it again from step 0")
    return trainer.fit()


