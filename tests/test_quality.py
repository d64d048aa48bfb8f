"""Held-out quality: regularizers, weight averaging, dynamic evaluation, the n-gram baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cli
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gru_lm.config import ModelConfig
from gru_lm.dynamic import DynamicSettings, dynamic_nll, gradient_ms
from gru_lm.ema import EMA
from gru_lm.metrics import evaluate, mixture_log_probs, mixture_weight, token_log_probs
from gru_lm.models import build_model, list_models
from gru_lm.ngram import KneserNey
from gru_lm.recurrent import drop_weight, embedding_dropout, keep_mask, sequence_dropout

V = 11


# ---------------------------------------------------------------- regularizers


def test_locked_dropout_uses_one_mask_for_every_step():
    torch.manual_seed(0)
    x = torch.ones(20, 4, 16)  # (num_steps, batch_size, features)
    y = sequence_dropout(x, 0.5, training=True, locked=True)
    assert torch.equal(y, y[:1].expand_as(y))  # the same mask at every step
    assert set(y.unique().tolist()) == {0.0, 2.0}
    per_step = sequence_dropout(x, 0.5, training=True, locked=False)
    assert not torch.equal(per_step, per_step[:1].expand_as(per_step))
    assert torch.equal(sequence_dropout(x, 0.5, training=False, locked=True), x)


@pytest.mark.parametrize("keep", [0.5, 0.6, 0.9, 0.01])
@pytest.mark.parametrize("shape", [(1001, 999), (7,), (3, 1, 5)])
def test_keep_mask_keeps_the_asked_fraction_scaled_to_mean_one(keep, shape):
    torch.manual_seed(0)
    like = torch.empty(0)
    mask = keep_mask(shape, keep, like)
    assert mask.shape == shape and mask.dtype == like.dtype
    assert all(v == 0 or v == pytest.approx(1 / keep) for v in mask.unique().tolist())
    torch.manual_seed(0)
    assert torch.equal(keep_mask(shape, keep, like), mask)  # seeded by torch's generator
    if mask.numel() > 10**5:  # the kept share within 5 standard deviations
        n = mask.numel()
        share = (mask > 0).double().mean().item()
        assert abs(share - keep) < 5 * (keep * (1 - keep) / n) ** 0.5
        assert abs(mask.double().mean().item() - 1) < 5 * ((1 - keep) / keep / n) ** 0.5


def test_drop_weight_passes_gradients_through_the_kept_entries_only():
    torch.manual_seed(0)
    W = torch.randn(64, 48, requires_grad=True)
    dropped = drop_weight(W, 0.4, training=True)
    dropped.sum().backward()
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], W.detach()[kept] / 0.6)
    torch.testing.assert_close(W.grad, kept.float() / 0.6)
    assert 0.5 < kept.float().mean().item() < 0.7
    assert drop_weight(W, 0.4, training=False) is W


def _pair(name: str, **options):
    """The same weights with and without the regularizer."""
    torch.manual_seed(0)
    init = "auto" if name == "mogrifier" else "xavier"  # (the mogrifier refuses any other)
    plain = build_model(ModelConfig(name=name, num_hiddens=8, num_layers=2, init=init), V)
    reg = build_model(ModelConfig(name=name, num_hiddens=8, num_layers=2, init=init,
                                  **options), V)
    reg.load_state_dict(plain.state_dict())
    return plain, reg


@pytest.mark.parametrize("name", list_models())
def test_weight_drop_is_off_in_eval_and_never_changes_stored_weights(name):
    plain, reg = _pair(name, weight_drop=0.5)
    X = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in reg.state_dict().items()}
    reg.train()
    out, _ = reg(X)
    out.sum().backward()
    assert all(torch.equal(before[k], v) for k, v in reg.state_dict().items())
    assert all(p.grad is not None for p in reg.parameters())
    plain.train()
    assert not torch.allclose(out, plain(X)[0])  # it dropped something while training
    plain.eval(), reg.eval()
    torch.testing.assert_close(reg(X)[0], plain(X)[0])  # and nothing in eval


def test_embedding_dropout_drops_whole_characters():
    torch.manual_seed(0)
    E = torch.randn(V, 6)
    dropped = embedding_dropout(E, 0.5, training=True)
    gone = (dropped == 0).all(dim=1)
    assert 0 < gone.sum() < V  # some characters dropped, whole rows only
    torch.testing.assert_close(dropped[~gone], 2 * E[~gone])
    assert torch.equal(embedding_dropout(E, 0.5, training=False), E)


@pytest.mark.parametrize("name", ["gru", "lstm", "rnn"])
def test_embedding_dropout_is_off_in_eval(name):
    plain, reg = _pair(name, embed_dropout=0.5)
    X = torch.arange(V).repeat(2, 1)
    plain.eval(), reg.eval()
    torch.testing.assert_close(reg(X)[0], plain(X)[0])


def _outputs_and_grads(model, X):
    torch.manual_seed(5)  # the same dropout masks on every call
    model.zero_grad()
    out, _ = model(X)
    out.pow(2).sum().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["gru-scratch", "lstm-scratch", "rnn-scratch"])
def test_fused_kernels_with_weight_drop_match_the_loops(name):
    from gru_lm._ext import kernels
    from gru_lm.cells import portable_loops

    if kernels() is None:
        pytest.skip("no fused kernels on this machine; the portable loops ran")
    _, model = _pair(name, weight_drop=0.4, locked_dropout=True, dropout=0.3)
    model.train()
    X = torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(2))
    fast = _outputs_and_grads(model, X)
    with portable_loops():
        slow = _outputs_and_grads(model, X)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- weight averaging


def test_ema_is_the_hand_computed_average():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.shadow[0].fill_(0.0)
    expected = 0.0
    for n, w in enumerate((1.0, 2.0, 4.0), start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))  # warm-up: 2/11, 3/12, 4/13
        expected = d * expected + (1 - d) * w
    # by hand: 0.8182, 1.6591, 3.2797
    assert ema.shadow[0].item() == pytest.approx(expected)
    assert expected == pytest.approx(
        (4 / 13) * ((3 / 12) * (9 / 11 * 1.0) + (9 / 12) * 2.0) + (9 / 13) * 4.0)
    with ema.swapped_in(model):
        assert model.weight.item() == pytest.approx(expected)
    assert model.weight.item() == 4.0  # the raw weights come back


# ---------------------------------------------------------------- dynamic evaluation


class _Table(nn.Module):
    """Next-token logits from a table indexed by the current token: it can memorise any
    transition in one large gradient step, so it would score ~perfectly if it had peeked."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(V, V))

    def begin_state(self, batch_size, device="cpu"):
        return torch.zeros(1, batch_size, 1, device=device)  # (num_layers, batch_size, 1)

    def forward(self, X, state=None):
        return self.W[X], state


def test_dynamic_evaluation_scores_every_token_before_learning_from_it():
    g = torch.Generator().manual_seed(0)
    # 40 random orders of 10 tokens: inside a segment every current token differs, so one
    # step could memorise the segment, but what follows in the next one is new.
    tokens = torch.cat([torch.randperm(10, generator=g) for _ in range(40)] + [torch.zeros(1,
                       dtype=torch.long)])
    model = _Table()
    ms = gradient_ms(model, tokens, num_steps=10)
    s = DynamicSettings(lr=50.0, decay=0.0, segment=10)
    nll, n = dynamic_nll(model, tokens, ms, s)
    assert n == 400  # every token scored, once
    # No better than chance (it never saw what it scored; large steps make it far worse).
    assert nll / n > math.log(V / 2)
    assert torch.equal(model.W, torch.zeros(V, V))  # trained weights restored
    # A peeking scorer (update first, then score the same segment) would look brilliant:
    peek = _Table()
    x, y = tokens[:10].unsqueeze(0), tokens[1:11].unsqueeze(0)
    nn.functional.cross_entropy(peek(x)[0][0], y[0]).backward()
    with torch.no_grad():
        peek.W -= 50.0 * peek.W.grad / (ms["W"].sqrt() + 1e-4)
    peeked = nn.functional.cross_entropy(peek(x)[0][0], y[0]).exp().item()
    assert peeked < 1.5


def test_dynamic_evaluation_adapts_to_a_repeating_text():
    tokens = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 30)
    model = _Table()
    ms = gradient_ms(model, tokens, num_steps=10)
    static = math.exp(dynamic_nll(model, tokens, ms, DynamicSettings(0.0, 0.0))[0] / 299)
    adapted = math.exp(dynamic_nll(model, tokens, ms, DynamicSettings(1.0, 0.0))[0] / 299)
    assert static == pytest.approx(V) and adapted < 2.0


def test_tempered_dynamic_evaluation_adapts_as_without_and_only_reads_the_output_otherwise():
    """temperatures=(...): at T = 1 the scores are dynamic evaluation's own (the adaptation
    does not change), and at T the adapting logits are divided by T before the softmax."""
    from gru_lm.dynamic import dynamic_log_probs

    tokens = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 20)
    model = _Table()
    ms = gradient_ms(model, tokens, num_steps=10)
    s = DynamicSettings(1.0, 0.0)
    plain, _ = dynamic_log_probs(model, tokens, ms, s)
    grid, _ = dynamic_log_probs(model, tokens, ms, s, temperatures=(1.0, 0.5, 2.0))
    assert grid.shape == (3, 199)
    torch.testing.assert_close(grid[0], plain)
    assert grid[1].sum() > grid[0].sum() > grid[2].sum()  # it learns the cycle: sharper wins
    assert torch.equal(model.W, torch.zeros(V, V))  # trained weights restored


# ---------------------------------------------------------------- mixing with the n-gram model


@pytest.mark.parametrize("streams", [1, 3, 7])
def test_token_log_probs_are_in_text_order_and_sum_to_the_nll(streams):
    g = torch.Generator().manual_seed(1)
    model = _Table()
    with torch.no_grad():
        model.W.copy_(torch.randn(V, V, generator=g))
    tokens = torch.randint(0, V, (53,), generator=g)
    logp = token_log_probs(model, tokens, streams=streams, num_steps=4, warmup=5)
    # A stateless table: position j's score depends only on tokens[j] and tokens[j + 1].
    expected = model.W.log_softmax(-1)[tokens[:-1], tokens[1:]]
    assert logp.shape == (52,) and logp.dtype == torch.float32
    assert torch.allclose(logp, expected, atol=1e-6)
    nll, n = evaluate(model, tokens, streams, 4, 5)
    assert n == 52 and -float(logp.double().sum()) == pytest.approx(nll, rel=1e-6)


def test_the_mixture_weight_maximises_the_likelihood():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(500, generator=g).log()  # two models' log-probabilities of 500 tokens
    b = torch.rand(500, generator=g).log()
    w = mixture_weight(a.double(), b.double())

    def ll(weight):
        return float(mixture_log_probs(a.double(), b.double(), weight).sum())

    assert 0 < w < 1
    assert all(ll(w) >= ll(x) - 1e-9 for x in (0.0, 1.0, w - 0.01, w + 0.01))
    assert mixture_weight(a.double(), a.double() - 5) < 0.01  # b is worse everywhere


def test_mixture_weights_maximise_the_likelihood_of_several_components():
    from gru_lm.metrics import mixture_weights
    from gru_lm.scorers import ensemble

    g = torch.Generator().manual_seed(3)
    parts = [torch.rand(800, generator=g).log() for _ in range(3)]
    w = mixture_weights(parts)
    assert sum(w) == pytest.approx(1) and min(w) > 0

    def ll(weights):
        return float(ensemble(parts, weights).double().sum())

    assert ll(w) >= ll([1 / 3] * 3) - 1e-6
    for k in range(3):  # moving weight towards any component lowers the likelihood
        moved = [x * 0.95 + (0.05 if i == k else 0) for i, x in enumerate(w)]
        assert ll(w) >= ll(moved) - 1e-6
    # two components: the n-gram mixture's weight; a copy shares equally; a worse one fades
    assert mixture_weights(parts[:2])[1] == pytest.approx(mixture_weight(*parts[:2]))
    assert mixture_weights([parts[0], parts[0]]) == pytest.approx([0.5, 0.5])
    assert mixture_weights([parts[0], parts[1], parts[0] - 5])[2] < 0.01
    # equal weights are the plain average
    assert torch.allclose(ensemble(parts, [1 / 3] * 3), ensemble(parts), atol=1e-5)


def score_row(output: str, name: str) -> list[str]:
    """The cells of the row `name` in evaluate's table of ways of scoring."""
    for line in output.splitlines():
        cells = line.split()
        if line.startswith(name) and " ".join(cells[:len(name.split())]) == name and \
                cells[len(name.split())][0].isdigit():
            return cells[len(name.split()):]
    raise AssertionError(f"no row {name!r} in:\n{output}")


def test_evaluate_mix_ngram_is_never_worse_on_val_than_either_model(tiny_run):
    run = tiny_run()
    r = cli("evaluate", "--run", run, "--split", "val", "--mix-ngram")
    assert r.exit_code == 0, r.output
    mixed = float(score_row(r.output, "static + 5-gram")[0])
    alone = float(r.output.split("| ppl ")[1].split()[0])
    ngram = float(r.output.split("Kneser-Ney ppl ")[1].split()[0])
    assert mixed <= min(alone, ngram) + 1e-3 and "optimistic" in r.output


def test_evaluate_ngram_order_sets_the_reference_and_the_mixture(tiny_run):
    from conftest import one_line_error

    run = tiny_run()
    r = cli("evaluate", "--run", run, "--mix-ngram", "--ngram-order", "3")
    assert r.exit_code == 0, r.output
    assert "3-gram Kneser-Ney ppl" in r.output and score_row(r.output, "static + 3-gram")
    one_line_error(cli("evaluate", "--run", run, "--ngram-order", "9"),
                   "--ngram-order 9 is out of range")


# ---------------------------------------------------------------- Kneser-Ney


def test_kneser_ney_matches_a_hand_computed_case():
    kn = KneserNey([1, 2, 1, 2, 1, 3], vocab_size=4, order=2)
    # bigram counts: after 1 -> {2: 2, 3: 1}; counts of counts n1 = 1, n2 = 2: D2 = 1/5
    # unigram continuation counts {1: 1, 2: 1, 3: 1}: n1 = 3, n2 = 0 -> D1 = 1, capped 0.95
    assert kn.discounts == [0.0, 0.95, 0.2]
    p1_2 = (max(1 - 0.95, 0) + 0.95 * 3 * 0.25) / 3  # P1(2) = 0.254167
    assert kn.prob([], 2) == pytest.approx(p1_2)
    assert kn.prob([1], 2) == pytest.approx((2 - 0.2 + 0.2 * 2 * p1_2) / 3)  # 0.633889
    assert kn.prob([0], 2) == pytest.approx(p1_2)  # unseen context: the lower order


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=60),
       st.lists(st.integers(0, 6), max_size=6), st.integers(1, 5))
def test_kneser_ney_is_a_distribution(train, context, order):
    kn = KneserNey(train, vocab_size=7, order=order)
    probs = kn.distribution(context)
    assert all(p > 0 for p in probs)
    assert sum(probs) == pytest.approx(1.0)


# ---------------------------------------------------------------- the shipped recipe


@pytest.mark.parametrize("config", ["gru", "lstm", "gru-scratch"])
def test_shipped_configs_stop_on_steps_and_run(workdir, config):
    from gru_lm.config import load_config

    cfg = load_config(Path(f"configs/{config}.yaml"))
    assert cfg.train.max_steps and cfg.train.time_budget_s is None  # reproducible anywhere
    r = cli("train", "--config", f"configs/{config}.yaml", "--name", config, "-q",
            "train.max_steps=3", "train.threads=1", "data.max_tokens=30000")
    assert r.exit_code == 0, r.output
    summary = json.loads(Path(f"runs/{config}/summary.json").read_text())
    assert summary["steps"] == 3 and summary["best_weights"] in ("raw", "ema")
    assert summary["ngram_order"] == 5 and 1 < summary["ngram_ppl"] < 28


def test_evaluate_dynamic_and_references(tiny_run):
    run = tiny_run()
    r = cli("evaluate", "--run", run, "--dynamic")
    assert r.exit_code == 0, r.output
    assert "5-gram Kneser-Ney ppl" in r.output and "unigram ppl" in r.output
    assert "lr" in score_row(r.output, "dynamic") and "chosen on val" in r.output
    r = cli("evaluate", "--run", run, "--split", "val", "--dynamic")
    assert "optimistic" in r.output


def test_ema_and_weight_drop_runs_record_both_scores(tiny_run, workdir):
    from conftest import train_tiny

    run = train_tiny("ema", "train.ema_decay=0.9", "model.weight_drop=0.3",
                     "model.locked_dropout=true", "model.dropout=0.2")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_val_ppl" in r and "val_ppl" in r for r in recs)
    summary = json.loads((run / "summary.json").read_text())
    best = min(recs, key=lambda r: min(r["val_ppl"], r["ema_val_ppl"]))
    which = "ema" if best["ema_val_ppl"] < best["val_ppl"] else "raw"
    assert summary["best_weights"] == which and summary["best_step"] == best["step"]
    assert summary["best_val_ppl"] == pytest.approx(min(best["val_ppl"], best["ema_val_ppl"]),
                                                    rel=1e-6)


def test_evaluating_a_text_needs_no_corpus(tiny_run, monkeypatch):
    run = tiny_run()
    import gru_lm.download

    monkeypatch.delenv("GRU_LM_DATA_DIR")  # offline, and the corpus is nowhere to be found:
    monkeypatch.setattr(gru_lm.download, "EMBEDDED_DIR", Path("no-such-folder"))  # not shipped
    Path("t.txt").write_text("the time machine\n")
    r = cli("evaluate", "--run", run, "--text", "t.txt")
    assert r.exit_code == 0, r.output
    assert "t.txt: 15 tokens" in r.output and "references" not in r.output
    r = cli("evaluate", "--run", run, "--text", "t.txt", "--dynamic")
    assert r.exit_code == 1 and "timemachine.txt is not available" in r.output
