"""When to stop and which learning rate: pure functions of the config and the progress.

As nanoGPT's get_lr(it): nothing here reads the clock or touches an optimizer, so tests call
these directly and the trainer only applies what they return.
"""

from __future__ import annotations

import math

from gru_lm.config import TrainConfig


def total_steps(t: TrainConfig, batches_per_epoch: int) -> int | None:
    limits = [x for x in (t.max_steps, t.epochs and t.epochs * batches_per_epoch) if x]
    return min(limits) if limits else None


def fraction_done(t: TrainConfig, step: int, elapsed_s: float, total: int | None) -> float:
    """The share of the run behind us, by whichever limit is closest."""
    fracs = [step / total] if total else []
    if t.time_budget_s:
        fracs.append(elapsed_s / t.time_budget_s)
    return min(1.0, max(fracs)) if fracs else 0.0


def learning_rate(t: TrainConfig, step: int, frac: float, lr_scale: float = 1.0) -> float:
    """Linear warm-up, then constant or cosine down to min_lr_ratio; times the plateau scale."""
    lr = t.lr * lr_scale
    if t.warmup_steps and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        return lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    return lr


def plateau(t: TrainConfig, metric: float, best: float, bad: int, scale: float
            ) -> tuple[float, int, float]:
    """The plateau schedule after one evaluation: (best metric, evals without gain, scale)."""
    if t.lr_schedule != "plateau":
        return best, bad, scale
    if metric < best - 1e-4:
        return metric, 0, scale
    if bad + 1 > t.plateau_patience:
        return best, 0, scale * t.plateau_factor
    return best, bad + 1, scale


def stop_reason(t: TrainConfig, step: int, epoch: int, elapsed_s: float) -> str:
    """Which limit the run has reached, or "" to go on."""
    if t.max_steps and step >= t.max_steps:
        return f"max_steps={t.max_steps}"
    if t.epochs and epoch >= t.epochs:
        return f"epochs={t.epochs}"
    if t.time_budget_s and elapsed_s >= t.time_budget_s:
        return f"time_budget_s={t.time_budget_s:g}"
    return ""


SLOW_RATIO = 0.25  # a training this much slower than its own start is sharing the CPU
EARLY_INTERVALS = 5


def slowdown(rates: list[float]) -> float | None:
    """The latest tokens/s as a share of the best of the first intervals, when it fell below
    SLOW_RATIO of it (another process competing for the cores); None otherwise."""
    if len(rates) <= EARLY_INTERVALS:
        return None
    early = max(rates[:EARLY_INTERVALS])
    share = rates[-1] / early if early > 0 else 1.0
    return share if share < SLOW_RATIO else None


class SpeedWatch:
    """Tokens/s per log interval, and one warning when it falls far below the run's own
    first intervals (another process on these cores)."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.mark = (0, 0.0)  # tokens seen and training seconds at the last update
        self.warning = ""

    def update(self, step: int, tokens_seen: int, train_time_s: float) -> str:
        """The warning, the first time the slowdown shows; "" otherwise."""
        tokens, seconds = tokens_seen - self.mark[0], train_time_s - self.mark[1]
        self.mark = (tokens_seen, train_time_s)
        if seconds <= 0 or self.warning:
            return ""
        self.rates.append(tokens / seconds)
        share = slowdown(self.rates)
        if share is None:
            return ""
        self.warning = (f"at step {step} training runs at {self.rates[-1]:,.0f} tokens/s, "
                        f"{share:.0%} of its first steps: another process is probably using "
                        "these cores; give each training fewer train.threads or run one at a "
                        "time")
        return self.warning
