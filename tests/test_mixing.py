"""Context mixing (gru_lm/mixing.py): the match model, every order of the n-gram model, and the
online mixer whose weight set a small context picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gru_lm.mixing import (
    NUM_SETS,
    find_matches,
    initial_weights,
    match_probs,
    mix,
)
from gru_lm.ngram import KneserNey


def test_a_repeat_is_predicted_from_where_it_was_seen_and_only_from_the_past():
    rng = np.random.default_rng(0)
    first = rng.integers(0, 20, 40)
    text = np.concatenate([first, rng.integers(0, 20, 10), first])
    m = find_matches(np.zeros(0, np.int64), text, min_len=6)
    assert (m.predicted[:45] == -1).all()  # nothing has repeated six tokens yet
    # inside the repeat (its first six tokens read), every prediction is the next token
    start = 50 + 6 - 1
    assert (m.predicted[start:len(text) - 1] == text[start + 1:]).all()
    assert (m.length[start:len(text) - 1] >= 6).all()
    assert (np.diff(m.length[start + 1:]) >= 0).all()  # a match grows while it holds
    # the prediction at j does not change when what follows j changes
    other = text.copy()
    other[60:] = (other[60:] + 1) % 20
    m2 = find_matches(np.zeros(0, np.int64), other, min_len=6)
    assert (m2.predicted[:60] == m.predicted[:60]).all()


def test_a_match_may_point_into_the_history():
    rng = np.random.default_rng(1)
    history = rng.integers(0, 20, 500)
    text = history[100:160].copy()
    m = find_matches(history, text, min_len=6)
    assert (m.predicted[5:] == text[6:]).all()  # from its sixth token on


def test_the_match_model_learns_how_far_to_trust_a_match():
    rng = np.random.default_rng(2)
    first = rng.integers(0, 10, 200)
    text = np.concatenate([first, first])
    m = find_matches(np.zeros(0, np.int64), text, min_len=4)
    p, counts = match_probs(m, text[1:], 10)
    assert p.shape == (len(text) - 1,) and (p > 0).all()
    assert (p[m.predicted < 0] == pytest.approx(0.1))  # no match: uniform
    hits = p[(m.predicted >= 0) & (m.predicted == text[1:])]
    assert hits[-1] > 0.95 and hits[-1] > hits[0]  # trust grows as matches come true
    assert counts[:, 1].sum() == (m.predicted >= 0).sum()


def test_every_order_of_the_ngram_model_is_a_distribution_and_the_last_is_the_model():
    rng = np.random.default_rng(3)
    train = torch.from_numpy(rng.integers(0, 6, 3000))
    kn = KneserNey(train, 6, order=4)
    text = torch.from_numpy(rng.integers(0, 6, 200))
    by_order = kn.probs_by_order(text)
    assert by_order.shape == (4, 199)
    np.testing.assert_allclose(by_order[-1], np.exp(kn.log_probs(text)), rtol=1e-12)
    context = [1, 2, 3, 4, 5]
    totals = sum(kn.probs_by_order(torch.tensor([*context, w]))[:, -1] for w in range(6))
    np.testing.assert_allclose(totals, np.ones(4), rtol=1e-9)


def test_the_mixer_scores_with_the_weights_it_had_and_learns_which_predictor_to_trust():
    rng = np.random.default_rng(4)
    good = rng.uniform(0.6, 0.9, 3000)  # one predictor gives the token that came much more
    bad = rng.uniform(0.01, 0.1, 3000)
    probs = np.stack([bad, good], axis=1)
    sets = np.zeros(3000, np.int64)
    w0 = initial_weights(2)
    out, w = mix(probs, sets, 0.05, w0)
    assert out[0] == pytest.approx(np.log(w0[0] @ probs[0]))  # before any learning
    assert w[0, 1] > 0.95 and np.allclose(w.sum(1), 1)
    assert (w[1:] == w0[1:]).all()  # sets that no position used keep their start
    assert out[-500:].mean() > np.log(good[-500:]).mean() - 0.05  # as good as the best
    assert w.shape == (NUM_SETS, 2)


def test_context_mixing_beats_the_one_weight_ngram_mixture_on_repeated_text(tiny_run):
    """On a text that repeats what came before it, the match model is worth much: the
    context mixer's val and test are better than the static model's and than the 8-gram
    mixture's with one weight."""
    from gru_lm.evaluation import member_scores
    from gru_lm.members import load_member
    from gru_lm.scorers import ContextMix, NgramMix, Texts

    m = load_member(tiny_run() / "checkpoints" / "best.pt")
    rng = np.random.default_rng(5)
    words = [m.vocab.encode(list(w)) for w in ("the ", "time ", "traveller ", "machine ")]
    phrase = torch.tensor([t for k in rng.integers(0, 4, 60) for t in words[k]])
    train, val, test = (torch.cat([phrase[rng.permutation(len(phrase))], phrase])
                        for _ in range(3))
    texts = Texts(val, test, train)
    variants = member_scores(m, texts, ())
    ngram = KneserNey(train, len(m.vocab), 8)
    mixed = next(iter(ContextMix().mix(variants, texts, ngram).values()))
    one_weight = next(iter(NgramMix().mix(variants, texts, ngram).values()))
    for split in ("val", "target"):
        ours = float(getattr(mixed, split).double().mean())
        assert ours > float(getattr(variants["static"], split).double().mean())
        assert ours > float(getattr(one_weight, split).double().mean())
    assert mixed.settings[0]["mix_inputs"] == 10  # the model, orders 1..8, the match
