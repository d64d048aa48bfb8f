"""Run-level operations behind the CLI: train/resume, find runs, predict, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gru_lm.config import (
    Config,
    apply_overrides,
    load_config,
    read_yaml,
    save_config,
    validate,
)
from gru_lm.errors import CheckpointError, ConfigError, DataError, GruLmError


def _diff_keys(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix} ({a!r} in the run, {b!r} now)"]


def resume_config(run_dir: Path, config: Path | None, overrides: list[str]) -> Config:
    """The run's own config, updated by --config/overrides; model and data must not change."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise GruLmError(f"{run_dir} is not a gru-lm run (no config.yaml); pass a run directory "
                         "to --resume")
    saved = validate(read_yaml(saved_path), source=str(saved_path))
    if config is None and not overrides:
        return saved
    raw = read_yaml(config) if config is not None else saved.to_dict()
    new = validate(apply_overrides(raw, overrides), source=str(config or saved_path))
    old_d, new_d = saved.to_dict(), new.to_dict()
    changed = _diff_keys(old_d["model"], new_d["model"], "model")
    changed += _diff_keys(old_d["data"], new_d["data"], "data")
    for key in ("batch_size", "num_steps", "sampler", "seed"):
        changed += _diff_keys(old_d["train"][key], new_d["train"][key], f"train.{key}")
    if changed:
        raise ConfigError(f"--resume {run_dir}: the new config changes {', '.join(changed)}; "
                          "a resumed run keeps its architecture and data; start a new run instead")
    new.run = saved.run
    return new


def train_run(config: Path | None, overrides: list[str], *, name: str | None = None,
              resume: Path | None = None, offline: bool | None = None, console=None
              ) -> dict[str, Any]:
    """Train a new run, or continue `resume`; returns the run's summary."""
    from gru_lm.data import load_corpus
    from gru_lm.trainer import Trainer, create_run_dir, new_run_dir, write_run_files

    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise GruLmError(f"--resume {run_dir}: no such run directory")
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise GruLmError(f"--resume {run_dir}: the run has no checkpoint "
                             f"({run_dir}/checkpoints/last.pt); start it again without --resume")
        cfg = resume_config(run_dir, config, overrides)
        vocab = _read_vocab(run_dir / "vocab.json")
        corpus = load_corpus(cfg.data, vocab=vocab, offline=offline)
        trainer = Trainer(cfg, corpus, run_dir, console=console, resume=True)
        save_config(cfg, run_dir / "config.yaml")
        if console is not None:
            console.print(f"resuming {run_dir} at step {trainer.p.step}", highlight=False)
        return trainer.fit()
    if config is None:
        raise GruLmError("no config given; pass --config configs/gru.yaml (or configs/tiny.yaml "
                         "for a quick try)")
    cfg = load_config(config, overrides)
    corpus = load_corpus(cfg.data, offline=offline)
    run_dir = new_run_dir(cfg, config, name)
    # Everything that can fail on bad input fails here, before the run directory exists.
    trainer = Trainer(cfg, corpus, run_dir, console=console)
    create_run_dir(run_dir)
    write_run_files(cfg, corpus, run_dir)
    if console is not None:
        console.print(f"run directory: {run_dir}", highlight=False)
    return trainer.fit()


def _read_vocab(path: Path):
    from gru_lm.data import Vocab

    try:
        return Vocab.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, DataError) as e:
        raise GruLmError(f"cannot read the run's vocabulary {path} ({e}); the run folder is "
                         "damaged, start a new run") from None


def find_latest_run(runs_dir: Path) -> Path:
    runs_dir = Path(runs_dir)
    candidates = [d for d in runs_dir.glob("*/") if (d / "checkpoints").is_dir()
                  and any((d / "checkpoints").glob("*.pt"))] if runs_dir.is_dir() else []
    if not candidates:
        raise GruLmError(f"no trained run found under {runs_dir}/; train one with "
                         "`gru-lm train --config configs/gru.yaml` or pass --run / --checkpoint")
    return max(candidates, key=lambda d: max(p.stat().st_mtime
                                             for p in (d / "checkpoints").glob("*.pt")))


def checkpoint_for(run: Path | None, checkpoint: Path | None, runs_dir: Path) -> Path:
    """--checkpoint, else best.pt (or last.pt) of --run, else of the newest run."""
    if checkpoint is not None:
        return Path(checkpoint)
    run_dir = Path(run) if run is not None else find_latest_run(runs_dir)
    if not run_dir.is_dir():
        raise GruLmError(f"--run {run_dir}: no such run directory")
    for name in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    raise CheckpointError(f"run {run_dir} has no checkpoint in {run_dir}/checkpoints/; "
                          "train it first")


def load_model(path: Path):
    from gru_lm.checkpoint import load_checkpoint, restore_model

    cfg, vocab, model = restore_model(load_checkpoint(path), path)
    model.eval()
    return cfg, vocab, model


def predict(prefix: str, *, run: Path | None, checkpoint: Path | None, runs_dir: Path,
            num_chars: int, temperature: float | None = None, top_k: int | None = None,
            top_p: float | None = None, num_samples: int = 1, seed: int | None = None
            ) -> tuple[str, list[str]]:
    """Returns the preprocessed prefix and one continuation per sample."""
    from gru_lm.sampling import encode_prefix, generate

    path = checkpoint_for(run, checkpoint, runs_dir)
    cfg, vocab, model = load_model(path)
    ids = encode_prefix(prefix, vocab, cfg.data.preset, cfg.data.lowercase)
    outs = generate(model, ids, num_chars, temperature=temperature, top_k=top_k, top_p=top_p,
                    num_samples=num_samples, seed=seed)
    return vocab.decode(ids), [vocab.decode(o) for o in outs]


def evaluate_run(*, run: Path | None, checkpoint: Path | None, split: str, text: Path | None,
                 runs_dir: Path, offline: bool | None = None) -> dict[str, Any]:
    import torch

    from gru_lm.data import load_corpus, preprocess, read_text
    from gru_lm.trainer import bits_per_char, evaluate, perplexity

    path = checkpoint_for(run, checkpoint, runs_dir)
    cfg, vocab, model = load_model(path)
    unknown = 0
    if text is not None:
        tokens = preprocess(read_text(text), cfg.data.preset, cfg.data.lowercase)
        if len(tokens) < 2:
            raise GruLmError(f"--text {text}: fewer than 2 tokens after preprocessing")
        unknown = sum(1 for t in tokens if t not in vocab.token_to_idx)
        ids = torch.tensor(vocab.encode(tokens), dtype=torch.long)
        what = str(text)
    else:
        corpus = load_corpus(cfg.data, vocab=vocab, offline=offline, progress=False)
        ids = getattr(corpus, split)
        if len(ids) < 2:
            raise GruLmError(f"the run's data has no {split} split (data.{split}_fraction = 0); "
                             "evaluate with --text FILE or another --split")
        what = f"{split} split"
    nll, n = evaluate(model, ids, cfg.train.eval_batch_size, cfg.train.num_steps,
                      torch.device("cpu"))
    return {"what": what, "checkpoint": str(path), "tokens": n, "loss": nll / n,
            "ppl": perplexity(nll, n), "bpc": bits_per_char(nll, n), "unknown": unknown}
