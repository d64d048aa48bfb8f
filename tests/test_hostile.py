"""Hostile input, class by class (issue 12): every number has a range, config input is
bounded, run files are untrusted, resume applies what it records, a run that saved nothing
starts again, outputs never replace what is not a plain file, and every command prints on an
ASCII terminal. Each failure is one `error:` line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import threading
import typing
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli, one_line_error, reseed, train_tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from gru_lm.config import SECTIONS, validate
from gru_lm.errors import ConfigError
from gru_lm.rundir import RunDir
from gru_lm.yamlconf import ECHO, MAX_NODES, apply_overrides, read_yaml

# ---------------------------------------------------------------- 1. every number has a range


def _fields(kind: type) -> list[str]:
    """Every config key whose type is (or may be) `kind`."""
    out = []
    for section, cls in SECTIONS.items():
        for name, field in cls.model_fields.items():
            args = typing.get_args(field.annotation) or (field.annotation,)
            if kind in args:
                out.append(f"{section}.{name}")
    return out


FLOAT_KEYS, INT_KEYS = _fields(float), _fields(int)


def _one(key: str, value) -> dict:
    section, name = key.split(".")
    raw = {"train": {"max_steps": 1}}
    raw.setdefault(section, {})[name] = value
    return raw


def test_the_probe_finds_the_numeric_keys():
    assert {"train.lr", "train.time_budget_s", "model.forget_bias"} <= set(FLOAT_KEYS)
    assert {"train.seed", "train.log_interval", "model.embed_dim"} <= set(INT_KEYS)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(FLOAT_KEYS),
       value=st.sampled_from([float("inf"), float("-inf"), float("nan")]))
def test_non_finite_floats_are_refused_for_every_float_key(key, value):
    with pytest.raises(ConfigError) as info:
        validate(_one(key, value))
    assert key in str(info.value) and "\n" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(INT_KEYS), value=st.integers(min_value=2**63, max_value=2**200))
def test_integers_beyond_64_bits_are_refused_for_every_int_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_one(key, value))


def test_yaml_infinity_in_a_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 10\n  time_budget_s: .inf\n")
    with pytest.raises(ConfigError, match="train.time_budget_s"):
        validate(read_yaml(path), str(path))


@pytest.mark.parametrize("override, key", [
    ("train.seed=18446744073709551616", "train.seed"),
    ("train.log_interval=1000000000000000000", "train.log_interval"),
    ("train.lr=1e38", "train.lr"),
    ("train.weight_decay=1e300", "train.weight_decay"),
    ("model.forget_bias=1e30", "model.forget_bias"),
    ("train.time_budget_s=1e300", "train.time_budget_s"),
])
def test_out_of_range_training_values_are_one_line_errors(workdir, override, key):
    one_line_error(cli("train", "-c", "configs/tiny.yaml", "--name", "x", override), key)
    assert not Path("runs/x").exists()


def test_a_model_that_cannot_fit_in_memory_is_refused_before_allocation(workdir):
    r = cli("train", "-c", "configs/tiny.yaml", "--name", "big", "model.num_layers=16",
            "model.num_hiddens=16384")
    one_line_error(r, "model.num_hiddens=16384", "GiB", "lower model.num_hiddens")
    assert not Path("runs/big").exists()


@pytest.mark.parametrize("args, part", [
    (["models", "--num-hiddens", "0"], "--num-hiddens 0 is out of range"),
    (["models", "--num-hiddens", "100000000000000000000"], "--num-hiddens"),
    (["models", "--vocab-size", "0"], "--vocab-size 0 is out of range"),
    (["models", "--vocab-size", "1000000000"], "--vocab-size"),
    (["data", "info", "--top", "-1"], "--top -1 is out of range"),
    (["compare", "configs/tiny.yaml", "--budget-s", "inf"], "--budget-s inf is invalid"),
])
def test_cli_numbers_have_ranges(workdir, args, part):
    one_line_error(cli(*args), part)


@pytest.mark.parametrize("args, part", [
    (["--temperature", "1e-50"], "--temperature"),  # 0 in float32
    (["--temperature", "1e39"], "--temperature"),  # inf in float32
    (["--top-p", "1e-50"], "--top-p"),
    (["--seed", "18446744073709551616"], "--seed"),
    (["--seed", "-1"], "--seed"),
])
def test_sampling_values_that_break_float32_or_the_generator_are_refused(tiny_run, args,
                                                                          part):
    run = tiny_run()
    one_line_error(cli("predict", "time", "--run", run, *args), part)


def test_the_smallest_temperature_the_message_names_is_accepted(tiny_run):
    from gru_lm.decoding import MIN_TEMPERATURE

    r = cli("predict", "time", "--run", tiny_run(), "--temperature", f"{MIN_TEMPERATURE:g}")
    assert r.exit_code == 0, r.output
    below = cli("predict", "time", "--run", "runs/tiny", "--temperature", "9e-7")
    one_line_error(below, f"give a number from {MIN_TEMPERATURE:g}")


# ---------------------------------------------------------------- 2. config input is bounded


def _alias_bomb(depth: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines)


def test_yaml_aliases_that_expand_to_millions_of_nodes_are_refused(tmp_path):
    path = tmp_path / "bomb.yaml"
    bomb = _alias_bomb().replace("\n", "\n    ")  # 10**9 values inside one config key
    path.write_text(f"train:\n  max_steps: 1\n  sample_prefixes:\n    {bomb}\n")
    with pytest.raises(ConfigError, match=f"more than {MAX_NODES:,} values"):
        validate(read_yaml(path), str(path))


def test_an_alias_bomb_in_an_override_is_refused():
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    with pytest.raises(ConfigError, match="more than"):
        apply_overrides({}, [f"train.sample_prefixes=[{', '.join(levels)}]"])


@settings(max_examples=30, deadline=None)
@given(text=st.text(min_size=ECHO * 3, max_size=5000))
def test_errors_never_echo_more_than_a_few_hundred_characters(text):
    for raw in ({"train": {"max_steps": 1, "optimizer": text}},
                {"train": {"max_steps": 1, text: 1}}):
        with pytest.raises(ConfigError) as info:
            validate(raw)
        assert len(str(info.value)) < 600


def test_a_long_prefix_is_not_echoed_whole(tiny_run):
    r = cli("predict", "é" * 5000, "--run", tiny_run())
    one_line_error(r, "is empty after the 'd2l' preprocessing")
    assert len(r.output) < 600


# ---------------------------------------------------------------- 3. run files are untrusted


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(st.one_of(
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.dictionaries(st.sampled_from(["step", "kind", "val_ppl", "train_ppl", "elapsed_s"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=5), st.lists(st.integers(), max_size=2)),
                    ).map(json.dumps)), max_size=8))
def test_metrics_records_are_typed_whatever_the_file_holds(tmp_path_factory, lines):
    run = RunDir(tmp_path_factory.mktemp("run"))
    run.metrics.write_text("\n".join(lines), encoding="utf-8", errors="replace")
    for rec in run.records():
        assert isinstance(rec["step"], int) and not isinstance(rec["step"], bool)
        for k, v in rec.items():
            assert isinstance(v, str) if k == "kind" else (
                isinstance(v, int | float) and not isinstance(v, bool) and v == v
                and abs(v) != float("inf")), (k, v)


def test_compare_reads_edited_metrics_and_summary(tiny_run, tmp_path):
    a, b = tiny_run("a"), reseed(tiny_run("b"), 1)
    (a / "metrics.jsonl").write_bytes(os.urandom(2000))
    (b / "metrics.jsonl").write_text('{"step": 1, "kind": "eval", "val_ppl": "abc"}\n'
                                     '{"step": 2, "kind": "eval", "val_ppl": [1]}\n')
    summary = json.loads((b / "summary.json").read_text())
    summary.update(best_val_ppl="x", tokens_per_s=None, model=5, stop_reason=[1])
    (b / "summary.json").write_text(json.dumps(summary))
    r = cli("compare", "--runs", a, b, "--out", tmp_path / "cmp")
    assert r.exit_code == 0, r.output
    one_line_error(cli("plot", b), "no evaluation has a numeric train_ppl")


@pytest.mark.parametrize("content", [os.urandom(200), b"\xff\xfe\n\n", b"not a hash\n"])
def test_a_damaged_sha256_sidecar_is_named(tiny_run, content):
    run = tiny_run()
    (run / "checkpoints" / "best.pt.sha256").write_bytes(content)
    one_line_error(cli("predict", "time", "--run", run), "best.pt.sha256", "is damaged")


def test_vocab_json_must_agree_with_the_checkpoint(tiny_run):
    run = tiny_run()
    vocab = json.loads((run / "vocab.json").read_text())
    tokens = vocab["idx_to_token"]
    tokens[1], tokens[2] = tokens[2], tokens[1]
    (run / "vocab.json").write_text(json.dumps(vocab))
    one_line_error(cli("train", "--resume", run, "train.max_steps=40"), "vocab.json",
                   "does not match the vocabulary")


def test_an_edited_config_yaml_is_refused_on_resume(tiny_run):
    run = tiny_run()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["max_tokens"] = 4000
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    one_line_error(cli("train", "--resume", run, "train.max_steps=40"),
                   "disagrees with its checkpoint on data.max_tokens")


def test_a_checkpoint_from_before_a_config_key_existed_still_resumes(tiny_run):
    from gru_lm.checkpoint import load_checkpoint, save_checkpoint

    run = tiny_run()
    last = run / "checkpoints" / "last.pt"
    ck = load_checkpoint(last)
    del ck["config"]["model"]["tie_weights"], ck["data_fingerprint"]  # as an older gru-lm
    save_checkpoint(ck, last)
    r = cli("train", "--resume", run, "train.max_steps=40", "-q")
    assert r.exit_code == 0, r.output


def test_a_changed_corpus_file_is_refused_on_resume(workdir):
    Path("book.txt").write_text("the quick brown fox jumps over the lazy dog " * 200)
    run = train_tiny("own", "data.dataset=null", "data.path=book.txt", "data.max_tokens=null")
    Path("book.txt").write_text("the quick brown fox jumps over the lazy cat " * 200)
    one_line_error(cli("train", "--resume", run, "train.max_steps=40"),
                   "not the text this run was trained on")


# ---------------------------------------------------------------- 4. resume applies what it records


def test_resume_applies_weight_decay_to_the_optimizer(tiny_run):
    run = tiny_run()
    r = cli("train", "--resume", run, "train.max_steps=40", "train.weight_decay=0.25", "-q")
    assert r.exit_code == 0, r.output
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {g["weight_decay"] for g in ck["optimizer"]["param_groups"]} == {0.25}
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["weight_decay"] == 0.25


def test_resume_refuses_another_optimizer_and_keeps_config_yaml(tiny_run):
    run = tiny_run()
    before = (run / "config.yaml").read_bytes()
    one_line_error(cli("train", "--resume", run, "train.optimizer=sgd"), "train.optimizer")
    assert (run / "config.yaml").read_bytes() == before


def test_a_failed_resume_leaves_config_yaml_as_it_was(tiny_run, monkeypatch):
    run = tiny_run()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    before = (run / "config.yaml").read_bytes()
    one_line_error(cli("train", "--resume", run, "train.max_steps=40",
                       "train.tensorboard=true"), "train.tensorboard needs the tensorboard")
    assert (run / "config.yaml").read_bytes() == before
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")
    assert cli("train", "--resume", run, "train.max_steps=40", "-q").exit_code == 0


def test_resume_refuses_name(tiny_run):
    run = tiny_run()
    one_line_error(cli("train", "--resume", run, "--name", "other"), "--name cannot rename")


# ---------------------------------------------------------------- 6. a run that saved nothing


def test_a_run_that_diverged_before_its_first_checkpoint_starts_again(workdir):
    r = cli("train", "-c", "configs/tiny.yaml", "--name", "nan", "train.optimizer=sgd",
            "train.lr=1000", "train.grad_clip=null", "-q")
    one_line_error(r, "no checkpoint had been saved yet", "train.lr (now 1000)",
                   "gru-lm train --resume runs/nan")
    assert "was kept" not in r.output
    r = cli("train", "--resume", "runs/nan", "train.lr=0.01", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads(Path("runs/nan/summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens_per_s"] > 0


@pytest.mark.slow
def test_a_closed_stdout_does_not_stop_training(workdir):
    proc = subprocess.Popen([sys.executable, "-m", "gru_lm", "train", "-c", "configs/tiny.yaml",
                             "--name", "piped", "train.max_steps=200"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"run directory")
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(Path("runs/piped/summary.json").read_text())["steps"] == 200


# ---------------------------------------------------------------- 8. outputs


def test_a_symlinked_output_replaces_the_target_and_keeps_the_link(tiny_run):
    run = tiny_run()
    Path("target.png").write_text("old")
    Path("link.png").symlink_to("target.png")
    assert cli("plot", run, "--out", "link.png").exit_code == 0
    assert Path("link.png").is_symlink()
    assert Path("target.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in Path(".").iterdir() if p.name.endswith(".tmp")]


def test_a_fifo_output_is_written_through(tiny_run):
    run = tiny_run()
    os.mkfifo("gates.fifo")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(Path("gates.fifo").read_bytes()))
    reader.start()
    r = cli("gates", "time", "--run", run, "--json", "gates.fifo")
    reader.join(timeout=60)
    assert r.exit_code == 0, r.output
    assert stat.S_ISFIFO(os.stat("gates.fifo").st_mode)
    assert json.loads(got[0])["text"] == "time"


@pytest.mark.parametrize("out, part", [
    ("missing/dir/x.png", "the folder missing/dir does not exist"),
    (".", "is a folder"),
])
def test_bad_output_paths_are_named(tiny_run, out, part):
    one_line_error(cli("plot", tiny_run(), "--out", out), part)
    assert not Path("missing").exists()


# ---------------------------------------------------------------- 9. compare


def test_compare_refuses_the_same_run_twice(tiny_run, tmp_path):
    run = tiny_run()
    one_line_error(cli("compare", "--runs", run, f"./{run}", "--out", tmp_path / "c"),
                   "given twice")


def test_a_comparison_that_fails_to_start_leaves_no_folder(workdir):
    one_line_error(cli("compare", "configs/tiny.yaml", "--out", "cmp", "--budget-s", "1e11"),
                   "train.time_budget_s")  # refused before anything is trained
    assert not Path("cmp").exists()
    cfg = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    cfg["data"].update(dataset=None, path="missing.txt")
    Path("configs/nodata.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("compare", "configs/nodata.yaml", "--out", "cmp")  # fails in the first member
    assert r.exit_code == 1 and "error: data.path missing.txt is not a file" in r.output
    assert not Path("cmp").exists()


def test_compare_samples_use_the_members_prefixes(workdir, tmp_path):
    run = train_tiny("pref", "train.sample_prefixes=[the]")
    assert cli("compare", "--runs", run, "--out", tmp_path / "c").exit_code == 0
    samples = (tmp_path / "c" / "samples.md").read_text()
    assert "- prefix `the`, continued:" in samples and "time traveller" not in samples


# ---------------------------------------------------------------- 10. encodings and terminals


@pytest.mark.slow
@pytest.mark.parametrize("command", [["gates", "time"], ["compare", "--runs"]])
def test_every_command_prints_on_an_ascii_terminal(tiny_run, tmp_path, command):
    run = tiny_run()
    args = ([*command, str(run), "--out", str(tmp_path / "c")] if "compare" in command
            else [*command, "--run", str(run)])
    env = dict(os.environ, PYTHONIOENCODING="ascii", LANG="C", LC_ALL="C")
    r = subprocess.run([sys.executable, "-m", "gru_lm", *args], env=env, capture_output=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert b"Traceback" not in r.stderr


def test_the_resume_hint_survives_pasting_into_a_shell(workdir):
    train_tiny("my run")
    r = cli("train", "-c", "configs/tiny.yaml", "--name", "my run")
    one_line_error(r, "already exists")
    command = r.output.split("`")[1]
    assert shlex.split(command) == ["gru-lm", "train", "--resume", "runs/my run",
                                    "train.max_steps=60"]  # (finished: train on)


# ---------------------------------------------------------------- 11. round 5 (issue 44)


def test_a_file_that_is_no_checkpoint_is_called_not_a_run(tiny_run):
    import gru_lm

    tiny_run()
    for bad, hint in [("configs/tiny.yaml", "a config trains a new run: gru-lm train --config"),
                      ("notes.txt", "give a run folder")]:
        Path("notes.txt").write_text("hello\n")
        r = cli("predict", "the", "--run", bad)
        one_line_error(r, f"{bad} is not a run folder or a checkpoint", hint)
        assert ".sha256" not in r.output
        with pytest.raises(gru_lm.GruLmError, match="is not a run folder or a checkpoint"):
            gru_lm.load(bad)
    # where a checkpoint is loaded (train.init_from, --resume), not its missing .sha256 either
    from gru_lm.checkpoint import load_checkpoint

    with pytest.raises(gru_lm.GruLmError, match=r"configs/tiny.yaml is not a checkpoint \("):
        load_checkpoint(Path("configs/tiny.yaml"))


def test_a_symbolic_link_loop_is_named_as_one(tiny_run):
    run = tiny_run()
    Path("loop.txt").symlink_to("loop.txt")
    Path("gone.txt").symlink_to("nowhere.txt")
    r = cli("evaluate", "--run", run, "--text", "loop.txt")
    one_line_error(r, "loop.txt is a symbolic link that leads back to itself")
    r = cli("evaluate", "--run", run, "--text", "gone.txt")
    one_line_error(r, "gone.txt is a symbolic link to nowhere.txt, which does not exist")
    r = cli("train", "--config", "loop.txt")
    one_line_error(r, "loop.txt is a symbolic link that leads back to itself")


def test_a_byte_order_mark_is_not_a_token(workdir):
    from gru_lm.config import DataConfig
    from gru_lm.data import load_corpus

    text = "the time machine\n" * 50
    Path("bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    Path("plain.txt").write_text(text)
    for preset in ("raw", "d2l"):
        bom, plain = (load_corpus(DataConfig(dataset=None, path=Path(f), preset=preset),
                                  offline=True) for f in ("bom.txt", "plain.txt"))
        assert "\ufeff" not in bom.vocab.token_to_idx
        assert bom.vocab.token_to_idx == plain.vocab.token_to_idx
        assert torch.equal(bom.train, plain.train)


def test_predict_says_what_a_very_long_draw_costs(tiny_run, monkeypatch):
    import gru_lm.cli

    run = tiny_run()
    monkeypatch.setattr(gru_lm.cli, "BIG_PREDICT", 60)
    r = cli("predict", "the", "--run", run, "-n", "30", "--num-samples", "2")
    assert r.exit_code == 0 and "note: 2 samples × 30 characters is 60 characters to draw" \
        in r.output
    r = cli("predict", "the", "--run", run, "-n", "29", "--num-samples", "2")
    assert r.exit_code == 0 and "note:" not in r.output


@pytest.mark.parametrize("columns", [40, 60, 200])
def test_a_narrow_table_folds_and_keeps_every_column_and_figure(tiny_run, columns):
    from gru_lm.api import runs

    tiny_run("a-run-with-a-rather-long-name")
    tiny_run("short")
    r = subprocess.run([sys.executable, "-m", "gru_lm", "runs"], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": str(columns)}, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = runs()
    assert all(len(line) <= columns for line in r.stdout.splitlines()), r.stdout
    flat = r.stdout.replace("\n", "").replace(" ", "").replace("│", "")
    for row in rows:
        assert row.name.replace("-", "") in flat.replace("-", "")  # folded, never dropped
        assert f"{row.best_val_ppl:.3f}" in r.stdout  # figures whole, on one line
    assert "tok/s" in r.stdout and "status" in r.stdout


def test_a_plot_of_runs_with_chinese_names_says_once_that_no_font_has_them(
        tiny_run, monkeypatch, recwarn):
    from gru_lm import utils
    from gru_lm.plots import plot_runs

    a, b = tiny_run("唐诗"), tiny_run("宋词")
    monkeypatch.setattr(utils, "_FONTS", {})
    monkeypatch.setattr(utils, "CJK_FONTS", ("No Such Font",))
    notes = plot_runs([a, b], Path("p.png"))
    assert [n for n in notes if "no installed font has Chinese characters" in n]
    assert not [w for w in recwarn if "missing from" in str(w.message)]
    assert not [n for n in plot_runs([a], Path("q.png")) if "font" in n]  # said once
    # with a font that has them, nothing to say (DejaVu Sans stands in for one here)
    monkeypatch.setattr(utils, "_FONTS", {})
    monkeypatch.setattr(utils, "CJK_FONTS", ("DejaVu Sans",))
    assert not [n for n in plot_runs([a], Path("r.png")) if "font" in n]


def test_compare_names_members_whose_folders_share_a_name(workdir, tmp_path):
    a = train_tiny("base")
    train_tiny("base", "run.runs_dir=other", "train.lr=0.02")
    b = Path("other/base")
    r = cli("compare", "--runs", a, b, "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    weights = json.loads((tmp_path / "c" / "results.json").read_text())["rows"][-1][
        "member_weights"]
    assert sorted(weights) == ["other/base", "runs/base"]
    import re

    assert re.search(r"weights fitted on val: runs/base [01]\.\d{3}, other/base [01]\.\d{3}",
                     r.output), r.output
