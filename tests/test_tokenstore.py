"""The token store: streaming preprocessing equals the in-memory one, reuse, rebuild, dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gru_lm.config import DataConfig
from gru_lm.data import Vocab, load_corpus, preprocess
from gru_lm.errors import DataError
from gru_lm.tokenstore import open_store, token_pieces

# Letters, separators and multi-byte characters (accents, a combining mark, Greek sigma,
# CJK), so block cuts fall inside lines, runs of non-letters and UTF-8 sequences.
ALPHABET = "abcXYZ \n\r\t.,;1-éÉ\u0301Σσ漢"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=200), st.sampled_from(["d2l", "raw", "bytes"]),
       st.booleans(), st.integers(1, 17))
def test_streaming_preprocessing_equals_preprocess(tmp_path_factory, text, preset, lower,
                                                   block):
    path = tmp_path_factory.mktemp("t") / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    streamed = "".join("".join(map(chr, piece.tolist()))
                       for piece in token_pieces(path, preset, lower, block_bytes=block))
    assert streamed == "".join(preprocess(text, preset, lower))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="abcXYZ.,;1-éÉ\u0301Σσ漢'", max_size=300), st.sampled_from(["d2l", "raw"]),
       st.booleans(), st.integers(1, 9))
def test_text_without_whitespace_is_cut_where_nothing_changes(tmp_path_factory, text, preset,
                                                              lower, block):
    path = tmp_path_factory.mktemp("t") / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    streamed = "".join("".join(map(chr, piece.tolist()))
                       for piece in token_pieces(path, preset, lower, block_bytes=block))
    assert streamed == "".join(preprocess(text, preset, lower))


@pytest.mark.parametrize("text", ["a" * 3_000_000, "漢字" * 1_000_000, "Σ" * 600_000])
def test_text_without_whitespace_is_read_in_pieces(tmp_path, monkeypatch, text):
    """No whitespace to cut after: still pieces of about one block, not one growing piece
    re-scanned at every block (which made 100 MB take 5 s and 1 GB minutes). A run with no
    safe cut at all (capital sigmas: each one's lowercase depends on the next) is cut
    anyway past FORCE_BYTES."""
    monkeypatch.setattr("gru_lm.tokenstore.FORCE_BYTES", 1 << 18)
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    pieces = [len(p) for p in token_pieces(path, "raw", True, block_bytes=1 << 16)]
    assert sum(pieces) == len(text) and len(pieces) >= 4
    assert max(pieces) <= 1 << 18


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(cache_dir=tmp_path / "cache", **kw)


def test_store_matches_the_text_and_is_reused(tmp_path):
    src = tmp_path / "book.txt"
    text = "The Time Traveller (for so it will be convenient to speak of him)\n" * 50
    src.write_text(text)
    cfg = _cfg(tmp_path, path=src)
    first = load_corpus(cfg)
    assert not first.store_reused and first.train.dtype == torch.uint8
    tokens = preprocess(text, "d2l")
    vocab = Vocab(tokens)
    whole = torch.cat([first.train, first.val, first.test]).long()
    assert whole.tolist() == vocab.encode(tokens)[:len(whole)]
    assert first.vocab.idx_to_token == vocab.idx_to_token
    again = load_corpus(cfg)
    assert again.store_reused and again.store == first.store
    assert again.fingerprint() == first.fingerprint()
    # One .bin and one .json, nothing half-written beside them.
    assert sorted(p.suffix for p in (tmp_path / "cache" / "tokens").iterdir()) == [".bin",
                                                                                    ".json"]


def test_store_is_rebuilt_when_the_source_or_preprocessing_changes(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("abc abd abe\n" * 40)
    a = load_corpus(_cfg(tmp_path, path=src))
    src.write_text("xyz xyw xyv\n" * 40)
    b = load_corpus(_cfg(tmp_path, path=src))
    assert not b.store_reused and b.store != a.store
    assert b.vocab.decode(b.train[:7]) == "xyz xyw"
    c = load_corpus(_cfg(tmp_path, path=src, preset="raw"))
    assert not c.store_reused and "\n" in c.vocab.token_to_idx


def test_damaged_store_is_rebuilt(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("hello world\n" * 40)
    a = load_corpus(_cfg(tmp_path, path=src))
    with open(a.store, "ab") as f:  # a store cut short or grown is not trusted
        f.write(b"\x00")
    b = load_corpus(_cfg(tmp_path, path=src))
    assert not b.store_reused and b.fingerprint() == a.fingerprint()


def test_large_vocabulary_is_stored_as_uint16(tmp_path):
    src = tmp_path / "cjk.txt"
    chars = [chr(0x4E00 + i) for i in range(400)]
    src.write_text(" ".join(chars * 3))
    corpus = load_corpus(_cfg(tmp_path, path=src, preset="raw"))
    assert len(corpus.vocab) > 256 and corpus.train.dtype == torch.uint16
    meta = json.loads(next((tmp_path / "cache" / "tokens").glob("*.json")).read_text())
    assert meta["dtype"] == "uint16"
    assert corpus.vocab.decode(corpus.train[:3]) == "一 丁"


def test_max_tokens_and_statistics(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("Hello, World!\n" * 100)
    corpus = load_corpus(_cfg(tmp_path, path=src, max_tokens=25, train_fraction=1.0,
                              val_fraction=0, test_fraction=0))
    assert corpus.num_tokens == 25 and corpus.raw_chars == 1400
    assert "lowercased 200 capitals" in corpus.note


def test_run_vocabulary_remaps_the_store(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("aaab bc\n" * 40)
    run_vocab = Vocab(list("cba"))  # another order, and no space: spaces become <unk>
    corpus = load_corpus(_cfg(tmp_path, path=src), vocab=run_vocab)
    assert corpus.vocab is run_vocab
    assert corpus.train[:8].tolist() == run_vocab.encode("aaab bca")
    assert run_vocab.encode(" ") == [0]


@pytest.mark.parametrize("content, message", [
    (b"ok text \xff\xfe more", "is not UTF-8 (byte 8)"),
    (b"  \n\t ", "is empty"),
    (b"..!!", "has 0 token(s)"),
])
def test_bad_sources_are_one_line_errors(tmp_path, content, message):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_corpus(_cfg(tmp_path, path=src))
    assert not list((tmp_path / "cache").rglob("*.bin"))


def test_unwritable_cache_says_which_key(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("hello world\n" * 40)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="data.cache_dir"):
        open_store(src, _cfg(tmp_path, path=src), blocker, Vocab.from_counts)


def test_eval_max_tokens_scores_the_first_tokens_and_says_so(workdir, monkeypatch):
    from conftest import cli

    from gru_lm.checkpoint import load_checkpoint
    from gru_lm.config import load_config
    from gru_lm.metrics import evaluate, perplexity
    from gru_lm.models import build_model

    monkeypatch.setattr("gru_lm.ngram.MAX_TRAIN_TOKENS", 1000)
    monkeypatch.setattr("gru_lm.preflight.LARGE_EVAL", 400)
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "cap", "train.max_steps=10",
            "train.eval_max_tokens=120")
    assert r.exit_code == 0, r.output
    assert "scores the first 120 tokens of val (500) and test (500)" in r.output
    assert "counts the first 1,000 of the 4,000 training tokens" in r.output
    assert "every evaluation scores all" not in r.output  # capped: no suggestion
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "uncapped", "train.max_steps=1")
    assert "val has 500 and test has 500 tokens; every evaluation scores all of them" in r.output
    summary = json.loads(Path("runs/cap/summary.json").read_text())
    assert summary["eval_max_tokens"] == 120
    cfg = load_config(Path("configs/tiny.yaml"), [])
    corpus = load_corpus(cfg.data)
    model = build_model(cfg.model, len(corpus.vocab))
    model.load_state_dict(load_checkpoint(Path("runs/cap/checkpoints/best.pt"))["model"])
    nll, n = evaluate(model, corpus.test[:120], *cfg.train.reading)
    assert n == 119 and abs(perplexity(nll, n) - summary["best_test_ppl"]) < 1e-9
