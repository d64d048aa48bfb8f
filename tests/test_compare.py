"""gru-lm compare and plot: equal budgets, real outputs, and --runs reproduces the table."""

import csv
import json
from pathlib import Path

import pytest
from conftest import cli

PNG = b"\x89PNG\r\n\x1a\n"


def test_compare_two_configs_two_seeds(workdir):
    lstm = Path("configs/tiny.yaml").read_text().replace("gru-scratch", "lstm-scratch")
    Path("configs/tiny-lstm.yaml").write_text(lstm)
    r = cli("compare", "configs/tiny.yaml", "configs/tiny-lstm.yaml", "--seeds", "2",
            "--tokens", "2048", "--out", "cmp")
    assert r.exit_code == 0, r.output
    out = Path("cmp")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["model"] for row in rows] == ["tiny", "tiny ensemble", "tiny-lstm",
                                              "tiny-lstm ensemble", "all runs, weighted on val"]
    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000
    samples = (out / "samples.md").read_text()
    assert "## tiny-lstm" in samples
    assert "- prefix `time traveller`, continued:\n  - sampled at 0.6: `" in samples
    assert "\n  - greedy: `" in samples
    result = json.loads((out / "results.json").read_text())
    for row in result["rows"]:
        if row["kind"] != "seeds":
            continue
        members = [json.loads((out / f"{row['model']}-s{s}" / "summary.json").read_text())
                   for s in range(2)]
        assert {m["tokens_seen"] for m in members} == {16 * 128}  # equal budget: 16 steps
        assert row["stopped_by"] == ["max_steps=16"]
        # the summary's figures are one stream's, as compare scores them
        for key in ("val", "test"):
            mean = sum(m[f"best_{key}_ppl"] for m in members) / 2
            assert row[f"{key}_ppl_mean"] == pytest.approx(mean, rel=1e-5)
            assert f"{row[f'{key}_ppl_mean']:.3f} ± " in r.output
    # every run in one ensemble, weights fitted on val: EM maximises the val likelihood over
    # all weightings, so it is no worse on val than any recipe's equal-weight ensemble (up
    # to where EM stops: the tiny runs predict alike, EM's slowest case)
    weighted = result["rows"][-1]
    assert weighted["kind"] == "weighted" and weighted["seeds"] == 4
    weights = weighted["member_weights"]
    assert sorted(weights) == ["tiny-lstm-s0", "tiny-lstm-s1", "tiny-s0", "tiny-s1"]
    assert sum(weights.values()) == pytest.approx(1) and min(weights.values()) >= 0
    assert weighted["val_ppl_mean"] <= min(
        row["val_ppl_mean"] for row in result["rows"][:-1]) * (1 + 1e-4)
    assert "weights fitted on val: tiny-s0 0." in r.output
    cells = dict(cell.split() for cell in rows[-1]["member_weights"].split("; "))
    assert {k: float(v) for k, v in cells.items()} == weights
    assert len(result["comparisons"]) == 1 and result["comparisons"][0]["paired_seeds"] == [0, 1]
    assert "verdict: " in r.output
    verdicts = list(csv.DictReader((out / "verdicts.csv").open()))
    assert [v["verdict"] for v in verdicts] == result["verdicts"]
    assert verdicts[0]["paired_seeds"] == "0; 1"
    assert float(verdicts[0]["bootstrap_ci_low_pct"]) <= float(verdicts[0]["bootstrap_ci_high_pct"])
    again = cli("compare", "--runs", *result["members"], "--out", "cmp2")
    assert again.exit_code == 0, again.output
    assert json.loads(Path("cmp2/results.json").read_text())["rows"] == result["rows"]


def test_compare_resume_skips_finished_members(workdir):
    args = ("compare", "configs/tiny.yaml", "--seeds", "2", "--epochs", "1", "--out", "c")
    assert cli(*args).exit_code == 0
    before = Path("c/tiny-s0/summary.json").read_bytes()
    r = cli(*args)
    assert r.exit_code == 1 and "already exists; continue it with --resume" in r.output
    r = cli(*args, "--resume")
    assert r.exit_code == 0 and "finished earlier, kept" in r.output
    assert Path("c/tiny-s0/summary.json").read_bytes() == before


def test_compare_refuses_different_data(workdir):
    other = Path("configs/tiny.yaml").read_text().replace("max_tokens: 5000", "max_tokens: 6000")
    Path("configs/other.yaml").write_text(other)
    r = cli("compare", "configs/tiny.yaml", "configs/other.yaml", "--tokens", "100")
    assert r.exit_code == 1 and "data section differs" in r.output


def test_plot_writes_a_png(workdir, tiny_run):
    tiny_run("p")
    r = cli("plot", "runs/p")
    assert r.exit_code == 0
    png = Path("runs/p/curves.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 5_000


def test_interrupted_comparison_keeps_members_and_says_how_to_resume(workdir, monkeypatch):
    from gru_lm.errors import TrainingInterrupted
    from gru_lm.trainer import Trainer

    original = Trainer.fit

    def fit_then_interrupt_second(self):
        if self.run.name == "tiny-s1":
            raise TrainingInterrupted("SIGINT: stopped", exit_code=130)
        return original(self)

    monkeypatch.setattr(Trainer, "fit", fit_then_interrupt_second)
    r = cli("compare", "configs/tiny.yaml", "--seeds", "2", "--tokens", "1024", "--out", "ci")
    assert r.exit_code == 130
    assert "--out ci --resume" in r.output
    assert Path("ci/tiny-s0/summary.json").is_file()


@pytest.mark.slow
def test_compare_jobs_trains_members_at_once_and_ctrl_c_stops_them_all(workdir):
    """--jobs 2: both members train at once in processes of their own; Ctrl-C reaches both,
    each saves a checkpoint, one message says how to go on, and that command finishes them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["compare", "configs/tiny.yaml", "--seeds", "2", "--jobs", "2", "--budget-s", "6",
            "--out", "cj"]
    proc = subprocess.Popen([sys.executable, "-m", "gru_lm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = [Path(f"cj/tiny-s{s}/metrics.jsonl") for s in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(m.is_file() and m.stat().st_size for m in metrics):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    children = [int(c) for c in
                Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(children) == 2  # both members at once
    os.killpg(proc.pid, signal.SIGINT)  # the launcher's group: the members have their own
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.startswith("interrupted: comparison interrupted in tiny-s") and "tiny-s0" in err \
        and "tiny-s1" in err and err.count("\n") == 1, err
    for pid in children:  # (reaped: no process is left behind)
        assert not Path(f"/proc/{pid}").exists()
    for s in (0, 1):
        assert Path(f"cj/tiny-s{s}/checkpoints/last.pt").is_file()
        assert not Path(f"cj/tiny-s{s}/summary.json").exists()
        assert "interrupted" in Path(f"cj/tiny-s{s}.log").read_text()
    hint = err.split("Continue with: ")[1].split(" (and")[0].split()
    assert hint[1:] == ["compare", "configs/tiny.yaml", "--seeds", "2", "--jobs", "2", "--out",
                        "cj", "--resume"], err
    r = subprocess.run([sys.executable, "-m", "gru_lm", *hint[1:], "--budget-s", "6", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tiny ensemble" not in r.stdout and "  ensemble" in r.stdout
    for s in (0, 1):
        assert Path(f"cj/tiny-s{s}/summary.json").is_file()
        log = Path(f"cj/tiny-s{s}.log").read_text()  # appended to, not replaced
        assert log.index("interrupted") < log.index("--- resumed by gru-lm compare at ")


@pytest.mark.slow
def test_no_member_outlives_a_compare_killed_by_kill_9(workdir):
    """The members run in sessions of their own (a terminal's Ctrl-C must not reach them
    twice), so nothing of a kill -9 reaches them but the parent-death signal: each saves a
    checkpoint and stops."""
    import subprocess
    import sys
    import time

    args = ["compare", "configs/tiny.yaml", "--seeds", "2", "--jobs", "2", "--budget-s", "60",
            "--out", "ck"]
    proc = subprocess.Popen([sys.executable, "-m", "gru_lm", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = [Path(f"ck/tiny-s{s}/metrics.jsonl") for s in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(m.is_file() and m.stat().st_size for m in metrics):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    children = [int(c) for c in
                Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(children) == 2
    proc.kill()
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, "a member trained on after its parent died"
        time.sleep(0.1)
    for s in (0, 1):
        assert Path(f"ck/tiny-s{s}/checkpoints/last.pt").is_file()
        assert not Path(f"ck/tiny-s{s}/summary.json").exists()


def test_compare_jobs_is_checked_and_a_failed_member_is_named(workdir, monkeypatch):
    r = cli("compare", "configs/tiny.yaml", "--jobs", "0", "--out", "cx")
    assert r.exit_code == 1 and "--jobs 0 is out of range" in r.output and "give 1.." in r.output
    assert not Path("cx").exists()
    monkeypatch.setattr("gru_lm.building.usable_cores", lambda: 2)
    Path("mine.txt").write_text("the time machine " * 400)
    tiny = Path("configs/tiny.yaml").read_text()
    Path("configs/mine.yaml").write_text(tiny.replace("dataset: timemachine",
                                                      "dataset: null\n  path: mine.txt"))
    Path("mine.txt").unlink()  # (gone once the comparison has checked its configs)
    r = cli("compare", "configs/mine.yaml", "--seeds", "2", "--jobs", "2", "--out", "cm")
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: member mine-s0 (exit 1: error: ") and "mine.txt" in line \
        and "its output is in cm/mine-s0.log" in line, r.output
