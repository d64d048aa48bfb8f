"""One training loop for every model: TBPTT, evaluation, samples, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gru_lm.checkpoint import load_checkpoint, load_state, save_checkpoint
from gru_lm.config import Config, save_config
from gru_lm.data import BatchLoader, Corpus, eval_batches
from gru_lm.errors import ConfigError, GruLmError, NonFiniteLoss, TrainingInterrupted
from gru_lm.models import RecurrentLM, build_model, count_parameters, detach_state
from gru_lm.sampling import encode_prefix, generate
from gru_lm.utils import append_line, atomic_write_text

LN2 = math.log(2)


# ---------------------------------------------------------------- metrics (pure)


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp(total NLL / total tokens), never a mean of per-batch perplexities."""
    return math.exp(nll_sum / num_tokens) if num_tokens else float("nan")


def bits_per_char(nll_sum: float, num_tokens: int) -> float:
    return nll_sum / num_tokens / LN2 if num_tokens else float("nan")


def unigram_perplexity(train: torch.Tensor, target: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of `target` under add-one smoothed unigram frequencies of `train`."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[target].mean().item()) if len(target) else float("nan")


def time_major_loss(logits: torch.Tensor, Y: torch.Tensor, reduction: str = "mean",
                    ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy over every token, read in (num_steps, batch_size) order.

    The models compute time-major and hand back a transposed view, so reading it time-major
    costs no copy of the logits (only of the small target tensor).
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits.transpose(0, 1).reshape(-1, V).float(), Y.t().reshape(-1),
                           reduction=reduction, ignore_index=ignore_index)


@torch.no_grad()
def evaluate(model: RecurrentLM, tokens: torch.Tensor, batch_size: int, num_steps: int,
             device: torch.device, autocast=nullcontext) -> tuple[float, int]:
    """Total NLL (nats) and token count over a split, every token scored once."""
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    state = None
    try:
        for X, Y in eval_batches(tokens, batch_size, num_steps):
            X, Y = X.to(device), Y.to(device)
            if state is None:
                state = model.begin_state(X.shape[0], device)
            with autocast():
                logits, state = model(X, state)
            nll += time_major_loss(logits, Y, reduction="sum")
            count += int((Y != -100).sum())
    finally:
        model.train(was_training)
    return float(nll), count


# ---------------------------------------------------------------- set-up helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' is not available on this machine; "
                          "use train.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise ConfigError("train.device: 'mps' is not available on this machine; "
                          "use train.device=auto or cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    if precision != "bf16":
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                               weight_decay=t.weight_decay)
    cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(_py_state(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
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


class Trainer:
    """Trains a model on a corpus into a run directory."""

    def __init__(self, cfg: Config, corpus: Corpus, run_dir: Path, *, console=None,
                 resume: bool = False):
        self.cfg = cfg
        self.corpus = corpus
        self.vocab = corpus.vocab
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.console = console
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        self.autocast = autocast_for(self.device, t.precision)
        self.prefix_ids = self._check_prefixes()
        seed_everything(t.seed)
        self.model = build_model(cfg.model, len(self.vocab)).to(self.device)
        self.optimizer = make_optimizer(cfg, self.model)
        self.loader = BatchLoader(corpus.train, t.batch_size, t.num_steps, t.sampler,
                                  seed=t.seed, split="train")
        self.batches_per_epoch = self.loader.num_batches()
        self.p = Progress()
        self.state = None  # carried hidden state (sequential sampler)
        self._epoch_gen_state: torch.Tensor | None = None
        self._epoch_batches: tuple[torch.Tensor, torch.Tensor] | None = None
        self._interval_losses = torch.zeros(t.log_interval, dtype=torch.float64,
                                            device=self.device)
        self._interval_count = 0
        self._signal: int | None = None
        if resume:
            self._restore(load_checkpoint(self.ckpt_dir / "last.pt"))

    # -------------------------------------------------------------- checks

    def _check_prefixes(self) -> list[list[int]]:
        out = []
        for i, prefix in enumerate(self.cfg.train.sample_prefixes):
            try:
                out.append(encode_prefix(prefix, self.vocab, self.cfg.data.preset,
                                         self.cfg.data.lowercase))
            except GruLmError as e:
                raise ConfigError(f"train.sample_prefixes[{i}]: {e}") from None
        return out

    @property
    def carries_state(self) -> bool:
        return self.loader.carries_state

    # -------------------------------------------------------------- the step

    def train_step(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward, clip, optimizer step. Returns the mean loss (no sync)."""
        if self.state is None or not self.carries_state:
            state = self.model.begin_state(X.shape[0], self.device)
        else:
            state = detach_state(self.state)
        with self.autocast():
            logits, state = self.model(X, state)  # (batch_size, num_steps, vocab_size)
        loss = time_major_loss(logits, Y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip,
                                           foreach=True)
        self.optimizer.step()
        self.state = state if self.carries_state else None
        return loss.detach()

    # -------------------------------------------------------------- schedule

    def total_steps(self) -> int | None:
        t = self.cfg.train
        limits = [x for x in (t.max_steps, t.epochs and t.epochs * self.batches_per_epoch)
                  if x]
        return min(limits) if limits else None

    def fraction_done(self) -> float:
        t, total = self.cfg.train, self.total_steps()
        fracs = [self.p.step / total] if total else []
        if t.time_budget_s:
            fracs.append(self.p.elapsed_s / t.time_budget_s)
        return min(1.0, max(fracs)) if fracs else 0.0

    def lr_now(self) -> float:
        t = self.cfg.train
        lr = t.lr * self.p.lr_scale
        if t.warmup_steps and self.p.step < t.warmup_steps:
            return lr * (self.p.step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            frac = self.fraction_done()
            return lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi
                                                                                   * frac)))
        return lr

    def _plateau(self, metric: float) -> None:
        t = self.cfg.train
        if t.lr_schedule != "plateau":
            return
        if metric < self.p.plateau_best - 1e-4:
            self.p.plateau_best = metric
            self.p.plateau_bad = 0
        else:
            self.p.plateau_bad += 1
            if self.p.plateau_bad > t.plateau_patience:
                self.p.lr_scale *= t.plateau_factor
                self.p.plateau_bad = 0

    # -------------------------------------------------------------- loop

    def _should_stop(self) -> str:
        t = self.cfg.train
        if t.max_steps and self.p.step >= t.max_steps:
            return f"max_steps={t.max_steps}"
        if t.epochs and self.p.epoch >= t.epochs:
            return f"epochs={t.epochs}"
        if t.time_budget_s and self.p.elapsed_s >= t.time_budget_s:
            return f"time_budget_s={t.time_budget_s:g}"
        return ""

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._epoch_batches is None:
            self._epoch_gen_state = self.loader.generator.get_state()
            self._epoch_batches = self.loader.epoch()
        X, Y = self._epoch_batches
        i = self.p.batch_in_epoch
        return X[i].to(self.device, non_blocking=True), Y[i].to(self.device, non_blocking=True)

    def _advance_epoch_counter(self) -> None:
        self.p.batch_in_epoch += 1
        if self.p.batch_in_epoch >= len(self._epoch_batches[0]):
            self.p.epoch += 1
            self.p.batch_in_epoch = 0
            self._epoch_batches = None
            self.state = None

    def _sync_losses(self) -> None:
        """Move the per-step losses to the host; stop on the first non-finite one."""
        n = self._interval_count
        if not n:
            return
        losses = self._interval_losses[:n]
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            k = self.p.step - n + int(bad[0]) + 1
            raise NonFiniteLoss(
                f"the training loss became {float(losses[int(bad[0])])} at step {k}; training "
                f"stopped and the last good checkpoint in {self.ckpt_dir} was kept. Lower "
                "train.lr or set train.grad_clip")
        tokens = self.cfg.train.batch_size * self.cfg.train.num_steps
        # Added one by one so a resume that syncs at another step sums the same floats.
        for x in losses.tolist():
            self.p.interval_nll += x * tokens
        self.p.interval_tokens += n * tokens
        self._interval_count = 0

    def fit(self) -> dict[str, Any]:
        """Train until a stop condition; returns the summary (also written to summary.json)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._emit_header()
        old_handlers = self._install_signals()
        display = self._display()
        try:
            with display as bar:
                self._loop(bar)
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        return self._finish()

    def _loop(self, bar) -> None:
        t = self.cfg.train
        tokens_per_step = t.batch_size * t.num_steps
        start_wall = time.perf_counter() - self.p.elapsed_s
        self.model.train()
        while True:
            self.p.elapsed_s = time.perf_counter() - start_wall
            reason = self._should_stop()
            if reason:
                self.p.stop_reason = reason
                break
            if self._signal is not None:
                self._interrupt()
            lr = self.lr_now()
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            X, Y = self._next_batch()
            loss = self.train_step(X, Y)
            self._interval_losses[self._interval_count] = loss
            self._interval_count += 1
            self.p.step += 1
            self.p.tokens_seen += tokens_per_step
            self._advance_epoch_counter()
            self.p.train_time_s += time.perf_counter() - t0
            step = self.p.step
            if step % t.log_interval == 0:
                self._sync_losses()
                bar(self)
            if step % t.eval_interval == 0:
                self._sync_losses()
                if self._evaluate_and_log():
                    self.p.stop_reason = (f"early stopping: no better val ppl in "
                                          f"{t.early_stopping_patience} evals")
                    break
            elif self.cfg.run.checkpoint_interval and step % self.cfg.run.checkpoint_interval == 0:
                self._sync_losses()
                self.save("last.pt")
            if step % t.sample_interval == 0:
                self._write_samples()
        self.p.elapsed_s = time.perf_counter() - start_wall
        self._sync_losses()
        if self.p.interval_tokens:
            self._evaluate_and_log()  # saves last.pt
        elif self.p.step:
            self.save("last.pt")
        if self.p.step % self.cfg.train.sample_interval:
            self._write_samples()

    # -------------------------------------------------------------- evaluation

    def _evaluate_and_log(self) -> bool:
        """Evaluate, log, checkpoint; returns True when early stopping triggers."""
        t = self.cfg.train
        train_ppl = perplexity(self.p.interval_nll, self.p.interval_tokens)
        train_bpc = bits_per_char(self.p.interval_nll, self.p.interval_tokens)
        self.p.interval_nll, self.p.interval_tokens = 0.0, 0
        rec: dict[str, Any] = {"kind": "eval", "step": self.p.step, "epoch": self.p.epoch,
                               "tokens_seen": self.p.tokens_seen, "train_ppl": train_ppl,
                               "train_bpc": train_bpc}
        if len(self.corpus.val) > 1:
            nll, n = evaluate(self.model, self.corpus.val, t.eval_batch_size, t.num_steps,
                              self.device, self.autocast)
            rec["val_ppl"] = perplexity(nll, n)
            rec["val_bpc"] = bits_per_char(nll, n)
        metric = rec.get("val_ppl", train_ppl)
        frac = self.fraction_done()
        rec.update({
            "tokens_per_s": self.p.tokens_seen / self.p.train_time_s if self.p.train_time_s
            else 0.0,
            "lr": self.optimizer.param_groups[0]["lr"],
            "elapsed_s": round(self.p.elapsed_s, 3),
            "eta_s": round(self.p.elapsed_s * (1 - frac) / frac, 1) if frac > 0 else None,
        })
        improved = math.isfinite(metric) and metric < self.p.best_metric
        if improved:
            self.p.best_metric, self.p.best_step, self.p.evals_since_best = metric, self.p.step, 0
        else:
            self.p.evals_since_best += 1
        self._plateau(metric)
        self._log(rec)
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        patience = t.early_stopping_patience
        return bool(patience and self.p.evals_since_best >= patience)

    def _log(self, rec: dict[str, Any]) -> None:
        append_line(self.metrics_path, json.dumps(rec))
        if self.console is not None:
            parts = [f"step {rec['step']:>6}", f"epoch {rec['epoch']:>3}",
                     f"train ppl {rec['train_ppl']:7.3f}"]
            if "val_ppl" in rec:
                parts.append(f"val ppl {rec['val_ppl']:7.3f}")
            parts += [f"{rec['tokens_per_s']:,.0f} tok/s", f"lr {rec['lr']:.2e}",
                      f"{rec['elapsed_s']:.0f}s"]
            self.console.print(" | ".join(parts), highlight=False, soft_wrap=True)

    def _write_samples(self) -> None:
        lines = []
        for ids in self.prefix_ids:
            out = generate(self.model, ids, self.cfg.train.sample_length, device=self.device)[0]
            text = self.vocab.decode(ids) + self.vocab.decode(out)
            lines.append(f"step {self.p.step}: {text}")
        with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        if self.console is not None:
            for line in lines:
                self.console.print(f"[dim]{line}[/dim]", highlight=False, soft_wrap=True)

    # -------------------------------------------------------------- checkpoints

    def checkpoint_payload(self) -> dict[str, Any]:
        p = self.p
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
            "vocab": self.vocab.to_dict(),
            "step": p.step,
            "progress": asdict(p),
            "loader_epoch_state": self._epoch_gen_state if self._epoch_batches is not None
            else self.loader.generator.get_state(),
            "carry_state": self.state,
            "rng": _rng_state(),
        }

    def save(self, name: str) -> None:
        path = self.ckpt_dir / name
        try:
            save_checkpoint(self.checkpoint_payload(), path)
        except OSError as e:
            raise GruLmError(f"cannot write checkpoint {path}: {e.strerror or e}; free disk "
                             "space or fix permissions (the previous checkpoint is intact), "
                             f"then `gru-lm train --resume {self.run_dir}`") from None

    def _restore(self, ck: dict[str, Any]) -> None:
        path = self.ckpt_dir / "last.pt"
        load_state(self.model, ck["model"], path)
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
            self.p = Progress(**ck["progress"])
            self.loader.generator.set_state(ck["loader_epoch_state"])
            _set_rng_state(ck["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise GruLmError(f"checkpoint {path} cannot be resumed ({type(e).__name__}: "
                             f"{str(e)[:120]}); start a new run") from None
        self.state = ck.get("carry_state")
        if self.p.batch_in_epoch:
            self._epoch_gen_state = self.loader.generator.get_state()
            self._epoch_batches = self.loader.epoch()
        self._truncate_metrics(self.p.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop records written after the checkpoint (and any torn line) before resuming."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    # -------------------------------------------------------------- signals

    def _install_signals(self) -> dict:
        old = {}

        def handler(signum, frame):
            self._signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def _interrupt(self) -> None:
        self._sync_losses()
        self.save("last.pt")
        code = 130 if self._signal == signal.SIGINT else 143
        name = "SIGINT" if code == 130 else "SIGTERM"
        raise TrainingInterrupted(
            f"{name}: stopped at step {self.p.step}, checkpoint saved to "
            f"{self.ckpt_dir / 'last.pt'}; resume with: gru-lm train --resume {self.run_dir}",
            exit_code=code)

    # -------------------------------------------------------------- output

    def _emit_header(self) -> None:
        c, v = self.corpus, len(self.vocab)
        target = c.val if len(c.val) > 1 else c.train
        self.reference = {"uniform_ppl": float(v - 1),
                          "unigram_ppl": unigram_perplexity(c.train, target, v)}
        if self.console is not None:
            split = "val" if len(c.val) > 1 else "train"
            self.console.print(
                f"[bold]{self.cfg.model.name}[/bold] {count_parameters(self.model):,} params | "
                f"train {len(c.train):,} / val {len(c.val):,} / test {len(c.test):,} tokens | "
                f"{self.batches_per_epoch} batches/epoch | device {self.device}\n"
                f"reference on the {split} split: uniform ppl {self.reference['uniform_ppl']:.1f},"
                f" unigram ppl {self.reference['unigram_ppl']:.2f}", highlight=False,
                soft_wrap=True)

    def _display(self):
        if self.console is None or not self.console.is_terminal:
            return _NullDisplay()
        return _LiveDisplay(self.console, self.total_steps())

    def _finish(self) -> dict[str, Any]:
        t = self.cfg.train
        summary: dict[str, Any] = {
            "run": self.run_dir.name,
            "model": self.cfg.model.name,
            "params": count_parameters(self.model),
            "steps": self.p.step,
            "epochs": self.p.epoch + self.p.batch_in_epoch / max(1, self.batches_per_epoch),
            "tokens_seen": self.p.tokens_seen,
            "train_time_s": round(self.p.train_time_s, 3),
            "elapsed_s": round(self.p.elapsed_s, 3),
            "tokens_per_s": self.p.tokens_seen / self.p.train_time_s if self.p.train_time_s
            else 0.0,
            "stop_reason": self.p.stop_reason,
            "best_step": self.p.best_step,
            **self.reference,
        }
        last = _last_eval(self.metrics_path)
        if last:
            summary["final_train_ppl"] = last["train_ppl"]
            if "val_ppl" in last:
                summary["final_val_ppl"] = last["val_ppl"]
        best_path = self.ckpt_dir / "best.pt"
        if best_path.exists():
            load_state(self.model, load_checkpoint(best_path)["model"], best_path)
        for split in ("val", "test"):
            tokens = getattr(self.corpus, split)
            if len(tokens) > 1:
                nll, n = evaluate(self.model, tokens, t.eval_batch_size, t.num_steps,
                                  self.device, self.autocast)
                summary[f"best_{split}_ppl"] = perplexity(nll, n)
                summary[f"best_{split}_bpc"] = bits_per_char(nll, n)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def _last_eval(path: Path) -> dict | None:
    last = None
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "eval":
                last = rec
    return last


class _NullDisplay:
    def __enter__(self):
        return lambda trainer: None

    def __exit__(self, *exc):
        return False


class _LiveDisplay:
    """A rich progress bar showing step, loss and throughput while training."""

    def __init__(self, console, total: int | None):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold blue]train"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} steps"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.total = total

    def __enter__(self):
        self.progress.__enter__()
        task = self.progress.add_task("train", total=self.total, info="")

        def update(trainer: Trainer) -> None:
            p = trainer.p
            info = ""
            if p.interval_tokens:
                info = f"loss ppl {perplexity(p.interval_nll, p.interval_tokens):.2f}"
            if p.train_time_s:
                info += f" {p.tokens_seen / p.train_time_s:,.0f} tok/s"
            self.progress.update(task, completed=p.step, info=info)

        return update

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


# ---------------------------------------------------------------- run directories


def default_run_name(config_path: Path | None) -> str:
    stem = config_path.stem if config_path else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(cfg: Config, config_path: Path | None, name: str | None) -> Path:
    """The folder for a new run; an existing one is never reused without --resume."""
    run_name = name or cfg.run.name or default_run_name(config_path)
    if "/" in run_name or run_name in (".", ".."):
        raise ConfigError(f"run.name: {run_name!r} is not a plain folder name")
    run_dir = cfg.run.runs_dir / run_name
    if run_dir.exists():
        raise _exists(run_dir)
    return run_dir


def create_run_dir(run_dir: Path) -> None:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:  # another process took the name since new_run_dir looked
        raise _exists(run_dir) from None


def _exists(run_dir: Path) -> GruLmError:
    return GruLmError(f"run directory {run_dir} already exists; continue it with "
                      f"`gru-lm train --resume {run_dir}` or pick another --name")


def write_run_files(cfg: Config, corpus: Corpus, run_dir: Path) -> None:
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_text(run_dir / "vocab.json", json.dumps(corpus.vocab.to_dict()) + "\n")
