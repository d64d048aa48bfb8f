"""Trainer pieces users rely on: metrics, lr schedules, early stopping, budgets."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cli

from gru_lm.config import validate
from gru_lm.data import Corpus, Vocab
from gru_lm.metrics import bits_per_char, evaluate, perplexity, unigram_perplexity
from gru_lm.models import build_model
from gru_lm.rundir import RunDir
from gru_lm.schedule import EARLY_INTERVALS, learning_rate, plateau, slowdown
from gru_lm.trainer import Trainer


def _corpus(n=3000):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(1, 6, (n,), generator=g)
    vocab = Vocab(list("abcde"))
    return Corpus(vocab=vocab, raw_chars=n, source="", train=toks[: n - 400],
                  val=toks[n - 400: n - 200], test=toks[n - 200:])


def _config(**train):
    return validate({"model": {"name": "rnn-scratch", "num_hiddens": 8},
                     "train": {"batch_size": 4, "num_steps": 5, "sample_prefixes": ["a"],
                               "max_steps": 10, **train}})


def _trainer(tmp_path, **train):
    """The caller builds model and optimizer; no config file, no run folder until fit()."""
    cfg = _config(**train)
    torch.manual_seed(0)
    model = build_model(cfg.model, 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    return Trainer(cfg, model, optimizer, _corpus(), run=RunDir(tmp_path / "run"))


def test_perplexity_is_over_tokens_not_batches():
    # two batches: 10 tokens at nll 1 and 30 tokens at nll 2 -> exp(70 / 40), not the mean
    assert perplexity(10 * 1 + 30 * 2, 40) == pytest.approx(math.exp(70 / 40))
    assert bits_per_char(math.log(2) * 8, 8) == pytest.approx(1.0)


def test_uniform_reference_counts_the_tokens_a_model_chooses_among():
    from gru_lm.metrics import token_counts, uniform_outcomes

    text = torch.tensor([1, 2, 3, 1, 27])
    with_unk = torch.cat([text, torch.tensor([0])])
    assert uniform_outcomes(token_counts(text, 28), has_unk=True) == 27  # d2l: no <unk>
    assert uniform_outcomes(token_counts(with_unk, 28), has_unk=True) == 28
    assert uniform_outcomes(token_counts(text, 256), has_unk=False) == 256  # bytes


def test_uniform_model_scores_log_vocab():
    class Uniform(torch.nn.Module):
        def begin_state(self, batch_size, device):
            return torch.zeros(1, batch_size, 1)

        def forward(self, X, state):
            return torch.zeros(*X.shape, 4), state

    nll, n = evaluate(Uniform(), torch.arange(101) % 4, 3, 7, 10)
    assert n == 100 and perplexity(nll, n) == pytest.approx(4.0)


def test_unigram_perplexity_of_a_constant_text_is_near_one():
    train = torch.zeros(1000, dtype=torch.long)
    assert unigram_perplexity(train, train[:10], vocab_size=3) < 1.01


def test_warmup_then_cosine_to_the_floor():
    t = _config(lr=1.0, lr_schedule="cosine", warmup_steps=4, min_lr_ratio=0.1,
                max_steps=100).train
    lrs = [learning_rate(t, step, step / 100) for step in range(100)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[50] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_trainer_applies_the_scheduled_lr(tmp_path):
    tr = _trainer(tmp_path, lr=1.0, lr_schedule="cosine", warmup_steps=4, max_steps=20,
                  eval_interval=10)
    tr.fit()
    # The lr logged at step s is the one the optimizer used for the step that ended there.
    logged = [(r["step"], r["lr"]) for r in tr.run.evals()]
    assert logged == [(s, pytest.approx(learning_rate(tr.cfg.train, s - 1, (s - 1) / 20)))
                      for s in (10, 20)]


def test_plateau_halves_lr_after_patience():
    t = _config(lr=1.0, lr_schedule="plateau", plateau_patience=1, plateau_factor=0.5).train
    state = (math.inf, 0, 1.0)
    for metric in (5.0, 4.0, 4.0, 4.0):
        state = plateau(t, metric, *state)
    assert state == (4.0, 0, 0.5)
    assert learning_rate(t, 10, 0.5, lr_scale=state[2]) == pytest.approx(0.5)


def test_train_step_needs_no_run_folder(tmp_path):
    tr = _trainer(tmp_path)
    X, Y = (t[0] for t in tr.loader.epoch().stacked())
    before = [p.detach().clone() for p in tr.model.parameters()]
    loss = tr.train_step(X, Y)
    assert math.isfinite(float(loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters(),
                                                      strict=True))
    assert not (tmp_path / "run").exists()


def test_early_stopping_and_budget_reasons(tmp_path):
    tr = _trainer(tmp_path, lr=1e-9, max_steps=1000, eval_interval=5,
                  early_stopping_patience=2)
    summary = tr.fit()
    assert summary["stop_reason"].startswith("early stopping")
    assert summary["steps"] < 1000
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert len(evals) >= 3
    tr = _trainer(Path(tmp_path / "b"), max_steps=None, time_budget_s=0.5, eval_interval=50)
    summary = tr.fit()
    assert summary["stop_reason"] == "time_budget_s=0.5"
    assert summary["elapsed_s"] >= 0.5


def test_slowdown_is_judged_against_the_runs_own_first_intervals():
    early = [10_000.0, 12_000.0, 11_000.0, 12_000.0, 11_500.0]
    assert len(early) == EARLY_INTERVALS and slowdown(early) is None  # nothing to compare yet
    assert slowdown([*early, 9_000.0]) is None  # a little slower: no warning
    assert slowdown([*early, 2_400.0]) == pytest.approx(0.2)  # 2,400 / 12,000
    assert slowdown([2_000.0] * 10) is None  # slow from the start: its own normal


def test_threads_default_to_the_usable_cores(workdir):
    import os

    from gru_lm.building import usable_cores

    assert usable_cores() == len(os.sched_getaffinity(0))
    r = cli("train", "-c", "configs/tiny.yaml", "--name", "thr", "train.threads=null", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads(Path("runs/thr/summary.json").read_text())
    assert summary["threads"] == usable_cores()
    assert os.environ["OMP_WAIT_POLICY"]  # set by gru_lm unless the user had chosen


@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_the_trainer_notes_bf16_when_it_does_not_pay(tmp_path, monkeypatch, ratio):
    """The Trainer's notes carry preflight's bf16 timing note (measured: here replaced)."""
    for name in ("rnn-scratch", "rnn"):
        cfg = validate({"model": {"name": name, "num_hiddens": 8},
                        "train": {"max_steps": 1, "precision": "bf16"}})
        m = build_model(cfg.model, 6)
        monkeypatch.setattr(type(m.kernels), "bf16_speed",
                            lambda self, b: (ratio, "x 1 ms against y 1 ms"))
        trainer = Trainer(cfg, m, torch.optim.SGD(m.parameters(), lr=1), _corpus(),
                          run=RunDir(tmp_path / name))
        notes = [n for n in trainer.notes if n.startswith("train.precision=bf16")]
        assert len(notes) == (ratio < 1)
        if notes:
            assert "0.50x fp32's speed" in notes[0] and "use train.precision=fp32" in notes[0]
