"""Any text at all: readable samples by default, unknown prefix characters, the byte-level
preset, and fine-tuning one run from another."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from conftest import cli, one_line_error, train_tiny
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
