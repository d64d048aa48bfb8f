"""One training loop for every model: TBPTT, evaluation, samples, checkpoints, exact resume.

The caller builds the model, the optimizer and the corpus (building.build_trainer does it from a
config), as minGPT's Trainer(config, model, dataset); the trainer only trains. When to stop
and which learning rate to use come from the pure functions of gru_lm/schedule.py.
"""

from __future__ import annotations

import functools
import signal
import time
from contextlib import nullcontext
from typing import Any

import torch

from gru_lm import preflight
from gru_lm.checkpoint import load_checkpoint, load_state, save_checkpoint
from gru_lm.config import Config
from gru_lm.data import BatchLoader, Corpus, Cursor
from gru_lm.decoding import Decoding
from gru_lm.display import Reporter, TensorBoard, tensorboard_writer
from gru_lm.distributed import (
    SINGLE,
    World,
    agree_on_stop,
    at_step,
    mean,
    set_timeout,
    waiting,
    wrap,
)
from gru_lm.ema import EMA
from gru_lm.errors import GruLmError, TrainingInterrupted
from gru_lm.metrics import bits_per_char, evaluate, perplexity
from gru_lm.models import RecurrentLM, detach_state
from gru_lm.resume import payload, restore
from gru_lm.rundir import BEST, LAST, RunDir
from gru_lm.sampling import generate
from gru_lm.schedule import (
    SpeedWatch,
    fraction_done,
    learning_rate,
    stop_reason,
    total_steps,
)
from gru_lm.trainstate import TrainProgress, nonfinite, run_summary
from gru_lm.utils import caught_signals


def autocast_for(device: torch.device, precision: str):
    if precision != "bf16":
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Trainer:
    """Trains `model` on `corpus.train` with `optimizer`; fit() writes into `run`. `plan`:
    what was checked before (preflight.plan, made here when not given)."""

    def __init__(self, cfg: Config, model: RecurrentLM, optimizer: torch.optim.Optimizer,
                 corpus: Corpus, *, device: torch.device | str = "cpu",
                 run: RunDir | None = None, reporter: Reporter | None = None,
                 world: World = SINGLE, plan: preflight.Plan | None = None,
                 signals: list[int] | None = None):
        self.cfg, self.model, self.optimizer, self.corpus = cfg, model, optimizer, corpus
        self.world, self.run, self.vocab = world, run, corpus.vocab  # rank 0 prints, writes
        self.device = torch.device(device)
        self.out = reporter if reporter is not None else Reporter(None)
        t = cfg.train
        self.autocast = autocast_for(self.device, t.precision)
        if t.tensorboard:
            tensorboard_writer()  # missing package: refused before anything is written
        self.tensorboard: TensorBoard | None = None
        plan = plan or preflight.plan(cfg, model, corpus, self.device)
        self.notes, self.prefix_ids, self.eval_splits = plan.notes, plan.prefix_ids, \
            plan.eval_splits  # notes: said once, under the header
        self.loader = BatchLoader(corpus.train, t.batch_size, t.num_steps, t.sampler,
                                  seed=t.seed, split="train", part=(world.rank, world.size))
        self.ddp = wrap(world, model, self.device)  # the model, or DDP around it
        set_timeout(world, t.collective_timeout_s)  # (a frozen peer ends the run after it)
        self.batches_per_epoch = self.loader.num_batches()
        self.progress = TrainProgress()
        self.ema = EMA(model, t.ema_decay) if t.ema_decay else None
        self.state = None  # carried hidden state (sequential sampler)
        self.cursor = Cursor(self.loader)
        self._interval_losses = torch.zeros(t.log_interval, dtype=torch.float64,
                                            device=self.device)
        self._interval_count, self._config_saved, self.speed = 0, False, SpeedWatch()
        self._signals = signals if signals is not None else []  # SIGINT/SIGTERM (runner's)

    # -------------------------------------------------------------- the step

    def train_step(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward, clip, optimizer step. Returns the mean loss (no sync)."""
        carries = self.loader.carries_state
        state = (self.model.begin_state(X.shape[0], self.device)
                 if self.state is None or not carries else detach_state(self.state))
        with self.autocast():
            loss, state = self.ddp(X, state, targets=Y)  # the mean log-loss of Y
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
        X, Y = self.cursor.batch(self.progress.batch_in_epoch)
        return X.to(self.device, non_blocking=True), Y.to(self.device, non_blocking=True)

    def _advance_epoch_counter(self) -> None:
        p = self.progress
        p.batch_in_epoch += 1
        if self.cursor.epoch_ends(p.batch_in_epoch):
            p.epoch, p.batch_in_epoch, self.state = p.epoch + 1, 0, None

    def _sync_losses(self) -> None:
        """Move the per-step losses to the host; stop on the first non-finite one."""
        n, p = self._interval_count, self.progress
        if not n:
            return
        losses = mean(self.world, self._interval_losses[:n])  # (averaged in place: reused)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise nonfinite(float(losses[int(bad[0])]), p.step - n + int(bad[0]) + 1,
                            self.cfg.train, self.folder.checkpoint(LAST),
                            self.folder.resume_command(self.world.size))
        tokens = self.tokens_per_step
        # Added one by one so a resume that syncs at another step sums the same floats.
        for x in losses.tolist():
            p.interval_nll += x * tokens
        p.interval_tokens += n * tokens
        self._interval_count = 0

    @property
    def folder(self) -> RunDir:
        """The run's folder: training, saving and the records need one."""
        if self.run is None:
            raise ValueError("Trainer.fit needs a run directory (Trainer(..., run=RunDir(...)))")
        return self.run

    # -------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Train until a stop condition; returns the summary (also written to summary.json)."""
        _ = self.folder  # (refused before anything starts when there is none)
        main = self.world.is_main
        if main:
            self.folder.checkpoints.mkdir(parents=True, exist_ok=True)
        self.reference = preflight.announce(self, main)  # the header and the notes
        total = total_steps(self.cfg.train, self.batches_per_epoch)
        if self.cfg.train.tensorboard and main:
            self.tensorboard = TensorBoard(self.folder.path / "tensorboard",
                                           purge_step=self.progress.step or None)
        try:
            with caught_signals(into=self._signals), self.out.live(self.cfg.train, total) as bar:
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
            at_step(p.step + 1)  # (what a wait for a peer is said to be in)
            # every rank stops at the same step, for the same reason
            p.elapsed_s, signum = agree_on_stop(self.world, time.perf_counter() - start_wall,
                                                self._signals)
            p.stop_reason = stop_reason(t, p.step, p.epoch, p.elapsed_s)
            if p.stop_reason:
                break
            if signum:  # (the agreed signal: every rank stops here, before any collective)
                self._interrupt(signum)
            lr = self.lr_now()
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            X, Y = self._next_batch()
            with waiting("the gradient all-reduce"):  # (DDP's, in backward)
                self._interval_losses[self._interval_count] = self.train_step(X, Y)
            self._interval_count += 1
            p.step += 1
            p.tokens_seen += tokens_per_step
            self._advance_epoch_counter()
            p.train_time_s += time.perf_counter() - t0
            if p.step % t.log_interval == 0:
                self._sync_losses()
                warning = self.speed.update(p.step, p.tokens_seen, p.train_time_s)
                if warning:
                    self.out.warning(warning)
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

    # -------------------------------------------------------------- evaluation

    def _evaluate_and_log(self) -> bool:
        """Evaluate, log, checkpoint; returns True when early stopping triggers."""
        t, p = self.cfg.train, self.progress
        rec = p.eval_record(self.fraction_done(), self.optimizer.param_groups[0]["lr"])
        weights = "raw"
        if len(self.corpus.val) > 1:
            rec["val_ppl"], rec["val_bpc"] = self._val()
            if self.ema is not None:
                with self.ema.swapped_in(self.model):
                    rec["ema_val_ppl"], rec["ema_val_bpc"] = self._val()
                weights = "ema" if rec["ema_val_ppl"] < rec["val_ppl"] else "raw"
        metric = rec.get("ema_val_ppl" if weights == "ema" else "val_ppl", rec["train_ppl"])
        improved = p.note_eval(metric, weights, t)
        if self.world.is_main:
            self.folder.append_record(rec)
        if self.tensorboard is not None:
            self.tensorboard.scalars(rec)
        self.out.eval_line(rec)
        self.save(LAST)
        if improved:
            self.save(BEST, ema=weights == "ema")
        patience = t.early_stopping_patience
        return bool(patience and p.evals_since_best >= patience)

    def _val(self) -> tuple[float, float]:
        nll, n = evaluate(self.model, self.eval_splits["val"], *self.cfg.train.reading,
                          device=self.device, autocast=self.autocast)
        return perplexity(nll, n), bits_per_char(nll, n)

    @functools.cached_property
    def sample_decoding(self) -> Decoding:
        """How the samples written while training are drawn: train.sample_length characters
        at train.sample_temperature (null: greedy), seeded by train.seed."""
        t = self.cfg.train
        return Decoding(t.sample_length, t.sample_temperature,
                        seed=t.seed if t.sample_temperature is not None else None)

    def _write_samples(self) -> None:
        lines = []
        for ids in self.prefix_ids:  # (their own generator: training's random draws stay)
            out = generate(self.model, ids, self.sample_decoding, device=self.device)[0]
            lines.append(f"step {self.progress.step}: {self.vocab.decode(ids + out)}")
        self.folder.append_samples(lines)
        self.out.samples(lines)

    # -------------------------------------------------------------- checkpoints

    def checkpoint_payload(self, ema: bool = False) -> dict[str, Any]:
        """Everything a resume needs (resume.payload); `ema`: the averaged weights as
        "model" (best.pt). Distributed, every rank must call it."""
        return payload(self, ema)

    @functools.cached_property
    def data_fingerprint(self) -> str:  # of the corpus' tokens, computed at the first save
        return self.corpus.fingerprint()

    def save(self, name: str, ema: bool = False) -> None:
        path = self.folder.checkpoint(name)
        payload = self.checkpoint_payload(ema)  # (collective when distributed)
        if not self.world.is_main:
            return
        try:
            save_checkpoint(payload, path)
            if not self._config_saved:  # config.yaml describes the checkpoints beside it,
                self.folder.write_config(self.cfg)  # written once one is saved with it
                self._config_saved = True
        except OSError as e:
            raise GruLmError(f"cannot write checkpoint {path}: {e.strerror or e}; free disk "
                             "space or fix permissions (the previous checkpoint is intact), "
                             f"then `{self.folder.resume_command(self.world.size)}`") from None

    def restore(self, ck: dict[str, Any], path) -> None:
        """Continue from checkpoint `ck` (read from `path`) exactly where it stopped
        (resume.restore)."""
        restore(self, ck, path)

    def _interrupt(self, signum: int) -> None:
        """Ctrl-C or SIGTERM reached a rank: save at this step boundary, say how to resume."""
        self._sync_losses()
        self.save(LAST)
        code = 130 if signum == signal.SIGINT else 143
        name = "SIGINT" if code == 130 else "SIGTERM"
        run = self.folder
        raise TrainingInterrupted(
            f"{name}: stopped at step {self.progress.step}, checkpoint saved to "
            f"{run.checkpoint(LAST)}; resume with: {run.resume_command(self.world.size)}",
            exit_code=code)

    # -------------------------------------------------------------- the end

    def _finish(self) -> dict[str, Any]:
        t, p = self.cfg.train, self.progress
        if not self.world.is_main:  # rank 0 writes the summary
            return {"run": self.folder.name, "path": str(self.folder.path), "steps": p.step,
                    "stop_reason": p.stop_reason,
                    "tokens_per_s": p.tokens_per_s}
        summary = {"run": self.folder.name, **run_summary(
            self.cfg, self.model, p, device=self.device, world=self.world,
            batches_per_epoch=self.batches_per_epoch, reference=self.reference,
            speed_warning=self.speed.warning)}
        evals = self.folder.evals()[-1:]
        summary.update({f"final_{k}": e[k] for e in evals for k in ("train_ppl", "val_ppl")
                        if k in e})
        best_path = self.folder.checkpoint(BEST)
        if best_path.exists():
            load_state(self.model, load_checkpoint(best_path)["model"], best_path)
        for split, tokens in self.eval_splits.items():
            if len(tokens) > 1:
                nll, n = evaluate(self.model, tokens, *t.reading, device=self.device,
                                  autocast=self.autocast)
                summary[f"best_{split}_ppl"] = perplexity(nll, n)
                summary[f"best_{split}_bpc"] = bits_per_char(nll, n)
        self.folder.write_summary(summary)
        return {**summary, "path": str(self.folder.path)}
