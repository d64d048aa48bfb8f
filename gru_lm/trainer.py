"""One training loop for every model: TBPTT, evaluation, samples, checkpoints, exact resume.

The caller builds the model, the optimizer and the corpus (runs.build_trainer does it from a
config), as minGPT's Trainer(config, model, dataset); the trainer only trains. When to stop
and which learning rate to use come from the pure functions of gru_lm/schedule.py.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gru_lm._ext import cpu_has_bf16
from gru_lm.cells import bf16_pin
from gru_lm.checkpoint import load_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from gru_lm.config import Config
from gru_lm.data import BatchLoader, Corpus, Epoch
from gru_lm.display import Reporter, TensorBoard, tensorboard_writer
from gru_lm.distributed import SINGLE, World, agree_max, gather, mean, wrap
from gru_lm.ema import EMA
from gru_lm.errors import GruLmError, NonFiniteLoss, TrainingInterrupted
from gru_lm.metrics import (
    bits_per_char,
    corpus_baselines,
    evaluate,
    perplexity,
    time_major_loss,
)
from gru_lm.models import RecurrentLM, ScratchLM, count_parameters, detach_state, state_to
from gru_lm.ngram import MAX_TRAIN_TOKENS
from gru_lm.rundir import BEST, LAST, RunDir
from gru_lm.sampling import encode_prefix, generate
from gru_lm.schedule import (
    fraction_done,
    learning_rate,
    plateau,
    slowdown,
    stop_reason,
    total_steps,
)
from gru_lm.utils import caught_signals

LARGE_EVAL = 2_000_000  # tokens of val or test past which the log suggests a cap


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


def autocast_for(device: torch.device, precision: str):
    if precision != "bf16":
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Trainer:
    """Trains `model` on `corpus.train` with `optimizer`; fit() writes into `run`."""

    def __init__(self, cfg: Config, model: RecurrentLM, optimizer: torch.optim.Optimizer,
                 corpus: Corpus, *, device: torch.device | str = "cpu",
                 run: RunDir | None = None, console=None, world: World = SINGLE):
        self.cfg, self.model, self.optimizer, self.corpus = cfg, model, optimizer, corpus
        self.world = world  # torchrun's processes: rank 0 alone prints and writes
        self.vocab = corpus.vocab
        self.device = torch.device(device)
        self.run = run
        self.out = Reporter(console)
        t = cfg.train
        self.autocast = autocast_for(self.device, t.precision)
        if t.tensorboard:
            tensorboard_writer()  # missing package: refused before anything is written
        self.tensorboard: TensorBoard | None = None
        self.notes: list[str] = [corpus.store_note] if corpus.store_note else []  # said
        # once, under the header
        self._check_precision()
        self.prefix_ids = self._check_prefixes()
        self.eval_splits = self._eval_splits()
        self.loader = BatchLoader(corpus.train, t.batch_size, t.num_steps, t.sampler,
                                  seed=t.seed, split="train", part=(world.rank, world.size))
        self.ddp = wrap(world, model, self.device)  # the model, or DDP around it
        self.batches_per_epoch = self.loader.num_batches()
        self.progress = TrainProgress()
        self.ema = EMA(model, t.ema_decay) if t.ema_decay else None
        self.state = None  # carried hidden state (sequential sampler)
        self._epoch_gen_state: torch.Tensor | None = None
        self._epoch_batches: Epoch | None = None
        self._interval_losses = torch.zeros(t.log_interval, dtype=torch.float64,
                                            device=self.device)
        self._interval_count = 0
        self._signals: list[int] = []  # SIGINT/SIGTERM caught while fit() runs
        self._fingerprint: str | None = None  # of the corpus' tokens, at the first save
        self._config_saved = False
        self._rates: list[float] = []  # tokens/s per log interval, for _watch_speed
        self._speed_mark = (0, 0.0)
        self.speed_warning = ""

    def _check_precision(self) -> None:
        """bf16: refuse a wrong GRU_LM_BF16_GEMM, and on a CPU without bf16 arithmetic say
        what it costs, before anything runs."""
        if self.cfg.train.precision != "bf16":
            return
        bf16_pin()
        if self.device.type != "cpu" or cpu_has_bf16():
            return
        cost = ("the bf16-rounded GEMMs run no faster than fp32 here (rounding costs a few "
                "percent); use train.precision=fp32 unless you want bf16's numbers"
                if isinstance(self.model, ScratchLM) else
                "torch.nn's bf16 matmuls are emulated and run far slower than fp32; use "
                "train.precision=fp32 here")
        self.notes.append("train.precision=bf16: this CPU has no bf16 arithmetic "
                          f"(avx512_bf16, amx_bf16): {cost}")

    def _check_prefixes(self) -> list[list[int]]:
        """The sample prefixes as ids; one that this corpus cannot encode (the default "time
        traveller" on a French text, say) becomes the corpus' first characters, with a note."""
        out = []
        for i, prefix in enumerate(self.cfg.train.sample_prefixes):
            try:
                out.append(encode_prefix(prefix, self.vocab, self.cfg.data.preset,
                                         self.cfg.data.lowercase)[0])
            except GruLmError as e:
                ids = self.corpus.train[:max(1, min(len(prefix), 20))].tolist()
                out.append(ids)
                self.notes.append(f"train.sample_prefixes[{i}] does not fit this corpus "
                                  f"({str(e).split(';')[0]}); sampling from its first "
                                  f"characters {self.vocab.decode(ids)!r} instead")
        return out

    def _eval_splits(self) -> dict[str, torch.Tensor]:
        """val and test as evaluated: their first train.eval_max_tokens tokens. Notes what is
        capped: those splits, and the training tokens the n-gram reference counts."""
        cap = self.cfg.train.eval_max_tokens
        out = {s: getattr(self.corpus, s) for s in ("val", "test")}
        cut = [s for s, v in out.items() if cap is not None and len(v) > cap]
        if cut:
            sizes = " and ".join(f"{s} ({len(out[s]):,})" for s in cut)
            self.notes.append(f"train.eval_max_tokens={cap:,}: evaluation scores the first "
                              f"{cap:,} tokens of {sizes}; perplexities are of that part")
        big = [s for s, v in out.items() if cap is None and len(v) > LARGE_EVAL]
        if big:
            self.notes.append(f"{' and '.join(f'{s} has {len(out[s]):,}' for s in big)} "
                              "tokens; every evaluation scores all of them; "
                              "train.eval_max_tokens=N scores the first N")
        if len(self.corpus.train) > MAX_TRAIN_TOKENS:
            self.notes.append(f"the n-gram reference counts the first {MAX_TRAIN_TOKENS:,} of "
                              f"the {len(self.corpus.train):,} training tokens (about 10 "
                              "bytes of memory a token); the model trains on all of them")
        return {s: v[:cap] if cap is not None else v for s, v in out.items()}

    # -------------------------------------------------------------- the step

    def train_step(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward, clip, optimizer step. Returns the mean loss (no sync)."""
        carries = self.loader.carries_state
        if self.state is None or not carries:
            state = self.model.begin_state(X.shape[0], self.device)
        else:
            state = detach_state(self.state)
        with self.autocast():
            logits, state = self.ddp(X, state)  # (batch_size, num_steps, vocab_size)
        loss = time_major_loss(logits, Y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip,
                                           foreach=True)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.state = state if carries else None
        return loss.detach()

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step, over every process."""
        return self.cfg.train.batch_size * self.cfg.train.num_steps * self.world.size

    def fraction_done(self) -> float:
        p = self.progress
        return fraction_done(self.cfg.train, p.step, p.elapsed_s,
                             total_steps(self.cfg.train, self.batches_per_epoch))

    def lr_now(self) -> float:
        p = self.progress
        return learning_rate(self.cfg.train, p.step, self.fraction_done(), p.lr_scale)

    # -------------------------------------------------------------- batches

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._epoch_batches is None:
            self._epoch_gen_state = self.loader.generator.get_state()
            self._epoch_batches = self.loader.epoch()
        X, Y = self._epoch_batches.batch(self.progress.batch_in_epoch)
        return X.to(self.device, non_blocking=True), Y.to(self.device, non_blocking=True)

    def _advance_epoch_counter(self) -> None:
        p = self.progress
        p.batch_in_epoch += 1
        if p.batch_in_epoch >= len(self._epoch_batches):
            p.epoch += 1
            p.batch_in_epoch = 0
            self._epoch_batches = None
            self.state = None

    def _sync_losses(self) -> None:
        """Move the per-step losses to the host; stop on the first non-finite one."""
        n, p = self._interval_count, self.progress
        if not n:
            return
        losses = mean(self.world, self._interval_losses[:n])  # (averaged in place: reused)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            k = p.step - n + int(bad[0]) + 1
            t = self.cfg.train
            last = self.run.checkpoint(LAST)
            kept = (f"the last good checkpoint {last} was kept" if last.is_file() else
                    "no checkpoint had been saved yet")
            raise NonFiniteLoss(
                f"the training loss became {float(losses[int(bad[0])])} at step {k}; training "
                f"stopped and {kept}. Lower train.lr (now {t.lr:g}) or set train.grad_clip "
                f"(now {t.grad_clip}), then "
                f"`{self.run.resume_command(self.world.size)} train.lr=...`")
        tokens = self.tokens_per_step
        # Added one by one so a resume that syncs at another step sums the same floats.
        for x in losses.tolist():
            p.interval_nll += x * tokens
        p.interval_tokens += n * tokens
        self._interval_count = 0

    # -------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Train until a stop condition; returns the summary (also written to summary.json)."""
        if self.run is None:
            raise ValueError("Trainer.fit needs a run directory (Trainer(..., run=RunDir(...)))")
        main = self.world.is_main
        if main:
            self.run.checkpoints.mkdir(parents=True, exist_ok=True)
        self.reference = corpus_baselines(self.corpus, self.cfg.train.ngram_order,
                                          self.eval_splits["val"]) if main else {}
        if main:
            self.out.header(
                corpus=self.corpus, model=self.cfg.model.name,
                params=count_parameters(self.model), batches_per_epoch=self.batches_per_epoch,
                device=str(self.device),
                kernels=self.model.kernel_path(self.device, self.cfg.train.precision),
                reference=self.reference,
                reference_split="val" if len(self.corpus.val) > 1 else "train")
        for note in self.notes:
            self.out.warning(note)
        total = total_steps(self.cfg.train, self.batches_per_epoch)
        if self.cfg.train.tensorboard and main:
            self.tensorboard = TensorBoard(self.run.path / "tensorboard",
                                           purge_step=self.progress.step or None)
        try:
            with caught_signals() as self._signals, self.out.live(self.cfg.train, total) as bar:
                self._loop(bar)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
        return self._finish()

    def _loop(self, bar) -> None:
        t, p = self.cfg.train, self.progress
        tokens_per_step = self.tokens_per_step
        start_wall = time.perf_counter() - p.elapsed_s
        self.model.train()
        while True:
            p.elapsed_s = time.perf_counter() - start_wall
            if self.world.active:  # every rank stops at the same step, for the same reason
                agreed = agree_max(self.world, [p.elapsed_s, max(self._signals, default=0)])
                p.elapsed_s = float(agreed[0])
                if agreed[1] and not self._signals:
                    self._signals.append(int(agreed[1]))
            p.stop_reason = stop_reason(t, p.step, p.epoch, p.elapsed_s)
            if p.stop_reason:
                break
            if self._signals:
                self._interrupt()
            lr = self.lr_now()
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            X, Y = self._next_batch()
            self._interval_losses[self._interval_count] = self.train_step(X, Y)
            self._interval_count += 1
            p.step += 1
            p.tokens_seen += tokens_per_step
            self._advance_epoch_counter()
            p.train_time_s += time.perf_counter() - t0
            if p.step % t.log_interval == 0:
                self._sync_losses()
                self._watch_speed()
                bar(p)
            if p.step % t.eval_interval == 0:
                self._sync_losses()
                if self._evaluate_and_log():
                    p.stop_reason = (f"early stopping: no better val ppl in "
                                     f"{t.early_stopping_patience} evals")
                    break
            elif self.cfg.run.checkpoint_interval and \
                    p.step % self.cfg.run.checkpoint_interval == 0:
                self._sync_losses()
                self.save(LAST)
            if p.step % t.sample_interval == 0 and self.world.is_main:
                self._write_samples()
        p.elapsed_s = time.perf_counter() - start_wall
        self._sync_losses()
        if p.interval_tokens:
            self._evaluate_and_log()  # saves last.pt
        elif p.step:
            self.save(LAST)
        if p.step % t.sample_interval and self.world.is_main:
            self._write_samples()

    def _watch_speed(self) -> None:
        """Warn once when tokens/s falls far below this run's own first intervals."""
        p = self.progress
        tokens, seconds = p.tokens_seen - self._speed_mark[0], p.train_time_s - self._speed_mark[1]
        self._speed_mark = (p.tokens_seen, p.train_time_s)
        if seconds <= 0 or self.speed_warning:
            return
        self._rates.append(tokens / seconds)
        share = slowdown(self._rates)
        if share is not None:
            self.speed_warning = (
                f"at step {p.step} training runs at {self._rates[-1]:,.0f} tokens/s, "
                f"{share:.0%} of its first steps: another process is probably using these "
                "cores; give each training fewer train.threads or run one at a time")
            self.out.warning(self.speed_warning)

    # -------------------------------------------------------------- evaluation

    def _evaluate_and_log(self) -> bool:
        """Evaluate, log, checkpoint; returns True when early stopping triggers."""
        t, p = self.cfg.train, self.progress
        rec: dict[str, Any] = {"kind": "eval", "step": p.step, "epoch": p.epoch,
                               "tokens_seen": p.tokens_seen,
                               "train_ppl": perplexity(p.interval_nll, p.interval_tokens),
                               "train_bpc": bits_per_char(p.interval_nll, p.interval_tokens)}
        p.interval_nll, p.interval_tokens = 0.0, 0
        weights = "raw"
        if len(self.corpus.val) > 1:
            rec["val_ppl"], rec["val_bpc"] = self._val()
            if self.ema is not None:
                with self.ema.swapped_in(self.model):
                    rec["ema_val_ppl"], rec["ema_val_bpc"] = self._val()
                weights = "ema" if rec["ema_val_ppl"] < rec["val_ppl"] else "raw"
        metric = rec.get("ema_val_ppl" if weights == "ema" else "val_ppl", rec["train_ppl"])
        frac = self.fraction_done()
        rec.update({
            "tokens_per_s": p.tokens_seen / p.train_time_s if p.train_time_s else 0.0,
            "lr": self.optimizer.param_groups[0]["lr"],
            "elapsed_s": round(p.elapsed_s, 3),
            "eta_s": round(p.elapsed_s * (1 - frac) / frac, 1) if frac > 0 else None,
        })
        improved = math.isfinite(metric) and metric < p.best_metric
        if improved:
            p.best_metric, p.best_step, p.evals_since_best = metric, p.step, 0
            p.best_weights = weights
        else:
            p.evals_since_best += 1
        p.plateau_best, p.plateau_bad, p.lr_scale = plateau(
            t, metric, p.plateau_best, p.plateau_bad, p.lr_scale)
        if self.world.is_main:
            self.run.append_record(rec)
        if self.tensorboard is not None:
            self.tensorboard.scalars(rec)
        self.out.eval_line(rec)
        self.save(LAST)
        if improved:
            self.save(BEST, ema=weights == "ema")
        patience = t.early_stopping_patience
        return bool(patience and p.evals_since_best >= patience)

    def _val(self) -> tuple[float, float]:
        t = self.cfg.train
        nll, n = evaluate(self.model, self.eval_splits["val"], *t.reading, device=self.device,
                          autocast=self.autocast)
        return perplexity(nll, n), bits_per_char(nll, n)

    def _write_samples(self) -> None:
        lines = []
        t = self.cfg.train
        for ids in self.prefix_ids:  # (their own generator: training's random draws stay)
            out = generate(self.model, ids, t.sample_length, temperature=t.sample_temperature,
                           seed=t.seed if t.sample_temperature else None, device=self.device)[0]
            lines.append(f"step {self.progress.step}: {self.vocab.decode(ids + out)}")
        self.run.append_samples(lines)
        self.out.samples(lines)

    # -------------------------------------------------------------- checkpoints

    def checkpoint_payload(self, ema: bool = False) -> dict[str, Any]:
        """Everything a resume needs; `ema`: "model" holds the averaged weights (best.pt).
        Distributed, every rank must call it: each one's carried state and random streams
        are gathered under "ranks"."""
        ranks = None
        if self.world.active:
            carried = state_to(self.state, "cpu") if self.state is not None else None
            ranks = gather(self.world, {"carry_state": carried, "rng": rng_state()})
        payload = {
            "model": self.ema.averaged_state(self.model) if ema else self.model.state_dict(),
            "weights": "ema" if ema else "raw",
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
            "vocab": self.vocab.to_dict(),
            "data_fingerprint": self._data_fingerprint(),
            "step": self.progress.step,
            "progress": asdict(self.progress),
            "loader_epoch_state": self._epoch_gen_state if self._epoch_batches is not None
            else self.loader.generator.get_state(),
            "carry_state": self.state,
            "rng": rng_state(),
        }
        if ranks is not None:
            payload.update(world_size=self.world.size, ranks=ranks)
        return payload

    def _data_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.corpus.fingerprint()
        return self._fingerprint

    def save(self, name: str, ema: bool = False) -> None:
        path = self.run.checkpoint(name)
        payload = self.checkpoint_payload(ema)  # (collective when distributed)
        if not self.world.is_main:
            return
        try:
            save_checkpoint(payload, path)
            if not self._config_saved:  # config.yaml describes the checkpoints beside it,
                self.run.write_config(self.cfg)  # written once one is saved with it
                self._config_saved = True
        except OSError as e:
            raise GruLmError(f"cannot write checkpoint {path}: {e.strerror or e}; free disk "
                             "space or fix permissions (the previous checkpoint is intact), "
                             f"then `{self.run.resume_command(self.world.size)}`") from None

    def restore(self, ck: dict[str, Any], path) -> None:
        """Continue from checkpoint `ck` (read from `path`) exactly where it stopped."""
        load_state(self.model, ck["model"], path)
        trained_by = ck.get("world_size", 1)
        if trained_by != self.world.size:
            raise GruLmError(
                f"checkpoint {path} was trained by {trained_by} process(es) and this resume "
                f"runs {self.world.size}: each process has its own batches, hidden state and "
                f"random streams; resume with {trained_by} (torchrun --nproc_per_node "
                f"{trained_by}, or gru-lm train --nproc {trained_by})")
        mine = ck["ranks"][self.world.rank] if self.world.active else ck
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
            for group in self.optimizer.param_groups:  # settings a resume may change
                group["weight_decay"] = self.cfg.train.weight_decay
                if "momentum" in group:
                    group["momentum"] = self.cfg.train.momentum
            self.progress = progress_from(ck["progress"], path)
            self.loader.generator.set_state(ck["loader_epoch_state"])
            set_rng_state(mine["rng"])
            if self.ema is not None and ck.get("ema") is not None:
                self.ema.load_state_dict(ck["ema"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise GruLmError(f"checkpoint {path} cannot be resumed ({type(e).__name__}: "
                             f"{str(e)[:120]}); start a new run") from None
        self._check_shapes(mine.get("carry_state"), path)
        carried = mine.get("carry_state")
        # Checkpoints load on the CPU; the carried state belongs on the training device.
        self.state = state_to(carried, self.device) if carried is not None else None
        if self.progress.batch_in_epoch:
            self._epoch_gen_state = self.loader.generator.get_state()
            self._epoch_batches = self.loader.epoch()
        if self.run is not None and self.world.is_main:
            self.run.truncate_records(self.progress.step)
            self.run.truncate_samples(self.progress.step)

    def _check_shapes(self, carried, path) -> None:
        """Optimizer moments, averaged weights and the carried state must fit the model."""
        def bad(field: str, what: str) -> GruLmError:
            return GruLmError(f"checkpoint {path} field '{field}': {what} does not fit the "
                              "model; the file was edited or damaged, start a new run")

        params = list(self.model.parameters())
        for i, p in enumerate(params):
            for key, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() and (
                        v.shape != p.shape or not bool(torch.isfinite(v).all())):
                    raise bad("optimizer", f"state '{key}' of parameter {i} (shape "
                              f"{tuple(v.shape)})")
        if self.ema is not None:
            for i, (a, p) in enumerate(zip(self.ema.shadow, params, strict=True)):
                if a.shape != p.shape or not bool(torch.isfinite(a).all()):
                    raise bad("ema", f"averaged weight {i} (shape {tuple(a.shape)})")
        if carried is not None:
            want = self.model.begin_state(self.cfg.train.batch_size)
            want = want if isinstance(want, tuple) else (want,)
            got = tuple(carried) if isinstance(carried, tuple | list) else (carried,)
            if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in want]:
                raise bad("carry_state", f"a state of shape {[tuple(t.shape) for t in got]}")

    def _interrupt(self) -> None:
        """Ctrl-C or SIGTERM arrived: save at this step boundary and say how to resume."""
        self._sync_losses()
        self.save(LAST)
        code = 130 if self._signals[0] == signal.SIGINT else 143
        name = "SIGINT" if code == 130 else "SIGTERM"
        raise TrainingInterrupted(
            f"{name}: stopped at step {self.progress.step}, checkpoint saved to "
            f"{self.run.checkpoint(LAST)}; resume with: {self.run.resume_command(self.world.size)}",
            exit_code=code)

    # -------------------------------------------------------------- the end

    def _finish(self) -> dict[str, Any]:
        t, p = self.cfg.train, self.progress
        if not self.world.is_main:  # rank 0 writes the summary
            return {"run": self.run.name, "steps": p.step, "stop_reason": p.stop_reason,
                    "tokens_per_s": p.tokens_seen / p.train_time_s if p.train_time_s else 0.0}
        summary: dict[str, Any] = {
            "run": self.run.name,
            "model": self.cfg.model.name,
            "params": count_parameters(self.model),
            "device": str(self.device),
            "kernels": self.model.kernel_path(self.device, self.cfg.train.precision),
            "steps": p.step,
            "epochs": p.epoch + p.batch_in_epoch / max(1, self.batches_per_epoch),
            "tokens_seen": p.tokens_seen,
            "train_time_s": round(p.train_time_s, 3),
            "elapsed_s": round(p.elapsed_s, 3),
            "tokens_per_s": p.tokens_seen / p.train_time_s if p.train_time_s else 0.0,
            "stop_reason": p.stop_reason,
            "best_step": p.best_step,
            "best_weights": p.best_weights,
            "threads": torch.get_num_threads(),
            "processes": self.world.size,
            **self.reference,
        }
        summary["eval_warmup"] = t.eval_warmup  # best val and test: read as one stream
        if t.init_from is not None:
            summary["init_from"] = str(t.init_from)
        if t.eval_max_tokens is not None:
            summary["eval_max_tokens"] = t.eval_max_tokens
        if self.speed_warning:
            summary["speed_warning"] = self.speed_warning
        evals = self.run.evals()
        for key in ("train_ppl", "val_ppl"):
            if evals and key in evals[-1]:
                summary[f"final_{key}"] = evals[-1][key]
        best_path = self.run.checkpoint(BEST)
        if best_path.exists():
            load_state(self.model, load_checkpoint(best_path)["model"], best_path)
        for split, tokens in self.eval_splits.items():
            if len(tokens) > 1:
                nll, n = evaluate(self.model, tokens, *t.reading, device=self.device,
                                  autocast=self.autocast)
                summary[f"best_{split}_ppl"] = perplexity(nll, n)
                summary[f"best_{split}_bpc"] = bits_per_char(nll, n)
        self.run.write_summary(summary)
        return summary
