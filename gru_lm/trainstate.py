"""What a training run carries from step to step and across a resume: its progress record,
the checks a checkpoint must pass to be resumed, and the summary written at the end."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gru_lm.errors import GruLmError, NonFiniteLoss
from gru_lm.models import count_parameters


@dataclass
class TrainProgress:
    """Everything that changes during training and must survive a resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0
    elapsed_s: float = 0.0
    best_metric: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    lr_scale: float = 1.0  # plateau schedule's multiplier
    plateau_best: float = math.inf
    plateau_bad: int = 0
    interval_nll: float = 0.0
    interval_tokens: int = 0
    stop_reason: str = ""
    best_weights: str = "raw"  # or "ema": which weights scored the best val ppl

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second of training time (evaluation excluded)."""
        return self.tokens_seen / self.train_time_s if self.train_time_s else 0.0

    def eval_record(self, frac: float, lr: float) -> dict[str, Any]:
        """A metrics.jsonl record of this step (the evaluator adds val figures); the train
        perplexity of the steps since the last one, which starts a new interval."""
        from gru_lm.metrics import bits_per_char, perplexity

        nll, n = self.interval_nll, self.interval_tokens
        self.interval_nll, self.interval_tokens = 0.0, 0
        return {"kind": "eval", "step": self.step, "epoch": self.epoch,
                "tokens_seen": self.tokens_seen, "train_ppl": perplexity(nll, n),
                "train_bpc": bits_per_char(nll, n),
                "tokens_per_s": self.tokens_per_s, "lr": lr, "elapsed_s": round(self.elapsed_s, 3),
                "eta_s": round(self.elapsed_s * (1 - frac) / frac, 1) if frac > 0 else None}

    def note_eval(self, metric: float, weights: str, t) -> bool:
        """Record an evaluation's metric (val ppl of the weights that scored best, `weights`):
        best so far, evaluations since, the plateau schedule. Returns whether it improved."""
        from gru_lm.schedule import plateau

        improved = math.isfinite(metric) and metric < self.best_metric
        if improved:
            self.best_metric, self.best_step, self.evals_since_best = metric, self.step, 0
            self.best_weights = weights
        else:
            self.evals_since_best += 1
        self.plateau_best, self.plateau_bad, self.lr_scale = plateau(
            t, metric, self.plateau_best, self.plateau_bad, self.lr_scale)
        return improved


def payload(trainer, ema: bool = False) -> dict[str, Any]:
    """What a checkpoint holds: weights (`ema`: the averaged ones, for best.pt), optimizer,
    EMA, config, vocabulary, the corpus' fingerprint, progress, the batch cursor, the carried
    state and every random generator. Distributed, every rank must call it: each one's
    carried state and generators are gathered under "ranks"."""
    from dataclasses import asdict

    from gru_lm.checkpoint import rng_state
    from gru_lm.distributed import gather
    from gru_lm.models import state_to

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


def nonfinite(value: float, step: int, t, last, resume_command: str) -> GruLmError:
    """The error that stops training at a NaN or infinite loss, saying what to change."""
    kept = (f"the last good checkpoint {last} was kept" if last.is_file() else
            "no checkpoint had been saved yet")
    return NonFiniteLoss(f"the training loss became {value} at step {step}; training stopped "
                         f"and {kept}. Lower train.lr (now {t.lr:g}) or set train.grad_clip "
                         f"(now {t.grad_clip}), then `{resume_command} train.lr=...`")


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


def run_summary(cfg, model, p: TrainProgress, *, device, world, batches_per_epoch: int,
                reference: dict, speed_warning: str) -> dict[str, Any]:
    """summary.json's fields known when training stops (the trainer adds the best
    checkpoint's val and test perplexity, scored as one stream)."""
    t = cfg.train
    summary: dict[str, Any] = {
        "model": cfg.model.name, "params": count_parameters(model),
        "device": str(device), "kernels": model.kernel_path(device, t.precision),
        "steps": p.step, "epochs": p.epoch + p.batch_in_epoch / max(1, batches_per_epoch),
        "tokens_seen": p.tokens_seen, "train_time_s": round(p.train_time_s, 3),
        "elapsed_s": round(p.elapsed_s, 3),
        "tokens_per_s": p.tokens_per_s,
        "stop_reason": p.stop_reason, "best_step": p.best_step, "best_weights": p.best_weights,
        "threads": torch.get_num_threads(), "processes": world.size, **reference,
        "eval_warmup": t.eval_warmup,  # best val and test: read as one stream
    }
    optional = {"init_from": None if t.init_from is None else str(t.init_from),
                "eval_max_tokens": t.eval_max_tokens, "speed_warning": speed_warning or None}
    summary.update({k: v for k, v in optional.items() if v is not None})
    return summary
