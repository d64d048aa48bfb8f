"""Faults, bad input and hostile files: one clear error, non-zero exit, nothing damaged."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, one_line_error, train_tiny

from gru_lm.checkpoint import digest_path, load_checkpoint, save_checkpoint
from gru_lm.errors import CheckpointError
from gru_lm.utils import file_digest

# ---------------------------------------------------------------- checkpoints


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}, "vocab": {}, "step": 1}, path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gru_lm.utils.os.fsync", broken_fsync)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}, "vocab": {},
                         "step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_trainer_reports_a_failed_save_as_one_line(workdir, monkeypatch):
    def broken_save(payload, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gru_lm.trainer.save_checkpoint", broken_save)
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "full", "--quiet")
    one_line_error(r, "No space left on device", "previous checkpoint is intact")


def _wait_for_rewrites(run: Path, proc: subprocess.Popen, count: int) -> None:
    """Return once last.pt's sidecar has changed `count` times: a moment inside training
    that depends on progress, not on the clock (a 10-minute guard catches a hang)."""
    side = run / "checkpoints" / "last.pt.sha256"
    seen, last = 0, None
    deadline = time.monotonic() + 600
    while seen < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training made no progress"
        try:
            now = side.read_bytes()
        except FileNotFoundError:
            now = None
        if now is not None and now != last:
            seen, last = seen + 1, now
        time.sleep(0.005)


@pytest.mark.slow
def test_kill_9_at_many_moments_always_resumable(workdir):
    run = Path("runs") / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "gru_lm", "train", "--quiet"]
    for i in range(3):
        args = (["--config", "configs/tiny.yaml", "--name", run.name] if i == 0
                else ["--resume", str(run)])
        proc = subprocess.Popen(base + args + ["train.max_steps=1000000",
                                               "run.checkpoint_interval=3"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _wait_for_rewrites(run, proc, count=2 + 3 * i)  # later each round
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        ck = load_checkpoint(run / "checkpoints" / "last.pt")  # always complete
        metrics = run / "metrics.jsonl"  # written from step 10 on
        for line in metrics.read_text().splitlines() if metrics.exists() else []:
            json.loads(line)
    r = cli("train", "--resume", str(run), f"train.max_steps={ck['step'] + 4}", "--quiet")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == ck["step"] + 4
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_resume_of_a_folder_that_is_not_a_run_names_it(workdir):
    run = Path("runs") / "empty"
    (run / "checkpoints").mkdir(parents=True)
    one_line_error(cli("train", "--resume", str(run)), "runs/empty", "is not a gru-lm run")


@pytest.mark.parametrize("damage", ["empty", "truncated", "bitflip"])
def test_damaged_checkpoint_is_refused_and_best_still_works(workdir, damage, tiny_run):
    run = tiny_run("dmg")
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    if damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncated":
        last.write_bytes(data[: len(data) // 2])
    else:
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        last.write_bytes(bytes(flipped))
    one_line_error(cli("predict", "time", "--checkpoint", str(last)), str(last))
    one_line_error(cli("train", "--resume", str(run)), str(last))
    r = cli("predict", "time", "--run", str(run))  # uses best.pt
    assert r.exit_code == 0, r.output


def test_truncated_file_with_matching_hash_is_still_refused(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"PK\x03\x04garbage")
    digest_path(path).write_text(f"{file_digest(path, 'sha256')}  x.pt\n")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_malicious(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "gru-lm-checkpoint", "model": _Evil(marker), "config": {},
                "vocab": {}, "step": 0}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    digest_path(path).write_text(f"{file_digest(path, 'sha256')}  {path.name}\n")


def test_malicious_pickle_never_runs(workdir, tiny_run):
    marker = workdir / "pwned"
    run = tiny_run("evil")
    evil = run / "checkpoints" / "last.pt"
    _plant_malicious(evil, marker)
    for args in (["predict", "time", "--checkpoint", str(evil)],
                 ["evaluate", "--checkpoint", str(evil)],
                 ["train", "--resume", str(run)]):
        one_line_error(cli(*args), str(evil), "refused")
    assert not marker.exists()


def test_no_weights_only_false_anywhere():
    src = Path(__file__).resolve().parents[1] / "gru_lm"
    for f in src.rglob("*.py"):
        assert "weights_only=False" not in f.read_text(), f


def _rewrite(path: Path, mutate) -> None:
    ck = load_checkpoint(path)
    mutate(ck)
    ck.pop("format"), ck.pop("version")
    save_checkpoint(ck, path)


@pytest.mark.parametrize("mutate, message", [
    (lambda ck: ck["config"]["model"].update(num_hiddens=64), "field 'config' or 'vocab'"),
    (lambda ck: ck["vocab"].update(idx_to_token=ck["vocab"]["idx_to_token"][:-2]),
     "field 'config' or 'vocab'"),
    (lambda ck: ck["config"]["model"].update(name="lstm-scratch"), "written for another model"),
    (lambda ck: ck["config"]["train"].update(lr=-1), "field 'config'"),
    (lambda ck: ck.update(vocab={"idx_to_token": 3}), "field 'vocab'"),
], ids=["hiddens", "vocab", "model", "bad-config", "bad-vocab"])
def test_mismatched_checkpoint_names_the_field(workdir, mutate, message, tiny_run):
    run = tiny_run("mm")
    best = run / "checkpoints" / "best.pt"
    _rewrite(best, mutate)
    one_line_error(cli("predict", "time", "--checkpoint", str(best)), str(best), message)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(workdir, monkeypatch):
    from gru_lm.trainer import Trainer

    original = Trainer.train_step

    def poisoned(self, X, Y):
        loss = original(self, X, Y)
        return loss * float("nan") if self.progress.step + 1 == 17 else loss

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "nan", "--quiet")
    one_line_error(r, "at step 17", "last good checkpoint")
    ck = load_checkpoint(Path("runs/nan/checkpoints/last.pt"))
    assert ck["step"] == 10


def test_batch_larger_than_data_is_a_clear_error(workdir):
    r = cli("train", "--config", "configs/tiny.yaml", "--quiet", "train.batch_size=500")
    one_line_error(r, "train.batch_size=500", "too few for one batch")
    assert not Path("runs").exists() or not any(Path("runs").iterdir())


# ---------------------------------------------------------------- predict input


@pytest.mark.parametrize("args, message", [
    (["", ], "prefix is empty"),
    (["   "], "prefix is empty"),
    (["time", "--temperature", "0"], "--temperature 0.0 is invalid"),
    (["time", "--temperature", "-1"], "--temperature -1.0 is invalid"),
    (["time", "--temperature", "nan"], "--temperature nan is invalid"),
    (["time", "--temperature", "inf"], "--temperature inf is invalid"),
    (["time", "--top-k", "0"], "--top-k 0 is invalid"),
    (["time", "--top-p", "0"], "--top-p 0.0 is invalid"),
    (["time", "--top-p", "1.5"], "--top-p 1.5 is invalid"),
    (["time", "--num-chars", "0"], "--num-chars 0 is out of range"),
    (["time", "--num-chars", "10001"], "--num-chars 10001 is out of range; give 1..10000"),
    (["time", "--num-samples", "0"], "--num-samples 0 is out of range"),
])
def test_predict_argument_errors_come_before_loading(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # no runs/ here: argument errors must come first
    one_line_error(cli("predict", *args), message)


def test_predict_without_any_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("predict", "time"), "no trained run found under runs/")


def test_predict_unknown_characters_are_listed(workdir):
    run = train_tiny("raw", "data.preset=raw")
    one_line_error(cli("predict", "Time§€", "--run", str(run)), "outside the vocabulary",
                   "'§€'")


# ---------------------------------------------------------------- custom corpora


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\xff\xfe\x00bad", "is not UTF-8"),
    (b"time traveller time traveller", "too few for one batch"),
])
def test_bad_custom_corpus(workdir, content, message):
    (workdir / "c.txt").write_bytes(content)
    r = cli("train", "--config", "configs/tiny.yaml", "--quiet", "data.path=c.txt",
            "data.dataset=null")
    one_line_error(r, message)


def test_missing_custom_corpus(workdir):
    r = cli("train", "--config", "configs/tiny.yaml", "--quiet", "data.path=nope.txt")
    one_line_error(r, "data.path nope.txt is not a file")


def test_config_errors_through_the_cli(workdir):
    r = cli("train", "--config", "configs/tiny.yaml", "train.lr=0", "train.optimiser=sgd",
            "model.name=gruu")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "train.lr: 0 is invalid" in r.output
    assert "did you mean 'train.optimizer'" in r.output
    one_line_error(cli("train", "--config", "configs/tiny.yaml", "--quiet", "model.name=gruu"),
                   "unknown model 'gruu'", "gru-scratch")
    one_line_error(cli("train", "--config", "missing.yaml"), "missing.yaml does not exist")


# ---------------------------------------------------------------- determinism


def test_same_seed_twice_gives_identical_runs(workdir, tiny_run):
    a, b = train_tiny("a"), tiny_run("b")  # b: the session's tiny run, same seed
    ca, cb = load_checkpoint(a / "checkpoints/last.pt"), load_checkpoint(b / "checkpoints/last.pt")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k])
    strip = ("tokens_per_s", "elapsed_s", "eta_s")

    def losses(run):
        return [{k: v for k, v in json.loads(x).items() if k not in strip}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(a) == losses(b)
    assert (a / "samples.txt").read_text() == (b / "samples.txt").read_text()


def test_written_files_get_the_usual_mode(tmp_path):
    from gru_lm.utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.txt", "hi")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_resume_with_damaged_vocab_file_is_one_line(workdir, damage, tiny_run):
    run = tiny_run("vocab")
    if damage == "missing":
        (run / "vocab.json").unlink()
    else:
        (run / "vocab.json").write_text("{not json")
    one_line_error(cli("train", "--resume", str(run), "train.max_steps=40"), "vocab.json",
                   "damaged")
