"""Reliability, round 3: no lost run, no silently wrong table, bounded work, every file
untrusted, standard streams, several processes. One section per class of the issue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, one_line_error, reseed, train_tiny

# ---------------------------------------------------------------- 1. a resume never destroys


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("damage", ["missing", "directory", "damaged"])
def test_a_resume_without_a_usable_last_checkpoint_refuses_and_keeps_everything(tiny_run,
                                                                               damage):
    run = tiny_run()
    last = run / "checkpoints" / "last.pt"
    if damage == "missing":
        last.unlink()
    elif damage == "directory":
        last.unlink()
        last.mkdir()
    else:
        last.write_bytes(last.read_bytes()[:100])
    before = _snapshot(run)
    r = cli("train", "--resume", run)
    one_line_error(r, f"--resume {run}")
    if damage != "damaged":
        assert "--name NEW_NAME" in r.output and "left as they are" in r.output
    assert _snapshot(run) == before  # summary, samples, metrics and best.pt untouched


def test_a_finished_run_resumed_with_a_smaller_limit_is_left_alone(tiny_run):
    run = tiny_run()
    before = _snapshot(run)
    for args in (["train.max_steps=10"], []):
        r = cli("train", "--resume", run, *args)
        one_line_error(r, "finished at step 30", "nothing was changed", "train.max_steps=60")
    assert _snapshot(run) == before
    r = cli("train", "--resume", run, "train.max_steps=40", "-q")  # a higher limit trains on
    assert r.exit_code == 0, r.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 40


def test_a_resume_that_cannot_save_leaves_config_yaml_as_it_was(tiny_run, monkeypatch):
    run = tiny_run()
    before = (run / "config.yaml").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gru_lm.trainer.save_checkpoint", disk_full)
    r = cli("train", "--resume", run, "train.max_steps=40", "train.lr=0.002", "-q")
    one_line_error(r, "No space left on device")
    assert (run / "config.yaml").read_bytes() == before


# ---------------------------------------------------------------- 2. checkpoint values


def _rewrite(path: Path, mutate) -> None:
    """Change a checkpoint's payload and write it back with a valid .sha256, as an editor
    who knows the format would."""
    from gru_lm.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(path)
    mutate(ck)
    save_checkpoint({k: v for k, v in ck.items() if k not in ("format", "version")}, path)


def _nan_weight(ck):
    name = next(iter(ck["model"]))
    ck["model"][name] = torch.full_like(ck["model"][name], float("nan"))


@pytest.mark.parametrize("mutate, field", [
    (lambda ck: ck.update(step=-3), "'step'"),
    (lambda ck: ck.update(step=2.5), "'step'"),
    (lambda ck: ck.update(step=True), "'step'"),
    (lambda ck: ck.update(config=["a"]), "'config'"),
    (lambda ck: ck.update(vocab="abc"), "'vocab'"),
    (lambda ck: ck.update(weights="both"), "'weights'"),
    (lambda ck: ck.update(carry_state="x"), "'carry_state'"),
    (lambda ck: ck.update(carry_state=torch.tensor([float("inf")])), "'carry_state'"),
    (lambda ck: ck.update(optimizer=[1, 2]), "'optimizer'"),
    (lambda ck: ck["model"].update({next(iter(ck["model"])): "zeros"}), "'model'"),
    (_nan_weight, "'model'"),
])
def test_checkpoint_fields_of_the_wrong_type_are_named(tiny_run, mutate, field):
    run = tiny_run()
    best = run / "checkpoints" / "best.pt"
    _rewrite(best, mutate)
    one_line_error(cli("predict", "time", "--checkpoint", best), str(best), field)
    last = run / "checkpoints" / "last.pt"
    _rewrite(last, mutate)
    one_line_error(cli("train", "--resume", run, "train.max_steps=40"), field)


def _shapes(ck, key):
    if key == "carry_state":
        ck["carry_state"] = torch.zeros(1, 3, 5)
    elif key == "optimizer":
        state = ck["optimizer"]["state"]
        state[0]["exp_avg"] = torch.zeros(2, 2)
    elif key == "progress":
        ck["progress"]["step"] = -1
    elif key == "progress-nan":
        ck["progress"]["train_time_s"] = float("nan")
    elif key == "progress-extra":
        ck["progress"]["surprise"] = 1


@pytest.mark.parametrize("key", ["carry_state", "optimizer", "progress", "progress-nan",
                                 "progress-extra"])
def test_resume_state_that_does_not_fit_the_model_is_named(tiny_run, key):
    run = tiny_run()
    last = run / "checkpoints" / "last.pt"
    _rewrite(last, lambda ck: _shapes(ck, key))
    (run / "summary.json").unlink()  # as if interrupted
    r = cli("train", "--resume", run, "train.max_steps=40")
    one_line_error(r, str(last), f"field '{key.split('-')[0]}'")


# ---------------------------------------------------------------- 2. one table, one kind


def _copy_run(src: Path, dest: str) -> Path:
    shutil.copytree(src, dest)
    return Path(dest)


def test_compare_runs_with_other_budgets_are_separate_rows_with_the_reason(tiny_run):
    a = tiny_run("a-s0")
    b = train_tiny("a-s1", "train.max_steps=20", "train.seed=1")  # same label, other budget
    r = cli("compare", "--runs", a, b, "--out", "runs/cmp")
    assert r.exit_code == 0, r.output
    result = json.loads(Path("runs/cmp/results.json").read_text())
    rows = [row for row in result["rows"] if row["kind"] == "seeds"]
    assert [row["seeds"] for row in rows] == [1, 1]
    assert rows[0]["model"] != rows[1]["model"]
    assert "train.max_steps" in rows[1]["differs"] and "train.max_steps" in r.output


def test_compare_groups_runs_of_one_config_whatever_their_folders(tiny_run):
    tiny_run("t")
    first = _copy_run("runs/t", "runs/x/first")  # folder names say nothing
    second = train_tiny("second", "train.seed=1")
    r = cli("compare", "--runs", first, second, "--out", "runs/cmp")
    assert r.exit_code == 0, r.output
    rows = json.loads(Path("runs/cmp/results.json").read_text())["rows"]
    assert rows[0]["seeds"] == 2 and rows[1]["kind"] == "ensemble"


def test_compare_counts_one_experiment_once(tiny_run):
    """A copy of a run (or one config trained twice with one seed) is one experiment: as two
    seeds it would give a zero-width interval, so it is refused, naming both folders."""
    base = tiny_run("base")
    copy = _copy_run(base, "runs/basecopy")
    r = cli("compare", "--runs", base, copy, "--out", "runs/cmp")
    one_line_error(r, "runs/base and runs/basecopy are one experiment", "train.seed 0")
    assert not Path("runs/cmp").exists()
    reseed(copy, 1)  # another seed's run of the same recipe: two seeds
    r = cli("compare", "--runs", base, copy, "--out", "runs/cmp")
    assert r.exit_code == 0, r.output


def test_compare_refuses_two_configs_of_one_recipe_before_training(workdir):
    Path("configs/same.yaml").write_text(Path("configs/tiny.yaml").read_text()
                                         .replace("sample_length: 20", "sample_length: 30"))
    r = cli("compare", "configs/tiny.yaml", "configs/same.yaml", "--out", "runs/cmp")
    one_line_error(r, "configs/tiny.yaml and configs/same.yaml are the same recipe")
    assert not Path("runs/cmp").exists()


def test_compare_refuses_runs_of_another_corpus(tiny_run):
    a = tiny_run("a")
    b = train_tiny("raw", "data.preset=raw")
    one_line_error(cli("compare", "--runs", a, b, "--out", "runs/cmp"), "runs/raw")
    c = train_tiny("longer", "data.max_tokens=6000")
    one_line_error(cli("compare", "--runs", a, c, "--out", "runs/cmp2"), "runs/longer",
                   "other data")


def test_compare_resume_refuses_a_member_of_an_edited_config(workdir):
    args = ("compare", "configs/tiny.yaml", "--seeds", "2", "--epochs", "1", "--out", "c")
    assert cli(*args).exit_code == 0
    edited = Path("configs/tiny.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
    Path("configs/tiny.yaml").write_text(edited)
    before = _snapshot(Path("c"))
    one_line_error(cli(*args, "--resume"), "c/tiny-s0", "train.lr", "another --out")
    assert _snapshot(Path("c")) == before


# ---------------------------------------------------------------- 3. bounded work


def test_config_from_a_device_is_read_up_to_its_limit(workdir):
    one_line_error(cli("train", "--config", "/dev/zero"), "/dev/zero", "over 1,048,576 bytes")
    one_line_error(cli("config", "show", "--config", "/dev/urandom"), "/dev/urandom")


def test_text_from_a_device_is_read_up_to_its_limit(tiny_run, monkeypatch):
    run = tiny_run()
    monkeypatch.setattr("gru_lm.data.MAX_TEXT_BYTES", 1 << 20)
    one_line_error(cli("evaluate", "--run", run, "--text", "/dev/zero"), "--text /dev/zero",
                   "over 1,048,576 bytes")
    one_line_error(cli("evaluate", "--run", run, "--text", "/dev/urandom"), "/dev/urandom")
    one_line_error(cli("predict", "--run", run, "--prefix-file", "/dev/zero"),
                   "over 10,000,000 characters")


def test_a_long_text_is_scored_without_holding_its_characters(tiny_run, data_dir):
    run = tiny_run()
    book = (data_dir / "timemachine.txt").read_text()
    Path("long.txt").write_text(book * 12)  # 2.1 MB
    r = cli("evaluate", "--run", run, "--text", "long.txt")
    assert r.exit_code == 0, r.output
    assert "long.txt: 2,04" in r.output and "references (counted" in r.output


@pytest.mark.slow
def test_the_longest_prefix_with_the_most_samples(tiny_run):
    from gru_lm.decoding import MAX_SAMPLES
    from gru_lm.sampling import MAX_PREFIX_CHARS

    run = tiny_run()
    Path("p.txt").write_text("the time machine " * (MAX_PREFIX_CHARS // 17))
    r = cli("predict", "--run", run, "--prefix-file", "p.txt", "--num-samples", MAX_SAMPLES,
            "-n", 3, "--seed", 1)
    assert r.exit_code == 0, r.output[-300:]
    assert len(r.stdout.splitlines()) == MAX_SAMPLES


@pytest.mark.slow
def test_gates_refuses_texts_it_cannot_show(tiny_run):
    from gru_lm.gatereport import MAX_CHARS, MAX_FIGURE_CHARS

    run = tiny_run()
    one_line_error(cli("gates", "a" * (MAX_CHARS + 1), "--run", run), "at most 10,000")
    one_line_error(cli("gates", "a" * (MAX_FIGURE_CHARS + 1), "--run", run, "--png", "g.png"),
                   "at most 1,000", "drop --png")
    assert not Path("g.png").exists()
    r = cli("gates", "the time " * (MAX_FIGURE_CHARS // 9), "--run", run, "--png", "g.png")
    assert r.exit_code == 0 and Path("g.png").stat().st_size > 1000


# ---------------------------------------------------------------- 4. run files are untrusted


def _store(tmp_path):
    from gru_lm.config import DataConfig
    from gru_lm.data import load_corpus

    src = tmp_path / "book.txt"
    src.write_text("hello world, the time machine\n" * 40)
    cfg = DataConfig(path=src, dataset=None, cache_dir=tmp_path / "cache")
    corpus = load_corpus(cfg)
    return cfg, corpus, Path(corpus.store).with_suffix(".json")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(extra=1), "'extra' is unknown"),
    (lambda m: m.pop("counts"), "'counts' is missing"),
    (lambda m: m.update(num_tokens="12"), "'num_tokens'"),
    (lambda m: m.update(num_tokens=True), "'num_tokens'"),
    (lambda m: m.update(dtype="float64"), "'dtype'"),
    (lambda m: m["stats"].update(raw_chars=-1), "'stats'"),
    (lambda m: m["stats"].update(more=0), "'stats'"),
    (lambda m: m.update(counts=[["a", "b"]]), "'counts'"),
    (lambda m: m.update(idx_to_token=[1, 2]), "'idx_to_token'"),
    (lambda m: m.update(idx_to_token=list(reversed(m["idx_to_token"]))), "'idx_to_token'"),
])
def test_an_edited_token_store_is_prepared_again_and_says_why(tmp_path, edit, field):
    from gru_lm.data import load_corpus

    cfg, corpus, meta_path = _store(tmp_path)
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    again = load_corpus(cfg)
    assert not again.store_reused and field in again.store_note
    assert str(meta_path) in again.store_note
    assert again.fingerprint() == corpus.fingerprint()
    assert load_corpus(cfg).store_reused  # repaired


def test_a_token_store_with_ids_past_its_vocabulary_is_prepared_again(tmp_path):
    from gru_lm.data import load_corpus

    cfg, corpus, _ = _store(tmp_path)
    before = corpus.fingerprint()
    data = bytearray(Path(corpus.store).read_bytes())
    data[5] = 200  # same size, an id no vocabulary of this text has
    Path(corpus.store).write_bytes(bytes(data))
    again = load_corpus(cfg)
    assert "ids past the vocabulary" in again.store_note
    assert again.fingerprint() == before


HUGE = "1" * 5000  # past Python's 4,300-digit limit for int()
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("content", [f'{{"run": "x", "steps": {HUGE}}}', DEEP])
def test_summary_json_with_huge_numbers_or_deep_nesting_is_one_line(tiny_run, content):
    run = tiny_run()
    (run / "summary.json").write_text(content)
    one_line_error(cli("compare", "--runs", run, "--out", "runs/c"), "summary.json")
    other = tiny_run("other")
    r = cli("runs")  # one damaged run does not break the list
    assert r.exit_code == 0 and other.name in r.output and run.name in r.output


@pytest.mark.parametrize("content", [f"train:\n  max_steps: {HUGE}\n", DEEP,
                                     "a:\n" + "".join(f"{' ' * i}b:\n" for i in range(1, 3000))])
def test_config_yaml_with_huge_numbers_or_deep_nesting_is_one_line(tiny_run, content):
    run = tiny_run()
    (run / "config.yaml").write_text(content)
    one_line_error(cli("train", "--resume", run), "config.yaml")
    one_line_error(cli("compare", "--runs", run, "--out", "runs/c"), "config.yaml")
    assert cli("runs").exit_code == 0
    Path("c.yaml").write_text(content)
    one_line_error(cli("config", "show", "--config", "c.yaml"), "c.yaml")
    one_line_error(cli("train", "--config", "configs/tiny.yaml", f"train.max_steps={HUGE}"),
                   "train.max_steps")


@pytest.mark.parametrize("line", [f'{{"kind": "eval", "step": {HUGE}}}', DEEP,
                                  '{"kind": "eval", "step": 10, "train_ppl": 1e308}',
                                  '{"kind": "eval", "step": 10, "train_ppl": 0.5}'])
def test_metrics_with_huge_or_extreme_values(tiny_run, line):
    run = tiny_run()
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    r = cli("plot", run, "--out", "p.png")
    if "e308" in line or "0.5" in line:
        one_line_error(r, "metrics.jsonl", "train_ppl")
    else:  # an unreadable line is skipped, the rest is drawn
        assert r.exit_code == 0, r.output
    assert cli("runs").exit_code == 0


def test_vocab_json_nested_too_deep_is_one_line(tiny_run):
    run = tiny_run()
    (run / "vocab.json").write_text(DEEP)
    (run / "summary.json").unlink()
    one_line_error(cli("train", "--resume", run, "train.max_steps=40"), "vocab.json")


# ---------------------------------------------------------------- 5. streams and names


def _gru_lm(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gru_lm", *args], capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.mark.slow  # (a gru-lm process per case)
@pytest.mark.parametrize("args", [["models"], ["--help"], ["--version"], ["data", "info"]])
def test_a_stdout_that_takes_nothing_is_one_line(workdir, args):
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "gru_lm", *args], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: the output could not be written to stdout (No space")
    closed = subprocess.run(f"{sys.executable} -m gru_lm {' '.join(args)} >&-", shell=True,
                            stderr=subprocess.PIPE, text=True, timeout=300)
    assert closed.returncode == 1 and closed.stderr.startswith("error: ") and \
        "Traceback" not in closed.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["/dev/full", "closed"])
def test_training_goes_on_when_stdout_takes_nothing(workdir, how):
    cmd = f"{sys.executable} -m gru_lm train -c configs/tiny.yaml --name t"
    cmd += " >&-" if how == "closed" else " > /dev/full"
    r = subprocess.run(cmd, shell=True, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning: stdout could not be written" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(Path("runs/t/summary.json").read_text())["steps"] == 30


def test_a_closed_stdin_is_one_line(tiny_run):
    run = tiny_run()
    r = subprocess.run(f"{sys.executable} -m gru_lm predict --prefix-file - --run {run} <&-",
                       shell=True, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: --prefix-file -: stdin is closed")


@pytest.mark.parametrize("name", ["", " ", "a\nb", "a\x1b[31mb", "tab\there", "a/b", "..",
                                  "x" * 201])
def test_run_names_that_are_not_plain_folder_names_are_refused(workdir, name):
    one_line_error(cli("train", "-c", "configs/tiny.yaml", "--name", name), "--name")
    one_line_error(cli("train", "-c", "configs/tiny.yaml", f"run.name={json.dumps(name)}"),
                   "run.name")
    assert not Path("runs").exists() or not any(Path("runs").iterdir())


def test_run_name_on_resume_is_refused_like_name(tiny_run):
    run = tiny_run()
    one_line_error(cli("train", "--resume", run, "run.name=other"), "cannot rename")


# ---------------------------------------------------------------- 6. several processes


def test_resume_commands_name_the_processes():
    from gru_lm.rundir import RunDir

    assert RunDir("runs/a b").resume_command(2) == "gru-lm train --nproc 2 --resume 'runs/a b'"
    assert RunDir("runs/a").resume_command() == "gru-lm train --resume runs/a"


def test_temporary_files_of_a_killed_write_are_removed_on_resume(tiny_run):
    run = tiny_run()
    (run / "summary.json").unlink()
    junk = [run / "checkpoints" / ".last.pt.abc123.tmp", run / ".metrics.jsonl.x1.tmp"]
    for j in junk:
        j.write_bytes(b"half")
    assert cli("train", "--resume", run, "train.max_steps=31", "-q").exit_code == 0
    assert not any(j.exists() for j in junk)


def test_samples_are_not_written_twice_after_a_resume(workdir):
    train_tiny("s", "train.sample_interval=10", "train.max_steps=20")
    samples = Path("runs/s/samples.txt")
    with open(samples, "a") as f:  # as if killed after sampling at 30 but before saving
        f.write("step 30: the time machine\n")
    assert cli("train", "--resume", "runs/s", "train.max_steps=40", "-q").exit_code == 0
    steps = [line.split(":")[0] for line in samples.read_text().splitlines()]
    assert len(steps) == len(set(steps)) * 2  # two prefixes a step, each step once
    assert steps.count("step 30") == 2


@pytest.mark.slow
def test_nproc_with_a_taken_name_is_one_line_before_starting(tiny_run):
    run = tiny_run("taken")
    r = _gru_lm("train", "--nproc", "2", "-c", "configs/tiny.yaml", "--name", "taken")
    assert r.returncode == 1 and r.stderr.count("error:") == 1
    assert "already exists" in r.stderr and str(run) in r.stderr


# ---------------------------------------------------------------- 7. smaller


def test_plot_draws_an_interrupted_run_wherever_it_is_listed(tiny_run):
    done = tiny_run("done")
    cut = tiny_run("cut")
    (cut / "summary.json").unlink()
    for order in ([cut, done], [done, cut]):
        r = cli("plot", *order, "--out", "p.png")
        assert r.exit_code == 0, r.output
        assert "runs/cut is not finished (no summary.json): drawn up to step 30" in r.output


def test_compare_out_that_is_a_run_is_refused(tiny_run):
    run = tiny_run()
    before = _snapshot(run)
    one_line_error(cli("compare", "--runs", run, "--out", run), "is a run folder")
    assert _snapshot(run) == before


def test_empty_reserved_tokens_and_a_min_freq_that_leaves_nothing_are_refused(workdir):
    one_line_error(cli("train", "-c", "configs/tiny.yaml", "data.reserved_tokens=['']"),
                   "data.reserved_tokens", "empty reserved token")
    one_line_error(cli("train", "-c", "configs/tiny.yaml", "data.min_freq=100000000"),
                   "data.min_freq=100,000,000 leaves no character", "lower data.min_freq")
    assert not Path("runs").exists() or not any(Path("runs").iterdir())
