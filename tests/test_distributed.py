"""Distributed data parallel: N processes train as one process with the combined batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, one_line_error

from gru_lm.data import BatchLoader

TINY = ["--config", "configs/tiny.yaml", "--quiet", "train.threads=1"]


@pytest.mark.parametrize("sampler", ["random", "sequential"])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_combined_batch(sampler, world):
    tokens = torch.arange(2000)
    whole = BatchLoader(tokens, 4 * world, 7, sampler, seed=3)
    parts = [BatchLoader(tokens, 4, 7, sampler, seed=3, part=(r, world)) for r in range(world)]
    assert all(p.num_batches() == whole.num_batches() for p in parts)
    for _ in range(2):  # two epochs: the same offsets and orders on every rank
        X, Y = whole.epoch().stacked()
        pieces = [p.epoch().stacked() for p in parts]
        assert torch.equal(torch.cat([x for x, _ in pieces], dim=1), X)
        assert torch.equal(torch.cat([y for _, y in pieces], dim=1), Y)


def test_sequential_streams_of_all_ranks_cover_the_split_once():
    tokens = torch.arange(1000)  # token value = position
    seen = []
    for r in range(2):
        X, _ = BatchLoader(tokens, 3, 5, "sequential", seed=0, part=(r, 2)).epoch().stacked()
        for row in range(3):  # each stream is contiguous across the epoch's batches
            stream = X[:, row, :].flatten()
            assert torch.equal(stream, torch.arange(int(stream[0]), int(stream[0]) + len(stream)))
        seen += X.flatten().tolist()
    assert len(seen) == len(set(seen))
    assert max(seen) - min(seen) + 1 == len(seen)  # one gap-free range: covered once


def _train(*args: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    extra = ["--nproc", str(nproc)] if nproc else []
    return subprocess.run([sys.executable, "-m", "gru_lm", "train", *extra, *TINY, *args],
                          capture_output=True, text=True, timeout=600)


def _weights(run: str) -> dict[str, torch.Tensor]:
    return torch.load(Path("runs") / run / "checkpoints" / "last.pt", weights_only=True)


def _wait_until(proc: subprocess.Popen, ready, what: str = "training did not start") -> None:
    """Poll until ready() while `proc` runs (its output, if it stops first), for 300 s."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _has_metrics(run: str):
    metrics = Path("runs") / run / "metrics.jsonl"
    return lambda: metrics.exists() and bool(metrics.read_text().strip())


@pytest.mark.slow
@pytest.mark.parametrize("sampler, model", [
    ("random", []), ("sequential", []),
    # (a batch whose targets miss a cluster still gives its weights a gradient on every rank)
    ("sequential", ["model.name=lstm", "model.softmax=adaptive", "model.cutoffs=[4,8,20]"]),
], ids=["random", "sequential", "adaptive-softmax"])
def test_two_processes_equal_one_with_the_combined_batch(workdir, sampler, model):
    opts = [f"train.sampler={sampler}", "train.max_steps=20", "train.eval_interval=10", *model]
    two = _train("--name", "two", "train.batch_size=4", *opts, nproc=2)
    assert two.returncode == 0, two.stderr
    assert "Traceback" not in two.stderr and two.stdout.count("done two") == 1
    one = _train("--name", "one", "train.batch_size=8", *opts)
    assert one.returncode == 0, one.stderr
    a, b = _weights("two"), _weights("one")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    assert a["world_size"] == 2 and len(a["ranks"]) == 2
    if sampler == "sequential":  # each rank carried its own streams' state
        assert not torch.equal(a["ranks"][0]["carry_state"][0], a["ranks"][1]["carry_state"][0])
    # Written once, by rank 0: one record per evaluation, one summary, the usual files.
    steps = [json.loads(x)["step"] for x in Path("runs/two/metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]
    summary = json.loads(Path("runs/two/summary.json").read_text())
    assert summary["processes"] == 2 and summary["tokens_seen"] == 20 * 8 * 16
    assert sorted(p.name for p in Path("runs/two/checkpoints").iterdir()) == [
        "best.pt", "best.pt.sha256", "last.pt", "last.pt.sha256"]


@pytest.mark.slow
def test_sigterm_then_resume_continues_exactly(workdir):
    opts = ["train.eval_interval=25", "model.dropout=0.2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gru_lm", "train", "--nproc", "2", *TINY, "--name", "cut",
         "train.max_steps=1000000", *opts],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _wait_until(proc, _has_metrics("cut"))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "interrupted: SIGTERM" in err and "Traceback" not in err
    cut = _weights("cut")["step"]
    end = f"train.max_steps={cut + 30}"
    r = subprocess.run([sys.executable, "-m", "gru_lm", "train", "--nproc", "2", "--resume",
                        "runs/cut", "--quiet", end], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    straight = _train("--name", "straight", end, *opts, nproc=2)
    assert straight.returncode == 0, straight.stderr
    a, b = _weights("cut"), _weights("straight")
    assert a["step"] == b["step"] == cut + 30
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("when", ["starting", "training"])
def test_ctrl_c_stops_every_process_at_one_step_and_the_hint_resumes(workdir, when):
    """Ctrl-C in a terminal signals every process of the group (the launcher and each worker,
    which also gets the launcher's copy): all stop at one step boundary, one checkpoint, one
    message, no gloo abort, and the printed command resumes the run when pasted."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gru_lm", "train", "--nproc", "2", *TINY, "--name", "np2sig",
         "train.max_steps=1000000", "train.eval_interval=25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_until(proc, (lambda: len(_children(proc.pid)) == 2) if when == "starting"
                else _has_metrics("np2sig"))  # (starting: the workers are still importing)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "terminate called" not in err and "gloo" not in err, err
    assert err.count("interrupted: SIGINT: stopped at step") == 1, err
    step = _weights("np2sig")["step"]
    assert f"stopped at step {step}," in err
    if when == "starting":
        assert step == 0  # stopped before its first step, with a checkpoint to resume from
    hint = err.split("resume with: ")[1].split()
    assert hint[:5] == ["gru-lm", "train", "--nproc", "2", "--resume"] and \
        hint[5] == "runs/np2sig", err
    r = subprocess.run([sys.executable, "-m", "gru_lm", *hint[1:], "--quiet",
                        f"train.max_steps={step + 5}"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert _weights("np2sig")["step"] == step + 5


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_its_workers_at_one_step_with_one_message(workdir):
    """torchrun passes a SIGTERM (or a Ctrl-C) on to every worker: they stop together, and only
    process 0 says so (torchrun shows every worker's stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gru_lm", "train", *TINY, "--name", "tr", "train.max_steps=1000000",
         "train.eval_interval=25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until(proc, _has_metrics("tr"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    step = _weights("tr")["step"]
    assert err.count("interrupted: SIGTERM: stopped at step") == 1, err
    assert f"stopped at step {step}," in err and "--resume runs/tr" in err
    assert "terminate called" not in err and "collective mismatch" not in err


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused(workdir):
    two = _train("--name", "two", "train.batch_size=4", "train.max_steps=10", nproc=2)
    assert two.returncode == 0, two.stderr
    r = cli("train", "--resume", "runs/two", "train.max_steps=20", "--quiet")
    one_line_error(r, "trained by 2 process(es) and this resume runs 1",
                   "gru-lm train --nproc 2")


def test_nproc_refuses_bad_input_before_starting(workdir):
    r = cli("train", "--nproc", "2", "--config", "configs/tiny.yaml", "train.lr=-1")
    one_line_error(r, "train.lr")
    assert not Path("runs").exists() or not any(Path("runs").iterdir())
    one_line_error(cli("train", "--nproc", "0", "--config", "configs/tiny.yaml"), "--nproc")
    one_line_error(cli("train", "--nproc", "2"), "no config given")


def test_nproc_beyond_the_cores_is_refused(workdir):
    r = cli("train", "--nproc", "64", "--config", "configs/tiny.yaml")
    one_line_error(r, "--nproc 64: this machine has", "at most")
    assert not Path("runs").exists()


@pytest.mark.slow
def test_kill_9_of_the_launcher_stops_its_workers_and_frees_the_run(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gru_lm", "train", "--nproc", "2", *TINY, "--name", "orphan",
         "train.max_steps=1000000", "train.eval_interval=25"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until(proc, _has_metrics("orphan"))
    proc.kill()  # kill -9: the launcher cannot pass anything on
    proc.wait()
    from gru_lm.rundir import RunDir, is_locked

    deadline = time.monotonic() + 120  # the workers save a checkpoint and stop
    while is_locked(RunDir("runs/orphan")):
        assert time.monotonic() < deadline, "the workers went on training after their launcher"
        time.sleep(0.2)
    step = _weights("orphan")["step"]
    r = _train("--resume", "runs/orphan", f"train.max_steps={step + 5}", nproc=2)
    assert r.returncode == 0, r.stderr


def test_the_watch_names_the_peer_that_does_not_answer(monkeypatch):
    """A process inside a collective longer than half train.collective_timeout_s asks every
    peer where it is; one line names those that do not answer (a frozen process: its
    listening socket takes the connection, nobody answers), not the live ones."""
    import io
    import socket

    from gru_lm import distributed

    monkeypatch.setattr(distributed, "PING_S", 1.0)
    out = io.StringIO()
    me, live = distributed.Watch(0, timeout_s=2, out=out), distributed.Watch(1)
    frozen = socket.create_server(("127.0.0.1", 0))  # (never accepts)
    peers = {0: me.address, 1: live.address, 2: ("frozen-host", "127.0.0.1",
                                                 frozen.getsockname()[1])}
    try:
        for w in (me, live):
            w.begin(peers)
        assert me.ask() == ["rank 2 on frozen-host"]
        me.step = 7
        with me.waiting("a barrier"):
            deadline = time.monotonic() + 60
            while not out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.05)
        said = out.getvalue()
        assert said.startswith("warning: process 0 is waiting for rank 2 on frozen-host: no "
                               "answer for "), said
        assert "inside a barrier, at step 7" in said and "collective_timeout_s=2" in said
        assert "rank 1" not in said and said.count("\n") == 1
    finally:
        me.close()
        live.close()
        frozen.close()


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [1, 0], ids=["rank-1", "rank-0-the-stores-host"])
def test_a_frozen_peer_ends_the_run_after_the_collective_timeout_in_one_line(workdir, frozen):
    """A process stopped by SIGSTOP inside training: the other says, after half of
    train.collective_timeout_s, which rank it waits for, and when the timeout is reached stops
    with one line that names the setting and how to resume (not gloo's 30 minutes)."""
    timeout = 40  # (the warning comes at 20 s: well before the end, on a loaded machine too)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gru_lm", "train", *TINY, "--name", "frz",
         "train.max_steps=1000000", "train.eval_interval=25",
         f"train.collective_timeout_s={timeout}"],
        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    stopped, waiting = procs[frozen], procs[1 - frozen]
    try:
        _wait_until(waiting, Path("runs/frz/checkpoints/last.pt").exists)
        stopped.send_signal(signal.SIGSTOP)
        _, err = waiting.communicate(timeout=timeout + 120)  # (not a timing test: a bound)
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.communicate()
    assert waiting.returncode == 1, err
    assert "Traceback" not in err, err
    assert f"warning: process {1 - frozen} is waiting for rank {frozen} on " in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: process {1 - frozen} had no answer from rank {frozen} on "
                           f"{socket.gethostname()} for train.collective_timeout_s={timeout} s "
                           "inside "), err
    assert last.endswith("resume with: gru-lm train --nproc 2 --resume runs/frz"), err
    assert _weights("frz")["step"] > 0


# ---------------------------------------------------------------- several nodes, restarts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(folders: list[Path], *args: str, per_node: list[list[str]] | None = None
               ) -> list[subprocess.CompletedProcess]:
    """`gru-lm train ARGS` as a job of two nodes, one process each: two torchrun launches
    with a c10d rendezvous on 127.0.0.1, each in its own folder (no shared disk) and with its
    own copy of the corpus. Node 0 is started first: c10d ranks the agents of one host by
    process id, so its process is rank 0."""
    port = _free_port()
    procs = []
    for node, folder in enumerate(folders):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "gru-lm-test",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0",
             "-m", "gru_lm", "train", *args, *(per_node[node] if per_node else [])],
            cwd=folder, env={**os.environ, "GRU_LM_DATA_DIR": str(folder / "data"),
                             "GRU_LM_OFFLINE": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5 if node == 0 else 0)
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _node_folders(root: Path, data_dir: Path) -> list[Path]:
    import shutil

    folders = []
    for node in (0, 1):
        folder = root / f"node{node}"
        shutil.copytree(root / "configs", folder / "configs")
        (folder / "data").mkdir()
        shutil.copy(data_dir / "timemachine.txt", folder / "data" / "timemachine.txt")
        folders.append(folder)
    return folders


def _settings(*overrides: str) -> dict:
    from gru_lm.config import load_config
    from gru_lm.distributed import flat_settings

    root = Path(__file__).resolve().parents[1]
    return flat_settings(load_config(root / "configs/tiny.yaml", list(overrides)).to_dict())


@pytest.mark.parametrize("rank", [0, 1])
def test_processes_whose_settings_differ_are_refused_naming_both_values(monkeypatch, rank):
    from gru_lm import distributed
    from gru_lm.errors import GruLmError

    mine, theirs = _settings("train.max_steps=30"), _settings("train.max_steps=20")
    monkeypatch.setattr(distributed, "gather", lambda world, obj: [
        {"settings": mine, "host": "h0", "node": 0},
        {"settings": theirs, "host": "h1", "node": 1}])
    with pytest.raises(GruLmError) as e:
        distributed.check_same_settings(distributed.World(rank, 2), mine)
    said = str(e.value)
    assert said.startswith("node 1 (host h1, process 1) has train.max_steps=20 where process 0 "
                           "(node 0) has train.max_steps=30: every process"), said
    assert "\n" not in said
    assert getattr(e.value, "silent", False) == (rank != 0)  # process 0 alone says it


def test_local_settings_may_differ_between_nodes():
    a = _settings("train.threads=1", "data.cache_dir=/a", "run.name=x", "train.device=cpu")
    b = _settings("train.threads=2", "data.cache_dir=/b", "run.runs_dir=elsewhere")
    assert a == b
    assert a != _settings("train.lr=0.05") and a != _settings("model.num_hiddens=64")
    assert "train.lr" in a and "model.num_hiddens" in a and "data.max_tokens" in a


@pytest.mark.slow
def test_two_nodes_with_another_learning_rate_are_refused_before_the_first_step(
        workdir, data_dir):
    node0, node1 = _node_folders(workdir, data_dir)
    opts = [*TINY, "--name", "two", "train.max_steps=20"]
    r = _two_nodes([node0, node1], *opts, per_node=[["train.lr=0.01"], ["train.lr=0.05"]])
    assert all(x.returncode != 0 for x in r)
    said = [line for x in r for line in x.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1, [x.stderr[-2000:] for x in r]
    assert "node 1" in said[0] and "train.lr=0.05 where process 0 (node 0) has train.lr=0.01" \
        in said[0]
    assert not (node0 / "runs/two").exists()


@pytest.mark.slow
def test_two_nodes_train_resume_from_node_0_and_refuse_another_corpus(workdir, data_dir):
    node0, node1 = _node_folders(workdir, data_dir)
    opts = [*TINY, "train.eval_interval=10"]
    r = _two_nodes([node0, node1], *opts, "--name", "two", "train.max_steps=20")
    assert all(x.returncode == 0 for x in r), [x.stderr[-2000:] for x in r]
    assert (node0 / "runs/two/summary.json").is_file()
    assert not (node1 / "runs").exists()  # process 0 alone writes, on its own node
    # a resume needs the run folder only on node 0: process 0 hands the checkpoint on
    r = _two_nodes([node0, node1], "--resume", "runs/two", "--quiet", "train.max_steps=30")
    assert all(x.returncode == 0 for x in r), [x.stderr[-2000:] for x in r]
    ck = torch.load(node0 / "runs/two/checkpoints/last.pt", weights_only=True)
    assert ck["step"] == 30 and ck["world_size"] == 2
    assert not (node1 / "runs").exists()
    # node 1's copy of the corpus differs: refused before training, naming node 1 and its file
    book = (data_dir / "timemachine.txt").read_text()[:20_000]
    (node0 / "my.txt").write_text(book)
    text = node1 / "my.txt"
    text.write_text(book.replace("Time Traveller", "Time Travellor", 1))
    r = _two_nodes([node0, node1], *opts, "--name", "bad", "train.max_steps=20",
                   "data.dataset=null", "data.path=my.txt")
    assert all(x.returncode != 0 for x in r)
    said = [line for x in r for line in x.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "node 1" in said[0] and "my.txt" in said[0], said
    assert "whose tokens differ" in said[0]
    assert not (node0 / "runs/bad").exists()


@pytest.mark.slow
def test_a_worker_killed_under_max_restarts_ends_as_an_uninterrupted_run(workdir):
    """torchrun --max-restarts restarts every worker after a kill -9: the restarted launch
    continues its own run from the last checkpoint, exactly. (3 restarts allowed: on a
    loaded machine a restarted worker has been seen to abort inside torch once while
    starting, "terminate called without an active exception"; a further restart goes on
    from the same checkpoint.)"""
    opts = [*TINY, "train.max_steps=400", "train.eval_interval=25", "model.dropout=0.2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--max-restarts", "3", "-m", "gru_lm", "train", *opts, "--name", "el"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until(proc, Path("runs/el/checkpoints/last.pt").exists)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err and "done el: 400 steps" in out  # killed, then finished
    steps = [json.loads(x)["step"] for x in Path("runs/el/metrics.jsonl").read_text()
             .splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # none lost, none twice
    straight = _train("--name", "straight", *opts[len(TINY):], nproc=2)
    assert straight.returncode == 0, straight.stderr
    a, b = _weights("el"), _weights("straight")
    assert a["step"] == b["step"] == 400
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_restartable_launch_needs_a_run_name(workdir, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    r = cli("train", "--config", "configs/tiny.yaml", "--quiet")
    one_line_error(r, "torchrun --max-restarts", "--name NAME")
    assert not Path("runs").exists()


def test_a_restart_never_continues_a_run_another_launch_made(workdir, tiny_run, monkeypatch):
    run = tiny_run("theirs")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "theirs", "--quiet")
    one_line_error(r, "already exists")
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
