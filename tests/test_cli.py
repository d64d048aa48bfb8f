"""The CLI end to end: data info, models, train -> predict -> evaluate, resume, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, one_line_error, train_tiny


def test_help_does_not_import_torch():
    code = "import sys; from gru_lm.cli import app; sys.argv=['gru-lm','--help']\n" \
           "try:\n    app()\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'; print('OK')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    assert "train" in out.stdout and "predict" in out.stdout


def test_config_show_does_not_import_torch(workdir):
    """`gru-lm config show` reads YAML: the API it calls loads no model code (the result
    types of evaluate and compare, which bring torch, are imported on first use)."""
    code = ("import sys; from gru_lm.cli import app\n"
            "sys.argv=['gru-lm','config','show','--config','configs/tiny.yaml']\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'; print('OK')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout and "num_hiddens: 32" in out.stdout, \
        out.stderr


def test_version():
    r = cli("--version")
    assert r.exit_code == 0 and r.output.startswith("gru-lm 0.")


def test_data_info_table(workdir):
    r = cli("data", "info")
    assert r.exit_code == 0, r.output
    assert "170,580" in r.output and "178,979" in r.output and "153,522" in r.output
    assert "vocabulary size" in r.output and "28" in r.output
    assert "token store" in r.output and "prepared now" in r.output
    again = cli("data", "info")
    assert "reused" in again.output and "prepared now" not in again.output


def test_data_download_uses_the_ready_folder(workdir, data_dir):
    r = cli("data", "download", "--offline")
    assert r.exit_code == 0, r.output
    assert f"{data_dir / 'timemachine.txt'} (found in GRU_LM_DATA_DIR, SHA-1 verified; " \
        "nothing downloaded)" in r.output


def test_models_lists_six_with_parameter_counts():
    r = cli("models")
    assert r.exit_code == 0
    for name in ("gru-scratch", "lstm-scratch", "rnn-scratch", "gru", "lstm", "rnn"):
        assert name in r.output
    assert "226,076" in r.output  # gru-scratch: 3 * (28*256 + 256*256 + 256) + 256*28 + 28


def test_train_predict_evaluate(workdir):
    run = train_tiny("t")
    for f in ("config.yaml", "vocab.json", "metrics.jsonl", "samples.txt", "summary.json",
              "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / f).is_file(), f
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 20, 30]
    assert all(r["val_ppl"] < 28 and r["tokens_per_s"] > 0 for r in recs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["best_test_ppl"] > 1
    r = cli("predict", "Time Traveller!", "-n", "12")
    assert r.exit_code == 0, r.output
    line = r.stdout.rstrip("\n")  # stdout holds the text alone; the run used is on stderr
    assert line.startswith("time traveller") and len(line) == len("time traveller") + 12
    assert r.stderr.startswith("using runs/t/checkpoints/best.pt (the newest run")
    r = cli("predict", "the", "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9",
            "--num-samples", "3", "--seed", "1", "--run", str(run))
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 3
    again = cli("predict", "the", "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9",
                "--num-samples", "3", "--seed", "1", "--run", str(run))
    assert again.output == r.output
    r = cli("evaluate", "--run", str(run))
    assert r.exit_code == 0, r.output
    assert "test split: 499 tokens" in r.output
    assert f"ppl {summary['best_test_ppl']:.3f}" in r.output
    (workdir / "t.txt").write_text("The time machine is a story.\n")
    r = cli("evaluate", "--text", "t.txt")
    assert r.exit_code == 0 and "t.txt: 26 tokens" in r.output


def test_existing_run_is_never_overwritten(workdir, tiny_run):
    run = tiny_run("same")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "same", "--quiet")
    assert r.exit_code == 1
    assert "already exists" in r.output and "--resume runs/same" in r.output
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    # finished: the hint trains it on, and works when pasted
    command = r.output.split("`")[1]
    assert command == "gru-lm train --resume runs/same train.max_steps=60", r.output
    again = cli(*command.split()[1:], "--quiet")
    assert again.exit_code == 0, again.output


def test_a_run_name_with_spaces_around_it_is_refused(workdir):
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "trail ")
    assert r.exit_code != 0 and "begins or ends with a space" in r.output
    assert "'trail'" in r.output and not Path("runs/trail ").exists()


def _eval_losses(run: Path):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_ppl"], r.get("val_ppl"), r.get("ema_val_ppl")) for r in recs]


def _final_state(run: Path):
    from gru_lm.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.pt")


@pytest.mark.parametrize("extra", [
    [],
    ["model.dropout=0.3", "model.num_layers=2", "train.sampler=random"],
    ["model.dropout=0.3", "model.locked_dropout=true", "model.weight_drop=0.3",
     "train.ema_decay=0.9"],
    ["model.name=lstm", "model.softmax=adaptive", "model.cutoffs=[5,12,20]"],
], ids=["sequential", "dropout-random", "regularized-ema", "adaptive-softmax"])
def test_resume_is_exact(workdir, extra):
    straight = train_tiny("straight", "train.max_steps=40", *extra)
    part = train_tiny("part", "train.max_steps=20", *extra)
    r = cli("train", "--resume", str(part), "train.max_steps=40", "--quiet")
    assert r.exit_code == 0, r.output
    a, b = _final_state(straight), _final_state(part)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _eval_losses(straight) == _eval_losses(part)


def test_resume_refuses_architecture_change(workdir, tiny_run):
    run = tiny_run("arch")
    r = cli("train", "--resume", str(run), "model.num_hiddens=64", "--quiet")
    assert r.exit_code == 1
    assert "model.num_hiddens (32 in the run, 64 now)" in r.output


def _start_training(name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gru_lm", "train", "--config", "configs/tiny.yaml", "--name",
         name, "--quiet", "train.max_steps=1000000", "train.eval_interval=50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_first_eval(run: Path, proc: subprocess.Popen) -> None:
    """Until metrics.jsonl holds the step-50 evaluation (a 10-minute guard catches a hang)."""
    deadline = time.monotonic() + 600
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_prints_resume_command(workdir, sig, code):
    run = Path("runs") / f"sig{code}"
    proc = _start_training(run.name)
    _wait_for_first_eval(run, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, (out, err)
    assert f"resume with: gru-lm train --resume {run}" in err
    assert "interrupted: " in err and "error:" not in err  # a stop the user asked for
    assert "Traceback" not in err
    ck = _final_state(run)
    assert ck["step"] >= 50
    r = cli("train", "--resume", str(run), f"train.max_steps={ck['step'] + 5}", "--quiet")
    assert r.exit_code == 0, r.output
    assert _final_state(run)["step"] == ck["step"] + 5


@pytest.mark.parametrize("model", ["gru-scratch", "gru"])
def test_bf16_autocast_trains_on_cpu(workdir, model):
    run = train_tiny(f"bf16-{model}", "train.precision=bf16", f"model.name={model}")
    summary = json.loads((run / "summary.json").read_text())
    assert 1 < summary["best_val_ppl"] < 28
    # nn.GRU: autocast; gru-scratch: bf16 operands in its own GEMMs, kernels or loops.
    assert "bf16" in summary["kernels"], summary["kernels"]


def test_a_wrong_bf16_gemm_pin_is_refused_before_anything_is_written(workdir, monkeypatch):
    monkeypatch.setenv("GRU_LM_BF16_GEMM", "fastest")
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "pin", "train.precision=bf16",
            "model.name=gru-scratch")
    assert r.exit_code == 1
    assert "GRU_LM_BF16_GEMM='fastest' is not a bf16 GEMM this build has; use one of " \
        "mkl, sgemm or unset it" in r.output
    assert "Traceback" not in r.output and not (workdir / "runs" / "pin").exists()
    # fp32 runs ignore the pin
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "pin32", "-q",
            "train.max_steps=2")
    assert r.exit_code == 0, r.output


def test_unavailable_device_is_a_config_error(workdir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # CI never has a GPU, so this runs there
    r = cli("train", "--config", "configs/tiny.yaml", "-q", "train.device=cuda")
    assert r.exit_code == 1
    assert "train.device: 'cuda' is not available" in r.output


def test_runs_lists_every_run_newest_first_with_its_status(tiny_run):
    old, new = tiny_run("old"), tiny_run("new")
    for f in old.rglob("*"):
        os.utime(f, (1_000_000, 1_000_000))
    (new / "summary.json").unlink()  # stopped before the end: a checkpoint, no summary
    Path("runs/empty").mkdir()  # not a run: no config.yaml
    r = cli("runs")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if "│ new" in x or "│ old" in x]
    assert "│ new" in lines[0] and "interrupted" in lines[0]
    assert "│ old" in lines[1] and "finished" in lines[1] and "gru-scratch" in lines[1]
    summary = json.loads((old / "summary.json").read_text())
    assert f"{summary['best_val_ppl']:.3f}" in lines[1] and "empty" not in r.output
    assert "no runs under" in cli("runs", "--runs-dir", "nowhere").output


def test_run_and_checkpoint_together_are_refused(tiny_run):
    run = tiny_run()
    one_line_error(cli("predict", "time", "--run", run, "--checkpoint",
                       run / "checkpoints" / "last.pt"), "give --run or --checkpoint, not both")
