"""Building a run from its config: the device, the threads, the optimizer, fine-tuning's
initial weights, the trainer, and the run's folder name."""

from __future__ import annotations

import time
from pathlib import Path

from gru_lm import distributed
from gru_lm.checkpoint import load_checkpoint, load_state, seed_everything
from gru_lm.config import Config, load_config, validate
from gru_lm.data import vocab_from_dict
from gru_lm.distributed import SINGLE, World
from gru_lm.errors import ConfigError, DataError, GruLmError
from gru_lm.members import locate
from gru_lm.models import build_model
from gru_lm.resume import diff_keys
from gru_lm.rundir import RunDir
from gru_lm.trainer import Trainer
from gru_lm.yamlconf import apply_overrides


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
    state, path = distributed.from_main(world, lambda: _init_state(cfg, vocab))
    load_state(model, state, path)


def _init_state(cfg: Config, vocab):
    """train.init_from's weights and the checkpoint they come from, checked."""
    if cfg.train.init_from is None:
        raise ValueError("train.init_from is not set")
    source = Path(cfg.train.init_from)
    path = locate(source).checkpoint
    ck = load_checkpoint(path)
    try:
        theirs = validate(ck["config"], source=str(path)).model.model_dump(mode="json")
        their_vocab = vocab_from_dict(ck["vocab"])
    except (ConfigError, DataError) as e:
        raise GruLmError(f"--init-from {source}: {e}") from None
    ours = cfg.model.model_dump(mode="json")
    changed = diff_keys(theirs, ours, "model")
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


def load_new_config(config: Path | Config | None, overrides: list[str]) -> Config:
    """The config of a new run, from a YAML file or a Config, with the overrides applied;
    a missing --config is an error."""
    if config is None:
        raise GruLmError("no config given; pass --config configs/gru.yaml (or configs/tiny.yaml "
                         "for a quick try)")
    if isinstance(config, Config):
        return validate(apply_overrides(config.to_dict(), overrides), source="config",
                        overrides=overrides)
    return load_config(config, overrides)
