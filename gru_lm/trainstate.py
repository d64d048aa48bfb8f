"""What a training run carries from step to step: its progress record, the error at a
non-finite loss, and the summary written at the end (what a checkpoint holds and how a
resume reads it back: resume.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gru_lm.errors import GruLmError, NonFiniteLoss
from gru_lm.metrics import bits_per_char, perplexity
from gru_lm.models import count_parameters
from gru_lm.schedule import plateau


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
        improved = math.isfinite(metric) and metric < self.best_metric
        if improved:
            self.best_metric, self.best_step, self.evals_since_best = metric, self.step, 0
            self.best_weights = weights
        else:
            self.evals_since_best += 1
        self.plateau_best, self.plateau_bad, self.lr_scale = plateau(
            t, metric, self.plateau_best, self.plateau_bad, self.lr_scale)
        return improved


def nonfinite(value: float, step: int, t, last, resume_command: str) -> GruLmError:
    """The error that stops training at a NaN or infinite loss, saying what to change."""
    kept = (f"the last good checkpoint {last} was kept" if last.is_file() else
            "no checkpoint had been saved yet")
    return NonFiniteLoss(f"the training loss became {value} at step {step}; training stopped "
                         f"and {kept}. Lower train.lr (now {t.lr:g}) or set train.grad_clip "
                         f"(now {t.grad_clip}), then `{resume_command} train.lr=...`")


def run_summary(cfg, model, p: TrainProgress, *, device, world, batches_per_epoch: int,
                reference: dict, speed_warning: str) -> dict[str, Any]:
    """summary.json's fields known when training stops (the trainer adds the best
    checkpoint's val and test perplexity, scored as one stream)."""
    t = cfg.train
    summary: dict[str, Any] = {
        "model": cfg.model.name, "params": count_parameters(model),
        "device": str(device), "kernels": model.kernels.path(device, t.precision),
        "output_layer": model.output_layer,
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
