"""Data pipeline: the real corpus, preprocessing, vocabulary, splits and samplers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gru_lm.config import DataConfig
from gru_lm.data import BatchLoader, Vocab, eval_batches, load_corpus, preprocess
from gru_lm.errors import DataError


def test_real_corpus_matches_the_book(data_dir):
    c = load_corpus(DataConfig(train_fraction=1, val_fraction=0, test_fraction=0))
    assert c.num_tokens == 170_580
    assert len(c.vocab) == 28
    assert c.vocab.idx_to_token[:4] == ["<unk>", " ", "e", "t"]
    assert c.vocab.decode(c.train[:29]) == "the time machine by h g wells"


def test_default_split_is_contiguous_90_5_5(data_dir):
    c = load_corpus(DataConfig())
    full = load_corpus(DataConfig(train_fraction=1, val_fraction=0, test_fraction=0)).train
    assert (len(c.train), len(c.val), len(c.test)) == (153_522, 8_529, 8_529)
    assert torch.equal(torch.cat([c.train, c.val, c.test]), full[: c.num_tokens])


def test_max_tokens_is_the_books_first_10000(data_dir):
    c = load_corpus(DataConfig(max_tokens=10_000, train_fraction=1, val_fraction=0,
                               test_fraction=0))
    assert len(c.train) == 10_000 and len(c.val) == 0


def test_d2l_preset_per_line():
    assert preprocess("The Time-Machine!\n\n  By H. G.\n", "d2l") == list("the time machineby h g")


def test_raw_preset_normalises_nfc_and_can_lowercase():
    assert preprocess("Cafe\u0301 X", "raw") == list("Café X")
    assert preprocess("Cafe\u0301 X", "raw", lowercase=True) == list("café x")


def test_vocab_order_min_freq_and_round_trip():
    v = Vocab(list("bbaac d"), min_freq=2, reserved_tokens=["<pad>"])
    assert v.idx_to_token == ["<unk>", "<pad>", "a", "b"]
    assert v.encode("abz") == [2, 3, 0]
    w = Vocab.from_dict(v.to_dict())
    assert w.idx_to_token == v.idx_to_token and w.decode([2, 3]) == "ab"


def test_malformed_vocab_is_refused():
    with pytest.raises(DataError, match="vocabulary is malformed"):
        Vocab.from_dict({"idx_to_token": ["a", "a"]})


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", max_size=200))
def test_decode_encode_round_trip(s):
    v = Vocab(list("abcdefghijklmnopqrstuvwxyz "))
    assert v.decode(v.encode(s)) == s


@settings(max_examples=50)
@given(st.text(max_size=300), st.sampled_from(["d2l", "raw"]))
def test_any_text_gives_ids_in_range(s, preset):
    tokens = preprocess(s, preset)
    v = Vocab(list("abcdefghijklmnopqrstuvwxyz "))
    ids = v.encode(tokens)
    assert all(0 <= i < len(v) for i in ids)


def _tokens(n=1000):
    return torch.arange(n) % 97


@pytest.mark.parametrize("sampler", ["random", "sequential"])
def test_sampler_targets_are_inputs_shifted(sampler):
    toks = _tokens()
    loader = BatchLoader(toks, 4, 7, sampler, seed=1)
    X, Y = loader.epoch().stacked()
    assert X.shape == (loader.num_batches(), 4, 7)
    assert torch.equal((X + 1) % 97, Y)  # tokens are i % 97, so the next token is +1
    assert X.min() >= 0 and X.max() < 97


def test_sequential_windows_continue_across_batches():
    toks = torch.arange(1000)  # token value = position
    X, _ = BatchLoader(toks, 4, 7, "sequential", seed=3).epoch().stacked()
    assert torch.equal(X[1][:, 0], X[0][:, -1] + 1)
    assert torch.equal(X[:, :, 1:] - X[:, :, :-1], torch.ones_like(X[:, :, 1:]))


def test_random_windows_do_not_overlap():
    toks = torch.arange(1000)
    X, _ = BatchLoader(toks, 4, 7, "random", seed=3).epoch().stacked()
    starts = X[:, :, 0].flatten()
    assert len(set(starts.tolist())) == len(starts)
    ordered = starts.sort().values
    assert torch.all(ordered[1:] - ordered[:-1] >= 7)


@pytest.mark.parametrize("sampler", ["random", "sequential"])
def test_same_seed_same_batches(sampler):
    a = BatchLoader(_tokens(), 4, 7, sampler, seed=5)
    b = BatchLoader(_tokens(), 4, 7, sampler, seed=5)
    for _ in range(3):
        for x, y in zip(a.epoch().stacked(), b.epoch().stacked(), strict=True):
            assert torch.equal(x, y)


def test_too_small_split_is_a_clear_error():
    with pytest.raises(DataError, match="too few for one batch of train.batch_size=32"):
        BatchLoader(_tokens(100), 32, 35, "sequential")


@settings(max_examples=60, deadline=None)
@given(st.integers(40, 400), st.integers(1, 6), st.integers(1, 9), st.integers(0, 99),
       st.sampled_from(["random", "sequential"]))
def test_batches_never_leave_the_split(n, batch_size, num_steps, seed, sampler):
    toks = torch.arange(n)
    if n < batch_size * num_steps + num_steps:
        with pytest.raises(DataError):
            BatchLoader(toks, batch_size, num_steps, sampler, seed=seed)
        return
    X, Y = BatchLoader(toks, batch_size, num_steps, sampler, seed=seed).epoch().stacked()
    assert len(X) >= 1
    assert X.min() >= 0 and Y.max() < n and torch.equal(X + 1, Y)


@given(st.integers(2, 300), st.integers(1, 8), st.integers(1, 9))
def test_eval_batches_score_every_token_once_in_order(n, batch_size, num_steps):
    toks = torch.arange(n)
    streams = None
    for X, Y in eval_batches(toks, batch_size, num_steps):
        valid = Y != -100
        assert torch.equal(X[valid] + 1, Y[valid])
        streams = Y if streams is None else torch.cat([streams, Y], 1)
    flat = streams.flatten()
    flat = flat[flat != -100]
    assert torch.equal(flat, torch.arange(1, n))
