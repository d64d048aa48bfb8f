"""Honest numbers: one-stream scoring, ensembles, the continuous cache, the verdict's
statistics and the array-based Kneser-Ney model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, one_line_error
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_kn import ReferenceKneserNey
from torch import nn

from gru_lm.cache import ContinuousCache, cache_scores, choose, with_cache
from gru_lm.config import DataConfig, ModelConfig
from gru_lm.metrics import evaluate, perplexity, stream_count, token_log_probs
from gru_lm.models import build_model
from gru_lm.ngram import KneserNey
from gru_lm.stats import block_bootstrap, paired_seeds, t975, t_interval, verdict

# ---------------------------------------------------------------- one stream


@pytest.mark.parametrize("name", ["gru-scratch", "lstm"])
def test_one_stream_equals_a_loop_that_carries_the_state_token_by_token(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_hiddens=16, init="xavier"), 9).eval()
    tokens = torch.randint(0, 9, (240,))
    state, nll = model.begin_state(1), 0.0
    with torch.no_grad():
        for j in range(len(tokens) - 1):
            logits, state = model(tokens[j].view(1, 1), state)
            nll -= float(logits[0, 0].log_softmax(-1)[tokens[j + 1]])
    got, n = evaluate(model, tokens, streams=1, num_steps=7, warmup=0)
    assert n == 239 and got == pytest.approx(nll, rel=1e-5)
    logp = token_log_probs(model, tokens, streams=1, num_steps=7, warmup=0)
    assert -float(logp.double().sum()) == pytest.approx(nll, rel=1e-5)


def test_parallel_streams_with_a_warm_up_score_as_one_stream(tiny_run):
    """1, 32 and 499 streams agree within 0.2% once each stream reads the text before it;
    without the warm-up, 499 streams from zero states are far off."""
    from gru_lm.data import load_corpus
    from gru_lm.members import load_member

    m = load_member(tiny_run() / "checkpoints" / "best.pt")
    vocab, model = m.vocab, m.model
    text = load_corpus(DataConfig(max_tokens=12_000), vocab=vocab, progress=False).train
    one = perplexity(*evaluate(model, text, 1, 16, warmup=0))
    for streams in (32, 499):
        assert stream_count(len(text) - 1, streams, 20) == streams
        warm = perplexity(*evaluate(model, text, streams, 16, warmup=20))
        assert abs(warm / one - 1) < 0.002, (streams, warm, one)
    cold = perplexity(*evaluate(model, text, 499, 16, warmup=0))
    assert cold / one - 1 > 0.01  # what the warm-up fixes


def test_stream_count_leaves_every_stream_its_warm_up():
    assert stream_count(8528, 32, 100) == 32
    assert stream_count(8528, 499, 100) == 85  # 85 streams of 101 tokens
    assert stream_count(50, 32, 100) == 1  # too short for a warm-up: one stream
    assert stream_count(5, 32, 0) == 5


def test_the_summary_and_evaluate_agree_on_one_stream_figures(tiny_run):
    import json

    run = tiny_run()
    summary = json.loads((run / "summary.json").read_text())
    r = cli("evaluate", "--run", run)
    assert r.exit_code == 0, r.output
    assert "scored as one stream" in r.output
    assert f"ppl {summary['best_test_ppl']:.3f}" in r.output
    assert summary["eval_warmup"] == 100


# ---------------------------------------------------------------- ensembles


def test_an_ensemble_of_a_run_and_its_copy_equals_the_run(tiny_run):
    run = tiny_run("a")
    shutil.copytree(run, "runs/b")
    alone = cli("evaluate", "--run", run)
    both = cli("evaluate", "--run", run, "--run", "runs/b")
    assert both.exit_code == 0, both.output
    assert "ensemble of 2 runs" in both.output
    ppl = alone.output.split("| ppl ")[1].split()[0]
    assert ppl in both.output.split("| ppl ")[1].split()[0]


def test_a_weighted_ensemble_fits_its_member_weights_on_val(tiny_run):
    import gru_lm
    from gru_lm.checkpoint import load_checkpoint, save_checkpoint

    run = tiny_run("a")
    shutil.copytree(run, "runs/weak")  # the same run, every weight shrunk: near uniform
    best = Path("runs/weak/checkpoints/best.pt")
    payload = load_checkpoint(best)
    payload["model"] = {k: v * 0.05 for k, v in payload["model"].items()}
    save_checkpoint(payload, best)
    equal = gru_lm.evaluate(["runs/a", "runs/weak"])
    fitted = gru_lm.evaluate(["runs/a", "runs/weak"], weighted=True)
    w = [float(x) for x in fitted.rows[0].settings[-1]["member_weights"].split()]
    assert len(w) == 2 and sum(w) == pytest.approx(1, abs=2e-3) and w[0] > 0.5 > w[1]
    assert fitted.rows[0].val_ppl < equal.rows[0].val_ppl  # what it maximised
    assert fitted.ppl != equal.ppl and fitted.weighted and not equal.weighted
    r = cli("evaluate", "--run", run, "--run", "runs/weak", "--weighted")
    assert r.exit_code == 0, r.output
    assert "ensemble of 2 runs (weights fitted on val)" in r.output
    assert f"member weights {w[0]:.3f} {w[1]:.3f}" in r.output
    one_line_error(cli("evaluate", "--run", run, "--weighted"), "--weighted", "two or more")


def test_an_ensemble_refuses_a_member_with_another_vocabulary(tiny_run):
    from conftest import train_tiny

    run = tiny_run("a")
    other = train_tiny("raw", "data.preset=raw")
    r = cli("evaluate", "--run", run, "--run", other)
    one_line_error(r, "runs/raw", "other data", "vocabulary", "same data")
    assert cli("evaluate", "--run", run, "--run", run).exit_code == 1  # given twice


def test_an_ensemble_refuses_a_member_trained_on_other_data(tiny_run):
    from conftest import train_tiny

    run = tiny_run("a")
    # the same vocabulary (a long enough prefix of the same text), another split
    other = train_tiny("other", "data.val_fraction=0.15", "data.train_fraction=0.75")
    r = cli("evaluate", "--run", run, "--run", other)
    one_line_error(r, "runs/other", "other data")


def test_evaluate_refuses_a_changed_corpus(workdir, data_dir):
    from conftest import train_tiny

    text = (data_dir / "timemachine.txt").read_text()[:20_000]
    Path("my.txt").write_text(text)
    run = train_tiny("mine", "data.dataset=null", "data.path=my.txt")
    assert cli("evaluate", "--run", run).exit_code == 0
    Path("my.txt").write_text(text.replace("Time", "Tame", 3))  # same vocabulary, other text
    one_line_error(cli("evaluate", "--run", run), "my.txt", "not the text this run was "
                   "trained on")
    Path("t.txt").write_text("the time machine\n")  # another text needs no corpus
    r = cli("evaluate", "--run", run, "--text", "t.txt")
    assert r.exit_code == 0 and "references" not in r.output


# ---------------------------------------------------------------- the continuous cache


class _OneHotInputs(nn.Module):
    """Uniform next-token scores; its features are the one-hot current token, so a cache
    keyed on them finds earlier occurrences of the same token."""

    def __init__(self, V: int):
        super().__init__()
        self.V, self.num_hiddens = V, V

    def begin_state(self, batch_size, device="cpu"):
        return torch.zeros(1, batch_size, 1)

    def forward_features(self, X, state=None):
        feats = nn.functional.one_hot(X, self.V).float()  # (batch, steps, V)
        return torch.zeros(*X.shape, self.V), state, feats


def test_the_cache_scores_each_token_before_it_enters():
    """A text of distinct tokens: no earlier pair can predict a token, so a cache that scored
    a token only after adding it (peeking) would be perfect, and a correct one gives it 0."""
    V = 40
    once = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    model = _OneHotInputs(V)
    logp, grid = cache_scores(model, once, 1, 7, 0, (100,), (50.0,))
    assert logp.shape == (V - 1,) and torch.allclose(logp, torch.full((V - 1,), -math.log(V)))
    c = grid[0, 0]
    assert math.isnan(c[0])  # nothing cached before the first token
    assert (c[1:] == -math.inf).all()  # never the token to come
    s = choose(logp, grid, (100,), (50.0,))
    assert s.lam < 1e-3
    # The same tokens twice: the second pass is predicted from the first, as it should be.
    twice = torch.cat([once, once])
    logp, grid = cache_scores(model, twice, 1, 7, 0, (100,), (50.0,))
    assert (grid[0, 0, V:] > math.log(0.99)).all()


def test_the_cache_in_parallel_streams_matches_one_stream():
    V = 30
    text = torch.randint(0, V, (3000,), generator=torch.Generator().manual_seed(1))
    model = _OneHotInputs(V)
    one = cache_scores(model, text, 1, 16, 0, (50, 200), (1.0, 3.0))[1]
    par = cache_scores(model, text, 8, 16, 0, (50, 200), (1.0, 3.0))[1]
    assert torch.allclose(one, par, equal_nan=True, atol=1e-5)


def test_with_cache_is_the_model_where_the_cache_is_empty():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    cache = torch.tensor([math.nan, math.log(0.75)])
    mixed = with_cache(logp, cache, 0.2)
    assert mixed[0] == logp[0]
    assert float(mixed[1].exp()) == pytest.approx(0.8 * 0.25 + 0.2 * 0.75)


def test_the_cache_reads_windows_of_any_length():
    cache = ContinuousCache((3,), (1.0,))
    feats = torch.eye(4).unsqueeze(0)  # one stream, 4 steps
    out = cache.read(feats, torch.tensor([[1, 2, 3, 0]]))
    assert out.shape == (1, 1, 1, 4) and math.isnan(out[0, 0, 0, 0])
    out = cache.read(feats[:, 1:3], torch.tensor([[2, 9]]))  # 2 steps, the last 3 cached
    assert out.shape == (1, 1, 1, 2)
    assert math.isfinite(out[0, 0, 0, 0])  # 2 followed the same feature before
    assert out[0, 0, 0, 1] == -math.inf  # 9 never followed anything


def test_evaluate_cache_row(tiny_run):
    r = cli("evaluate", "--run", tiny_run(), "--cache", "--mix-ngram")
    assert r.exit_code == 0, r.output
    for row in ("static", "cache", "static + 5-gram", "cache + 5-gram"):
        assert any(line.startswith(row + " ") for line in r.output.splitlines()), row
    assert "window" in r.output and "theta" in r.output and "best on val: " in r.output


# ---------------------------------------------------------------- statistics


def test_t_interval_matches_a_hand_computed_case():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975, 2} = 4.3027
    assert iv.mean == 2 and iv.n == 3
    assert iv.high - 2 == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert t_interval([1.0]) is None
    assert t975(30) == 2.0423 and t975(31) == pytest.approx(2.0395, abs=1e-4)
    assert t975(1000) == pytest.approx(1.9623, abs=1e-4)
    seeds = paired_seeds([4.0, 4.1], [4.2, 4.3])  # -4.76%, -4.65%
    assert seeds.mean == pytest.approx(100 * ((4 / 4.2 + 4.1 / 4.3) / 2 - 1))


def test_block_bootstrap_matches_a_hand_computed_case():
    # Two blocks of 100 tokens whose NLL differences are 0.1 and 0.3: a resampled mean is
    # 0.1, 0.2 or 0.3 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0.1, 0.3].
    diff = np.r_[np.full(100, 0.1), np.full(100, 0.3)]
    iv = block_bootstrap(diff, np.zeros(200))
    assert iv.mean == pytest.approx(100 * math.expm1(0.2))
    assert iv.low == pytest.approx(100 * math.expm1(0.1))
    assert iv.high == pytest.approx(100 * math.expm1(0.3))
    same = block_bootstrap(np.full(500, 1.5), np.full(500, 1.5))
    assert same.low == same.high == same.mean == 0


def test_verdict_sentences():
    text = block_bootstrap(np.full(300, -0.02), np.zeros(300))
    better = verdict("lstm", "gru", t_interval([-2.0, -2.2, -2.4]), text)
    assert better.startswith("lstm is better than gru by 2.2% in test ppl (95% CI 1.7–2.7%")
    noisy = verdict("lstm", "gru", t_interval([-2.0, 0.5, -1.0]), text)
    assert noisy.startswith("no difference that these seeds can show between lstm and gru")
    one = verdict("lstm", "gru", None, text)
    assert "one seed each" in one and "--seeds 3" in one


# ---------------------------------------------------------------- Kneser-Ney


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 8), max_size=80), st.integers(1, 6), st.integers(2, 9),
       st.lists(st.integers(0, 8), max_size=9), st.integers(0, 8))
def test_the_array_model_equals_the_reference_on_random_contexts(train, order, V, context, w):
    train, context, w = [t % V for t in train], [t % V for t in context], w % V
    ref, kn = ReferenceKneserNey(train, V, order), KneserNey(train, V, order)
    assert kn.discounts == pytest.approx(ref.discounts, abs=1e-15)
    assert abs(kn.prob(context, w) - ref.prob(context, w)) < 1e-12


def test_the_array_model_scores_a_text_as_the_reference_does_token_by_token():
    g = np.random.default_rng(0)
    train, text = g.integers(0, 6, 3000), g.integers(0, 6, 400)
    ref, kn = ReferenceKneserNey(train.tolist(), 6, 5), KneserNey(train, 6, 5)
    expected = [math.log(ref.prob(text[max(0, i - 4):i].tolist(), int(text[i])))
                for i in range(1, len(text))]
    assert np.allclose(kn.log_probs(text), expected, rtol=0, atol=1e-12)
    blocks = np.concatenate(list(kn.prob_blocks(text, chunk=37)))  # blocks join seamlessly
    assert np.allclose(np.log(blocks), expected, rtol=0, atol=1e-12)
    nll, n = kn.nll(text)
    assert n == 399 and nll == pytest.approx(-sum(expected), rel=1e-12)


def test_evaluate_text_says_what_the_d2l_preset_dropped(workdir, tiny_run):
    """A d2l run scoring a Chinese text reads only its few ASCII letters: the figure comes
    with how many characters became how many tokens."""
    Path("zh.txt").write_text("時間旅行者 said 你好 to us。\n" * 20, encoding="utf-8")
    r = cli("evaluate", "--run", tiny_run(), "--text", "zh.txt")
    assert r.exit_code == 0, r.output
    assert "note: --text zh.txt: 420 characters became" in r.output
    assert "non-ASCII characters" in r.output and "data.preset=raw" in r.output
    assert r.output.index("note:") < r.output.index("scored as one stream")


# ---------------------------------------------------------------- the scorers' registry


def _member(name: str = "lstm"):
    from gru_lm.config import Config
    from gru_lm.data import Vocab
    from gru_lm.members import Member

    torch.manual_seed(0)
    cfg = Config.model_validate({"model": {"name": name, "num_hiddens": 16},
                                 "train": {"eval_batch_size": 4, "num_steps": 8, "max_steps": 1,
                                           "eval_warmup": 10}})
    vocab = Vocab([c for c in "abcdefgh "], min_freq=0)
    model = build_model(cfg.model, len(vocab)).eval()
    return Member(Path("m.pt"), cfg, vocab, model, None)


def _scored(scorer, member, texts):
    from gru_lm.evaluation import member_scores
    from gru_lm.ngram import KneserNey
    from gru_lm.scorers import MIXERS

    if scorer in MIXERS:  # a post-pass: over the static scores
        variants = member_scores(member, texts, ())
        ngram = KneserNey(texts.train, len(member.vocab), 3)
        return next(iter(MIXERS[scorer]().mix(variants, texts, ngram).values()))
    return member_scores(member, texts, set(_needs(scorer)))[scorer]


def _needs(scorer: str) -> tuple[str, ...]:
    from gru_lm.scorers import SCORERS

    return SCORERS[scorer].combines or ((scorer,) if scorer != "static" else ())


def _all_methods() -> list[str]:
    from gru_lm.scorers import MIXERS, SCORERS

    return [*SCORERS, *MIXERS]


@pytest.mark.parametrize("scorer", _all_methods())
def test_every_scorer_scores_each_token_before_it_learns_from_it(scorer):
    """Two targets equal up to position k and different after it: every scorer gives their
    first k tokens the same log-probabilities and chooses the same settings on val. A scorer
    that looked ahead (adapted, cached or normalised on text it has not scored yet) would
    not."""
    from gru_lm.scorers import Texts

    m = _member()
    g = torch.Generator().manual_seed(1)
    train, val = torch.randint(0, 9, (600,), generator=g), torch.randint(0, 9, (300,), generator=g)
    a = torch.randint(0, 9, (400,), generator=g)
    b, k = a.clone(), 150
    b[k + 1:] = (a[k + 1:] + 1 + torch.randint(0, 8, (len(a) - k - 1,), generator=g)) % 9
    sa, sb = (_scored(scorer, m, Texts(val, t, train)) for t in (a, b))
    assert len(sa.target) == len(a) - 1
    torch.testing.assert_close(sa.target[:k], sb.target[:k])  # log P(a[j+1] | a[:j+1]), j < k
    assert not torch.equal(sa.target[k:], sb.target[k:])  # the targets do differ after k
    assert sa.settings == sb.settings and torch.equal(sa.val, sb.val)


def test_the_temperature_chosen_on_val_undoes_a_scaled_output_layer(tiny_run):
    """Logits scaled by 1.2 make the trained model 1.2 times as sure: T chosen on val comes
    out 1.2 times what it was (within the grid's step), and no T scores val worse than the
    model as it is (T = 1 is in the grid)."""
    from gru_lm.data import load_corpus
    from gru_lm.members import load_member
    from gru_lm.scorers import TEMPERATURES, Temperature, Texts

    m = load_member(tiny_run() / "checkpoints" / "best.pt")
    corpus = load_corpus(m.cfg.data, vocab=m.vocab, progress=False)
    texts = Texts(corpus.val[:3000], corpus.test[:3000])
    t0 = Temperature().score(m, texts, {}).settings[0]["temperature"]
    with torch.no_grad():
        m.model.W_hq.mul_(1.2)  # the book's output layer: logits = H W_hq + b_q
        m.model.b_q.mul_(1.2)
    sharp = Temperature().score(m, texts, {})
    t1 = sharp.settings[0]["temperature"]
    assert TEMPERATURES[0] < t1 < TEMPERATURES[-1], (t0, t1)  # found inside the grid
    assert t1 == pytest.approx(1.2 * t0, abs=0.026)
    static = token_log_probs(m.model, texts.val, *m.cfg.train.reading)
    assert float(sharp.val.double().sum()) >= float(static.double().sum())


def test_dynamic_cache_and_temperature_together_are_no_worse_on_val_than_each_pair():
    """The three together choose T and the cache's lambda on val over a grid that holds
    dynamic + cache (T = 1) and dynamic + temperature (lambda = 0): their val score is at
    least as good as either's, with settings that say which T and lambda won."""
    from gru_lm.evaluation import member_scores
    from gru_lm.scorers import TEMPERATURES, Texts

    m = _member()
    g = torch.Generator().manual_seed(3)
    cycle = torch.randint(0, 9, (40,), generator=g)  # repeats: the cache has something to say
    train, val, test = cycle.repeat(15), cycle.repeat(8), cycle.repeat(8)
    rows = member_scores(m, Texts(val, test, train), {"dynamic", "cache", "temperature"})
    assert "dynamic + cache + temperature" in rows
    three = rows["dynamic + cache + temperature"]
    for pair in ("dynamic + cache", "dynamic + temperature"):
        assert float(three.val.double().sum()) >= float(rows[pair].val.double().sum()) - 1e-3
    chosen = three.settings[0]
    assert chosen["temperature"] in TEMPERATURES and 0.0 <= chosen["lambda"] <= 1.0
    assert len(three.target) == len(test) - 1


def test_a_new_scorer_is_one_class(tiny_run, monkeypatch):
    """Registering a class is all it takes: `gru_lm.evaluate(run, NAME=True)` scores with it,
    and evaluate's --help lists its option (the CLI reads the registry)."""
    import gru_lm
    from gru_lm import scorers

    monkeypatch.setattr(scorers, "SCORERS", dict(scorers.SCORERS))

    @scorers.register
    class Halved(scorers.Scorer):  # the static model mixed half and half with uniform
        name = "halved"
        help = "Also score half model, half uniform."

        def score(self, m, texts, chosen):
            s = scorers.SCORERS["static"]().score(m, texts, chosen)
            uniform = -math.log(len(m.vocab))

            def mix(lp):
                return torch.logaddexp(lp, torch.full_like(lp, uniform)) - math.log(2)

            return scorers.Scored(mix(s.val), mix(s.target), [{"share": 0.5}])

    ev = gru_lm.evaluate(tiny_run(), "test", halved=True)
    assert [r.name for r in ev.rows] == ["static", "halved"]
    assert ev.rows[1].ppl > ev.rows[0].ppl and ev.rows[1].settings == [{"share": 0.5}]
    assert "halved" in scorers.options()


def test_evaluate_lists_every_registered_method_as_an_option():
    from gru_lm.scorers import options

    r = cli("evaluate", "--help")
    for name in options():
        assert f"--{name}" in r.output, (name, r.output)


def test_a_scorer_cannot_take_the_name_of_an_evaluate_option():
    from gru_lm import scorers

    for name in ("weighted", "split", "ngram-order"):
        cls = type("Clash", (scorers.Scorer,), {"name": name})
        with pytest.raises(ValueError, match="an option of evaluate already"):
            scorers.register(cls)
        assert name not in scorers.SCORERS


def test_an_unknown_method_is_one_line(tiny_run):
    import gru_lm
    from gru_lm.errors import GruLmError

    with pytest.raises(GruLmError, match="unknown way of scoring 'cachee'; the methods are"):
        gru_lm.evaluate(tiny_run(), cachee=True)


@pytest.mark.slow  # (runs benchmarks/heldout.py in a process of its own)
def test_the_heldout_benchmark_weighs_ensembles_and_counts_their_cost(tiny_run):
    """benchmarks/heldout.py: a --set of runs gets equal-weight and val-weighted ensemble
    columns, its weights and its training cost (the runs' core-minutes, summed)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, reseed

    a, b = tiny_run("x-s0"), reseed(tiny_run("x-s1"), 1)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "heldout.py"), str(a), str(b),
                        "--methods", "temperature", "--order", "3", "--set", "pair=x-s1,x-s0",
                        "--json", "h.json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(Path("h.json").read_text())["rows"]
    pair = [row for row in rows if row["group"] == "pair"]
    assert [row["scored"] for row in pair] == ["static", "static + 3-gram", "temperature",
                                               "temperature + 3-gram"]
    summary = json.loads((a / "summary.json").read_text())
    assert pair[0]["core_minutes"] == pytest.approx(
        2 * summary["train_time_s"] * summary["threads"] / 60)
    assert sum(pair[0]["weights"].values()) == pytest.approx(1)
    assert pair[0]["weighted_val"] <= pair[0]["ensemble_val"] * (1 + 1e-4)
    assert "weights of pair (static): x-s1 0." in r.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "heldout.py"), str(a),
                          "--set", "pair=x-s0,nope"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "unknown: nope" in bad.stderr
