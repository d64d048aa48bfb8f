"""The resume contract in one place: what a checkpoint holds (payload), what a resumed run
may change in its config, what must be the same (model, data, optimizer, batches, the
corpus' tokens, the number of processes), and how a trainer continues exactly where it
stopped (restore), each refusal one line that says what to do.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import torch

from gru_lm.checkpoint import load_checkpoint, load_state, rng_state, set_rng_state
from gru_lm.config import Config, TrainConfig, marked, validate
from gru_lm.distributed import gather
from gru_lm.errors import CheckpointError, ConfigError, GruLmError
from gru_lm.models import state_to
from gru_lm.rundir import LAST, RunDir
from gru_lm.schedule import stop_reason
from gru_lm.trainstate import TrainProgress
from gru_lm.yamlconf import apply_overrides, resolve_yaml

# ---------------------------------------------------------------- what a checkpoint holds


def payload(trainer, ema: bool = False) -> dict[str, Any]:
    """What a checkpoint holds: weights (`ema`: the averaged ones, for best.pt), optimizer,
    EMA, config, vocabulary, the corpus' fingerprint, progress, the batch cursor, the carried
    state and every random generator. Distributed, every rank must call it: each one's
    carried state and generators are gathered under "ranks"."""
    from dataclasses import asdict

    t = trainer
    out = {
        "model": t.ema.averaged_state(t.model) if ema else t.model.state_dict(),
        "weights": "ema" if ema else "raw",
        "ema": t.ema.state_dict() if t.ema is not None else None,
        "optimizer": t.optimizer.state_dict(), "config": t.cfg.to_dict(),
        "vocab": t.vocab.to_dict(), "data_fingerprint": t.data_fingerprint,
        "step": t.progress.step, "progress": asdict(t.progress),
        "loader_epoch_state": t.cursor.state(), "carry_state": t.state, "rng": rng_state(),
    }
    if t.world.active:
        carried = state_to(t.state, "cpu") if t.state is not None else None
        out.update(world_size=t.world.size,
                   ranks=gather(t.world, {"carry_state": carried, "rng": rng_state()}))
    return out


def own_part(ck: dict[str, Any], world, path) -> dict[str, Any]:
    """The part of a checkpoint that is this process' own (its carried state and random
    streams); a resume must run as many processes as trained it."""
    trained_by = ck.get("world_size", 1)
    if trained_by != world.size:
        raise GruLmError(
            f"checkpoint {path} was trained by {trained_by} process(es) and this resume runs "
            f"{world.size}: each process has its own batches, hidden state and random "
            f"streams; resume with {trained_by} (torchrun --nproc_per_node {trained_by}, or "
            f"gru-lm train --nproc {trained_by})")
    return ck["ranks"][world.rank] if world.active else ck


def load_optimizer(optimizer, state: dict[str, Any], t) -> None:
    """The optimizer's saved state, with the settings a resume may change applied."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["weight_decay"] = t.weight_decay
        if "momentum" in group:
            group["momentum"] = t.momentum


def progress_from(d: dict[str, Any], path) -> TrainProgress:
    """TrainProgress from a checkpoint's field, every value of its field's type and range."""
    defaults = TrainProgress()
    bad = [k for k in d if not hasattr(defaults, k)]
    for key, value in d.items():
        if key in bad:
            continue
        kind = type(getattr(defaults, key))
        ok = (isinstance(value, str) if kind is str else
              isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
              if kind is int else isinstance(value, int | float) and not isinstance(value, bool)
              and value >= 0 and (math.isfinite(value) or key in INFINITE_OK))
        if not ok:
            bad.append(key)
    if bad:
        raise GruLmError(f"checkpoint {path} field 'progress': {str(bad[0])[:80]!r} is unknown, "
                         "of the wrong type or out of range (the file was edited or damaged); "
                         "start a new run")
    return TrainProgress(**d)


INFINITE_OK = {"best_metric", "plateau_best"}  # infinite until the first evaluation


def check_fits(model, optimizer, ema, carried, batch_size: int, path) -> None:
    """A resumed checkpoint's optimizer moments, averaged weights and carried state must fit
    the model: one line names the field that does not."""

    def bad(field: str, what: str) -> GruLmError:
        return GruLmError(f"checkpoint {path} field '{field}': {what} does not fit the "
                          "model; the file was edited or damaged, start a new run")

    params = list(model.parameters())
    for i, p in enumerate(params):
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() and (
                    v.shape != p.shape or not bool(torch.isfinite(v).all())):
                raise bad("optimizer", f"state '{key}' of parameter {i} (shape "
                          f"{tuple(v.shape)})")
    if ema is not None:
        for i, (a, p) in enumerate(zip(ema.shadow, params, strict=True)):
            if a.shape != p.shape or not bool(torch.isfinite(a).all()):
                raise bad("ema", f"averaged weight {i} (shape {tuple(a.shape)})")
    if carried is not None:
        want = model.begin_state(batch_size)
        want = want if isinstance(want, tuple) else (want,)
        got = tuple(carried) if isinstance(carried, tuple | list) else (carried,)
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
            raise bad("carry_state", f"a state of shape {[tuple(t.shape) for t in got]}")


# ---------------------------------------------------------------- continuing a trainer


def restore(trainer, ck: dict[str, Any], path: Path) -> None:
    """Continue `trainer` from checkpoint `ck` (read from `path`) exactly where it stopped:
    weights, optimizer, progress, batch cursor, generators, EMA and carried state, each
    checked to fit; the run's records and samples after the checkpoint's step are dropped."""
    t = trainer
    load_state(t.model, ck["model"], path)
    mine = own_part(ck, t.world, path)  # this process' carried state and generators
    try:
        load_optimizer(t.optimizer, ck["optimizer"], t.cfg.train)
        t.progress = progress_from(ck["progress"], path)
        t.cursor.restore(ck["loader_epoch_state"], t.progress.batch_in_epoch)
        set_rng_state(mine["rng"])
        if t.ema is not None and ck.get("ema") is not None:
            t.ema.load_state_dict(ck["ema"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise GruLmError(f"checkpoint {path} cannot be resumed ({type(e).__name__}: "
                         f"{str(e)[:120]}); start a new run") from None
    carried = mine.get("carry_state")
    check_fits(t.model, t.optimizer, t.ema, carried, t.cfg.train.batch_size, path)
    # Checkpoints load on the CPU; the carried state belongs on the training device.
    t.state = state_to(carried, t.device) if carried is not None else None
    if t.run is not None and t.world.is_main:
        t.run.truncate_records(t.progress.step)
        t.run.truncate_samples(t.progress.step)


# ---------------------------------------------------------------- what a resume may change


def diff_keys(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix} ({a!r} in the run, {b!r} now)"]


def resume_config(run: RunDir, config: Path | None, overrides: list[str]) -> Config:
    """The run's own config, updated by --config/overrides; model and data must not change."""
    saved = run.read_config()
    renaming = [o for o in overrides if renames(o)]
    if renaming:
        raise ConfigError(f"--resume {run}: {renaming[0][:60]} cannot rename a resumed run; drop "
                          f"it (the run stays in {run})")
    if config is None and not overrides:
        return saved
    raw = resolve_yaml(config)[0] if config is not None else saved.to_dict()
    new = validate(apply_overrides(raw, overrides), source=str(config or run.config),
                   overrides=overrides)
    old_d, new_d = saved.to_dict(), new.to_dict()
    changed = fixed_keys_changed(old_d, new_d)
    if changed:
        raise ConfigError(f"--resume {run}: the new config changes {', '.join(changed)}; "
                          "a resumed run keeps its architecture, data and optimizer; start a "
                          "new run instead")
    new.run = saved.run
    return new


def fixed_keys_changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = diff_keys(old["model"], new["model"], "model")
    changed += diff_keys(old["data"], new["data"], "data")
    # (the train keys marked FIXED: the weights, batches and optimizer state were built
    # from them)
    for key in marked(TrainConfig, "fixed"):
        changed += diff_keys(old["train"][key], new["train"][key], f"train.{key}")
    return changed


def check_run_dir(run: RunDir) -> None:
    if not run.path.is_dir():
        raise GruLmError(f"--resume {run}: no such run directory")


def read_for_resume(run: RunDir, config: Path | None, overrides: list[str],
                     own_restart: bool = False):
    """What a resume needs from the run's folder: its config (updated by --config and the
    overrides), last.pt (None: the run saved none yet, so it starts again from step 0) and
    its vocabulary; every refusal of a resume that reads the folder is made here.
    `own_restart`: torchrun restarted the launch that made the run, so evaluations and
    samples written before its first checkpoint (a kill between the two) are its own, and
    start again with it."""
    run.remove_temporaries()
    # config.yaml is rewritten by the trainer with its first checkpoint: a refused or failed
    # resume leaves it as it was.
    cfg = resume_config(run, config, overrides)
    last = run.checkpoint(LAST)
    if not last.is_file():
        kept = (run.has_checkpoint() or run.summary.exists()) if own_restart \
            else run.trained_something()
        if last.exists() or kept:
            raise GruLmError(
                f"--resume {run}: {last} is {'not a file' if last.exists() else 'missing'}, "
                "so the run cannot continue where it stopped; its other files are left as "
                "they are. Start a new run from its config: gru-lm train --config "
                f"{shlex.quote(str(run.config))} --name NEW_NAME")
        return cfg, None, None
    try:
        ck = load_checkpoint(last)
    except GruLmError as e:
        raise CheckpointError(f"--resume {run}: {e}") from None
    _check_not_finished(run, ck, cfg)
    return cfg, ck, _run_vocab(run, ck, last)


def renames(override: str) -> bool:
    return override.partition("=")[0].strip() in ("run.name", "run")


def _check_not_finished(run: RunDir, ck: dict[str, Any], cfg: Config) -> None:
    """A finished run whose limits are already reached has nothing to train: refuse before
    anything is touched (training zero steps would rewrite its summary)."""
    if not run.summary.is_file():
        return
    p = progress_from(ck.get("progress", {}), run.checkpoint(LAST))
    reason = stop_reason(cfg.train, p.step, p.epoch, p.elapsed_s)
    if reason:
        raise GruLmError(f"--resume {run}: the run finished at step {p.step:,} and {reason} "
                         "stops it there, so there is nothing to train and nothing was changed; "
                         f"to train on, raise the limit (e.g. train.max_steps={2 * p.step})")


def _run_vocab(run: RunDir, ck: dict[str, Any], path: Path):
    """vocab.json, which must agree with the vocabulary stored in the checkpoint."""
    vocab = run.read_vocab()
    if vocab.to_dict() != ck["vocab"]:
        raise GruLmError(f"--resume {run}: {run.vocab} does not match the vocabulary in {path} "
                         "(was vocab.json edited?); restore it or start a new run")
    return vocab


def check_same_data(run: RunDir, ck: dict[str, Any], cfg: Config, corpus) -> None:
    """Refuse to continue on other data: config.yaml edited, or the corpus file changed."""
    try:  # validated, so a checkpoint written before a key existed gets its default
        saved = validate(ck["config"], source="checkpoint").to_dict()
    except ConfigError:
        saved = None  # restore() names a checkpoint whose config is unusable
    if saved is not None:
        changed = fixed_keys_changed(saved, cfg.to_dict())
        if changed:
            raise GruLmError(f"--resume {run}: {run.config} disagrees with its checkpoint on "
                             f"{', '.join(changed)}; restore config.yaml or start a new run")
    recorded = ck.get("data_fingerprint")
    if isinstance(recorded, str) and recorded != corpus.fingerprint():
        raise GruLmError(f"--resume {run}: the corpus ({corpus.source}) is not the text this run "
                         "was trained on: the file, data.max_tokens or the split changed; "
                         "restore the original file or start a new run")
