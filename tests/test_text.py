"""Any text at all: readable samples by default, unknown prefix characters, the byte-level
preset, and fine-tuning one run from another."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from conftest import CLASSICS, ZH, cli, one_line_error, train_tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from gru_lm.data import ByteVocab, char_ends, preprocess, vocab_from_dict

# ---------------------------------------------------------------- unknown characters


def test_unknown_prefix_characters_are_listed_or_skipped(workdir):
    run = train_tiny("raw", "data.preset=raw")
    one_line_error(cli("predict", "the time ☃ machine", "--run", run), "☃",
                   "--unknown skip")
    r = cli("predict", "the time ☃☃ machine", "--run", run, "--unknown", "skip")
    assert r.exit_code == 0, r.output
    assert "dropped 2 character(s)" in r.stderr
    assert r.stdout.startswith("the time  machine")
    one_line_error(cli("predict", "☃☃", "--run", run, "--unknown", "skip"),
                   "empty after", "dropping unknown characters")


# ---------------------------------------------------------------- the bytes preset

CHINESE = ("時間旅行者向我們講述一個深奧的問題。他的灰色眼睛閃閃發光，平時蒼白的臉色也泛起紅暈。"
           "爐火熊熊燃燒，銀色百合花形的白熾燈發出柔和的光，照著我們杯中的氣泡。\n")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_bytes_round_trip_any_text(text):
    v = ByteVocab()
    ids = v.encode(preprocess(text, "bytes", False))
    assert ids == list(text.encode("utf-8")) and v.decode(ids) == text
    assert len(char_ends(ids)) == len(text)
    assert vocab_from_dict(v.to_dict()).idx_to_token == v.idx_to_token


def test_bytes_decode_holds_back_a_cut_character_and_marks_invalid_bytes():
    v = ByteVocab()
    data = "漢字".encode()
    assert v.decode(data[:-1]) == "漢"  # the cut 字 is held back, not printed as garbage
    assert v.decode(data[:-2] + data[-2:]) == "漢字"
    assert v.decode([0xFF, 0x61]) == "\ufffda"


def test_a_byte_level_model_trains_and_samples_on_chinese(workdir):
    Path("zh.txt").write_text(CHINESE * 60, encoding="utf-8")
    run = train_tiny("zh", "data.preset=bytes", "data.dataset=null", "data.path=zh.txt",
                     "data.max_tokens=null", "train.sample_prefixes=['時間']")
    r = cli("predict", "旅行者", "--run", run, "-n", "40")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("旅行者") and "\ufffd" not in r.stdout[:3]
    r = cli("evaluate", "--run", run)
    assert "bits/byte" in r.output and "per character: ppl" in r.output
    assert "uniform ppl 256.0" in r.output  # 256 byte values, none of them <unk>
    summary = json.loads((run / "summary.json").read_text())
    assert summary["uniform_ppl"] == 256
    r = cli("gates", "時間旅行", "--run", run)
    assert r.exit_code == 0 and "時間旅行" in r.output
    assert cli("data", "info", "data.preset=bytes").exit_code == 0


def test_the_bytes_preset_refuses_vocabulary_settings(workdir):
    one_line_error(cli("train", "-c", "configs/tiny.yaml", "data.preset=bytes",
                       "data.min_freq=2"), "256 byte values")


# ---------------------------------------------------------------- fine-tuning


def test_init_from_loads_exactly_the_source_weights(workdir):
    from gru_lm.building import build_trainer
    from gru_lm.checkpoint import load_checkpoint
    from gru_lm.config import load_config
    from gru_lm.data import load_corpus

    source = train_tiny("src", "data.preset=bytes")
    Path("zh.txt").write_text(CHINESE * 60, encoding="utf-8")
    cfg = load_config(Path("configs/tiny.yaml"), [
        "data.preset=bytes", "data.dataset=null", "data.path=zh.txt", "data.max_tokens=null",
        f"train.init_from={source}"])
    trainer = build_trainer(cfg, load_corpus(cfg.data))
    want = load_checkpoint(source / "checkpoints" / "best.pt")["model"]
    got = trainer.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    r = cli("train", "-c", "configs/tiny.yaml", "--name", "ft", "--init-from", source,
            "data.preset=bytes", "data.dataset=null", "data.path=zh.txt",
            "data.max_tokens=null", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(Path("runs/ft/summary.json").read_text())["init_from"] == str(source)
    assert yaml.safe_load(Path("runs/ft/config.yaml").read_text())["train"]["init_from"] == \
        str(source)


def test_init_from_refuses_another_vocabulary_or_shape_and_leaves_no_run(workdir):
    source = train_tiny("src")
    one_line_error(cli("train", "-c", "configs/tiny.yaml", "--name", "a", "--init-from",
                       source, "data.preset=raw"), "--init-from", "vocabulary")
    one_line_error(cli("train", "-c", "configs/tiny.yaml", "--name", "b", "--init-from",
                       source, "model.num_hiddens=64"), "--init-from", "model.num_hiddens")
    one_line_error(cli("train", "--resume", source, "--init-from", source), "--init-from")
    assert sorted(p.name for p in Path("runs").iterdir()) == ["src"]


# ---------------------------------------------------------------- Chinese as characters


def _is_chinese(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


def test_a_chinese_text_trains_as_characters(workdir):
    """The raw preset: one token per character of a classical text; the samples start from
    the text's own first words (not "time traveller") and are valid Chinese; predict's -n
    counts characters; evaluate scores per character."""
    r = cli("train", "--config", "configs/tiny.yaml", *ZH, "--name", "zh", "model.name=lstm",
            "model.num_hiddens=64", "train.max_steps=60", "train.eval_interval=30",
            "train.sample_interval=60", "train.sample_length=40")
    assert r.exit_code == 0, r.output
    text = CLASSICS.read_text(encoding="utf-8")
    vocab = json.loads(Path("runs/zh/vocab.json").read_text(encoding="utf-8"))
    assert len(vocab["idx_to_token"]) == len(set(text.rstrip("\n"))) + 1  # + <unk>
    samples = Path("runs/zh/samples.txt").read_text(encoding="utf-8")
    assert "time traveller" not in samples
    first = re.findall(r"step \d+: (.*?)(?=\nstep \d+: |\Z)", samples, re.S)[0]
    assert first.startswith(text[:4])  # "论语·学": the training split's first characters
    assert sum(map(_is_chinese, first)) > 20, first  # (its line breaks are the text's)
    r = cli("predict", "子曰", "--run", "runs/zh", "-n", "30")
    assert r.exit_code == 0, r.output
    out = r.stdout.rstrip("\n")
    assert out.startswith("子曰") and len(out) == 2 + 30, out  # characters, not bytes
    out.encode("utf-8").decode("utf-8")
    r = cli("evaluate", "--run", "runs/zh")
    assert r.exit_code == 0 and "bits/char" in r.output, r.output


def test_prefixes_come_from_the_text_unless_set_or_the_time_machine(workdir):
    """train.sample_prefixes unset: the book's two on The Time Machine; on any other text the
    first words of its training split and of its middle, for every preset; set: as given."""
    from types import SimpleNamespace

    from gru_lm.config import load_config
    from gru_lm.data import load_corpus
    from gru_lm.sampling import TIME_MACHINE_PREFIXES, run_prefixes

    english = "The quick brown fox jumps over the lazy dog.\n" * 40
    Path("en.txt").write_text(english, encoding="utf-8")
    Path("zh.txt").write_text(CHINESE * 20, encoding="utf-8")
    cases = [([], list(TIME_MACHINE_PREFIXES)),
             (["data.dataset=null", "data.path=en.txt", "data.preset=raw"],
              ["The quick", "The quick"]),
             (["data.dataset=null", "data.path=en.txt"], ["the quick", "the quick"]),
             (["data.dataset=null", "data.path=zh.txt", "data.preset=raw"],
              [CHINESE[:4]]),
             (["data.dataset=null", "data.path=zh.txt", "data.preset=bytes"], [CHINESE[:4]]),
             (["data.dataset=null", "data.path=en.txt", "train.sample_prefixes=['x']"], ["x"])]
    for overrides, expected in cases:
        cfg = load_config(Path("configs/tiny.yaml"), overrides)
        corpus = load_corpus(cfg.data, progress=False)
        got = run_prefixes(cfg, corpus)
        assert got[0] == expected[0], (overrides, got)
        if not any("sample_prefixes" in o for o in overrides) and overrides:
            middle = corpus.vocab.decode(corpus.train[len(corpus.train) // 2:][:400].tolist())
            assert all(p.split()[0] in middle or p in CHINESE for p in got), (overrides, got)
    empty = SimpleNamespace(train=torch.zeros(0, dtype=torch.long), vocab=ByteVocab())
    cfg = load_config(Path("configs/tiny.yaml"), ["data.dataset=null", "data.path=en.txt"])
    assert run_prefixes(cfg, empty) == []


def test_data_info_shows_the_vocabulary_and_what_becomes_unk(workdir):
    from collections import Counter

    counts = Counter(CLASSICS.read_text(encoding="utf-8").rstrip("\n"))
    rare = [c for c, n in counts.items() if n < 2]
    share = sum(counts[c] for c in rare) / sum(counts.values())
    r = cli("data", "info", "--config", "configs/tiny.yaml", *ZH, "data.min_freq=2")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.replace("│", " ").split())
    assert f"vocabulary size {len(counts) - len(rare) + 1}" in flat
    assert f"{len(rare)} character(s) seen fewer than 2 times map to <unk>, {share:.2%}" in flat
    r = cli("data", "info", "--config", "configs/tiny.yaml", *ZH)
    assert "data.min_freq 0: every character has a token of its own" in \
        " ".join(r.output.replace("│", " ").split())


def test_runs_with_chinese_names_fit_80_columns_and_nothing_is_cut(tiny_run, monkeypatch):
    """A Chinese character takes two terminal cells: at 80 columns a run named 中文模型 (or a
    longer name) folds onto further lines instead of cutting the model column."""
    from rich.cells import cell_len

    names = ["中文模型", "古文字符模型实验第一次", "tiny"]
    for n in names:
        tiny_run(n)
    monkeypatch.setenv("COLUMNS", "80")
    r = cli("runs")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line[:1] in "┏┃┡│└"]
    assert all(cell_len(line) <= 80 for line in lines), r.output
    assert "…" not in r.output
    rows = [line.split("│") for line in lines if line.startswith("│")]
    assert sum("gru-scratch" in cells[2] for cells in rows) == 3, r.output
    folded = "".join(cells[1].strip() for cells in rows)
    assert all(n in folded for n in names), folded
