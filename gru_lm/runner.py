"""Run-level operations behind the API and the CLI: build and train or resume a run, find
runs, load a model, evaluate."""

from __future__ import annotations

import contextlib
import shlex
import time
from pathlib import Path
from typing import Any

from gru_lm.config import Config, apply_overrides, load_config, resolve_yaml, validate
from gru_lm.distributed import SINGLE, World
from gru_lm.errors import CheckpointError, ConfigError, GruLmError
from gru_lm.rundir import LAST, RunDir
from gru_lm.utils import EARLY_SIGNALS, caught_signals


def _diff_keys(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix} ({a!r} in the run, {b!r} now)"]


def resume_config(run: RunDir, config: Path | None, overrides: list[str]) -> Config:
    """The run's own config, updated by --config/overrides; model and data must not change."""
    saved = run.read_config()
    renames = [o for o in overrides if _renames(o)]
    if renames:
        raise ConfigError(f"--resume {run}: {renames[0][:60]} cannot rename a resumed run; drop "
                          f"it (the run stays in {run})")
    if config is None and not overrides:
        return saved
    raw = resolve_yaml(config)[0] if config is not None else saved.to_dict()
    new = validate(apply_overrides(raw, overrides), source=str(config or run.config))
    old_d, new_d = saved.to_dict(), new.to_dict()
    changed = fixed_keys_changed(old_d, new_d)
    if changed:
        raise ConfigError(f"--resume {run}: the new config changes {', '.join(changed)}; "
                          "a resumed run keeps its architecture, data and optimizer; start a "
                          "new run instead")
    new.run = saved.run
    return new


# What a resume cannot change: the weights, batches and optimizer state were built from them.
FIXED_TRAIN_KEYS = ("batch_size", "num_steps", "sampler", "seed", "optimizer", "init_from")


def fixed_keys_changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = _diff_keys(old["model"], new["model"], "model")
    changed += _diff_keys(old["data"], new["data"], "data")
    for key in FIXED_TRAIN_KEYS:
        changed += _diff_keys(old["train"][key], new["train"][key], f"train.{key}")
    return changed


# ---------------------------------------------------------------- building from a config


def resolve_device(name: str):
    import torch

    mps = getattr(torch.backends, "mps", None)
    available = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available())}
    if name == "auto":
        return torch.device(next((d for d in ("cuda", "mps") if available[d]), "cpu"))
    if name in available and not available[name]:
        raise ConfigError(f"train.device: '{name}' is not available on this machine; "
                          "use train.device=auto or cpu")
    return torch.device(name)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's
    limit), which can be fewer than the machine has."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def gpu_count() -> int:
    """CUDA devices torch can use here (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_optimizer(cfg: Config, model):
    import torch

    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                               weight_decay=t.weight_decay)
    cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def init_weights(model, cfg: Config, vocab, world: World = SINGLE) -> None:
    """Load train.init_from's weights into `model` (fine-tuning): its model section and its
    vocabulary must be this run's, or one line says which differs. Distributed, process 0
    reads the file and hands the weights on: the other nodes need no copy of it."""
    from gru_lm import distributed
    from gru_lm.checkpoint import load_state

    state, path = distributed.from_main(world, lambda: _init_state(cfg, vocab))
    load_state(model, state, path)


def _init_state(cfg: Config, vocab):
    """train.init_from's weights and the checkpoint they come from, checked."""
    from gru_lm.checkpoint import load_checkpoint
    from gru_lm.data import vocab_from_dict
    from gru_lm.errors import DataError
    from gru_lm.members import locate

    source = Path(cfg.train.init_from)
    path = locate(source).checkpoint
    ck = load_checkpoint(path)
    try:
        theirs = validate(ck["config"], source=str(path)).model.model_dump(mode="json")
        their_vocab = vocab_from_dict(ck["vocab"])
    except (ConfigError, DataError) as e:
        raise GruLmError(f"--init-from {source}: {e}") from None
    ours = cfg.model.model_dump(mode="json")
    changed = _diff_keys(theirs, ours, "model")
    if changed:
        raise GruLmError(f"--init-from {source}: its weights are of another model "
                         f"({changed[0]}); fine-tuning keeps the model section, so use the "
                         "source's (gru-lm config show shows it)")
    if their_vocab.idx_to_token != vocab.idx_to_token:
        raise GruLmError(f"--init-from {source}: its vocabulary ({len(their_vocab)} tokens) is "
                         f"not this corpus' ({len(vocab)}); fine-tuning needs the same one: "
                         "data.preset=bytes gives every text the same vocabulary")
    return ck["model"], path


def build_trainer(cfg: Config, corpus, run: RunDir | None = None, reporter=None,
                  world: World = SINGLE, resuming: bool = False,
                  signals: list[int] | None = None):
    """Threads, device, seed, model (train.init_from's weights for a new run) and optimizer
    from `cfg`, then the Trainer."""
    import torch

    from gru_lm.checkpoint import seed_everything
    from gru_lm.models import build_model
    from gru_lm.trainer import Trainer

    t = cfg.train
    # torchrun's processes share the cores: each takes its share, never all of them.
    torch.set_num_threads(t.threads or max(1, usable_cores() // world.local_size))
    device = resolve_device(t.device)
    if device.type == "cuda" and world.active:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    seed_everything(t.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, len(corpus.vocab))
    if cfg.train.init_from is not None and not resuming:  # (a resume loads its own weights)
        init_weights(model, cfg, corpus.vocab, world)
    model = model.to(device)
    if world.active:  # dropout masks differ between ranks, as between rows of one batch
        torch.manual_seed(t.seed + world.rank)
    return Trainer(cfg, model, make_optimizer(cfg, model), corpus, device=device, run=run,
                   reporter=reporter, world=world, signals=signals)


# ---------------------------------------------------------------- train and resume


def default_run_name(config_path: Path | None) -> str:
    stem = config_path.stem if config_path else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_name(name: str, flag: str) -> None:
    """A run name is a plain, printable folder name: it appears in paths, tables and the
    resume commands people paste into a shell."""
    import unicodedata

    if not name.strip():
        example = "--name gru-1" if flag == "--name" else f"{flag}=gru-1"
        raise ConfigError(f"{flag}: an empty name is not a folder name; give one, e.g. "
                          f"{example}")
    if name != name.strip():
        raise ConfigError(f"{flag}: {name[:40]!r} begins or ends with a space, which a folder "
                          f"name shown in a table or pasted in a shell loses; give "
                          f"{name.strip()[:40]!r}")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise ConfigError(f"{flag}: {name[:40]!r} holds a control character ({bad!r}); use "
                          "letters, digits, - and _")
    if "/" in name or name in (".", "..") or len(name.encode()) > 200:
        raise ConfigError(f"{flag}: {name[:40]!r} is not a plain folder name (no /, at most "
                          "200 bytes); use letters, digits, - and _")


def new_run(cfg: Config, config_path: Path | None, name: str | None) -> RunDir:
    """The folder for a new run; an existing one is never reused without --resume."""
    if name is not None:
        check_run_name(name, "--name")
    if cfg.run.name is not None:
        check_run_name(cfg.run.name, "run.name")
    run_name = name or cfg.run.name or default_run_name(config_path)
    run = RunDir(cfg.run.runs_dir / run_name)
    if run.path.exists():
        raise run.exists_error()
    return run


def train_run(config: Path | Config | None, overrides: list[str], *, name: str | None = None,
              resume: Path | None = None, offline: bool | None = None, console=None,
              reporter=None) -> dict[str, Any]:
    """Train a new run (from a YAML path or a Config, plus overrides), or continue `resume`;
    returns the run's summary, with "path", its folder. What it shows goes to `reporter`
    (display.Reporter; default: `console`, or nothing). Under torchrun, every process calls
    it; rank 0 alone prints and writes."""
    from gru_lm import distributed
    from gru_lm.display import Reporter
    from gru_lm.errors import NonFiniteLoss, TrainingInterrupted

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
    try:
        with caught_signals(into=signals) if signals is not None else contextlib.nullcontext():
            try:
                summary = _train(world, config, overrides, name, resume, offline, out,
                                 signals, where)
                distributed.barrier(world)  # rank 0 evaluates last: the group ends together
                return summary
            except TrainingInterrupted as e:
                distributed.barrier(world)  # raised by every rank at the same step
                e.silent = not world.is_main  # (torchrun shows every process' stderr)
                raise
            except NonFiniteLoss:
                distributed.barrier(world)
                raise
    except RuntimeError as e:  # a collective failed: another process stopped or was killed
        if not world.active or not distributed.lost_peer(e):
            raise
        run = where.get("run") or (RunDir(resume) if resume is not None else None)
        hint = (f"the last checkpoint is kept; resume with: {run.resume_command(world.size)}"
                if run is not None else "no run folder was made yet; start it again")
        raise GruLmError("another process of this training stopped (killed, or failed: see "
                         f"its message); {hint}") from None
    finally:
        distributed.stop(world)


def _load_corpus(world: World, cfg: Config, offline, vocab=None):
    """The corpus, checked to be the same text on every process. Distributed, the first
    process of each node prepares its node's token store before the others open it (nodes
    share no disk), and a node whose text differs from process 0's is refused before the
    first step, naming the node and its file."""
    from gru_lm import distributed
    from gru_lm.data import load_corpus

    if world.local_rank != 0:
        distributed.barrier(world)
    corpus = load_corpus(cfg.data, vocab=vocab, offline=offline, progress=world.is_main)
    if world.local_rank == 0:
        distributed.barrier(world)
    distributed.check_same_corpus(world, corpus)
    return corpus


def _train(world: World, config, overrides, name, resume, offline, out, signals, where,
           own_restart: bool = False):
    from gru_lm import distributed

    distributed.start(world)
    if resume is not None:
        if name is not None:
            raise GruLmError(f"--name cannot rename a resumed run; drop --name (the run stays in "
                             f"{resume})")
        run = where["run"] = RunDir(resume)
        # Process 0 alone reads the run folder (with several nodes only its node has it) and
        # hands what it read to every process; its refusal is every process' refusal.
        distributed.from_main(world, lambda: _check_run_dir(run))
        with run.lock() if world.is_main else contextlib.nullcontext():
            cfg, ck, vocab = distributed.from_main(world, lambda: _read_for_resume(
                run, config, overrides, own_restart))
            if ck is None:
                return _restart(run, cfg, offline, out, world, signals)
            last = run.checkpoint(LAST)
            corpus = _load_corpus(world, cfg, offline, vocab=vocab)
            _check_same_data(run, ck, cfg, corpus)
            trainer = build_trainer(cfg, corpus, run, out, world, resuming=True,
                                    signals=signals)
            trainer.restore(ck, last)
            out.note(f"resuming {run} at step {trainer.progress.step}")
            return trainer.fit()
    cfg = load_new_config(config, overrides)
    config = config if isinstance(config, Path) else None  # (its name names the run)
    restarted = _elastic_restart(world, cfg, name)
    if restarted is not None:  # torchrun restarted this launch: go on where it stopped
        return _train(world, config, [o for o in overrides if not _renames(o)], None,
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


def _check_run_dir(run: RunDir) -> None:
    if not run.path.is_dir():
        raise GruLmError(f"--resume {run}: no such run directory")


def _read_for_resume(run: RunDir, config: Path | None, overrides: list[str],
                     own_restart: bool = False):
    """What a resume needs from the run's folder: its config (updated by --config and the
    overrides), last.pt (None: the run saved none yet, so it starts again from step 0) and
    its vocabulary; every refusal of a resume that reads the folder is made here.
    `own_restart`: torchrun restarted the launch that made the run, so evaluations and
    samples written before its first checkpoint (a kill between the two) are its own, and
    start again with it."""
    from gru_lm.checkpoint import load_checkpoint

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


def _renames(override: str) -> bool:
    return override.partition("=")[0].strip() in ("run.name", "run")


def _elastic_restart(world: World, cfg: Config, name: str | None) -> Path | None:
    """Under `torchrun --max-restarts N`: the run folder to continue when torchrun has
    restarted this launch (TORCHELASTIC_RESTART_COUNT > 0) and the folder is the one this
    launch created (its launch mark); None for a first start. A restartable launch needs a
    run name: the default one holds the time, which a restart would not find."""
    from gru_lm import distributed

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


def load_new_config(config: Path | Config | None, overrides: list[str]) -> Config:
    """The config of a new run, from a YAML file or a Config, with the overrides applied;
    a missing --config is an error."""
    if config is None:
        raise GruLmError("no config given; pass --config configs/gru.yaml (or configs/tiny.yaml "
                         "for a quick try)")
    if isinstance(config, Config):
        return validate(apply_overrides(config.to_dict(), overrides), source="config")
    return load_config(config, overrides)


def _restart(run: RunDir, cfg: Config, offline: bool | None, out,
             world: World = SINGLE, signals: list[int] | None = None) -> dict[str, Any]:
    """A run stopped before its first checkpoint (NaN at step 1, kill, full disk): nothing
    was learnt, so it starts again from step 0 in the same folder."""
    from gru_lm import distributed

    corpus = _load_corpus(world, cfg, offline)
    trainer = build_trainer(cfg, corpus, run, out, world, signals=signals)
    if world.is_main:
        run.clear()
        run.write_vocab(corpus.vocab)
    distributed.barrier(world)
    out.note(f"{run} has no checkpoint yet: starting it again from step 0")
    return trainer.fit()


def _check_not_finished(run: RunDir, ck: dict[str, Any], cfg: Config) -> None:
    """A finished run whose limits are already reached has nothing to train: refuse before
    anything is touched (training zero steps would rewrite its summary)."""
    from gru_lm.schedule import stop_reason
    from gru_lm.trainer import progress_from

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


def _check_same_data(run: RunDir, ck: dict[str, Any], cfg: Config, corpus) -> None:
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
