"""The gloo teardown race, counted: N two-process trainings and how many processes ended badly.

A worker once aborted in gloo's teardown (SIGABRT, "terminate called without an active
exception"; compat CI, Python 3.13 + torch 2.11). Commit c97a30c changed how processes leave
the group (distributed.stop: collect what holds the group, destroy it, then wait in the
rendezvous store until every process has closed its group) without a measurement. This runs
`--runs` trainings of configs/tiny.yaml for `--steps` steps in two processes on 127.0.0.1
(gloo, one thread each, started as --nproc starts them) and counts the processes that ended
by a signal or with a non-zero status. `--old-teardown` runs the same with the teardown before
c97a30c (destroy the group and exit, no collection, no waiting for the others), patched in
by the worker's own start-up here: the package itself has no switch for it.

Run: python benchmarks/teardown.py [--runs 40] [--steps 3] [--old-teardown] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line, cpu_summary  # noqa: E402

# The worker's start-up with the teardown of before c97a30c: today's distributed.stop
# replaced by what it was (the watch of frozen peers, which came later, closed as now).
OLD_TEARDOWN = """
import sys
import gru_lm.distributed as d

def stop(world, together=False):
    import torch.distributed as dist
    if d._WATCH is not None:
        d._WATCH.close()
        d._WATCH = None
    if world.active and dist.is_initialized():
        dist.destroy_process_group()

d.stop = stop
sys.argv[0] = "gru-lm"
from gru_lm.cli import main
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(work: Path, index: int, steps: int, old: bool) -> list[tuple[int, str]]:
    """One two-process training; each process' exit status and the end of its stderr."""
    name = f"t{index}"
    start = ["-c", OLD_TEARDOWN] if old else ["-m", "gru_lm"]
    args = [sys.executable, *start, "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--name", name, "--quiet", "train.threads=1", f"train.max_steps={steps}",
            "train.eval_interval=1000000", "train.sample_interval=1000000"]
    port = free_port()
    procs = [subprocess.Popen(
        args, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in (0, 1)]
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            err += "\n(killed by the benchmark after 600 s)"
        out.append((p.returncode, err.strip()[-300:]))
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    return out


def kind(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40, help="two-process trainings to run")
    ap.add_argument("--steps", type=int, default=3, help="training steps of each")
    ap.add_argument("--old-teardown", action="store_true",
                    help="leave the group as before c97a30c (destroy and exit at once)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="gru-lm-teardown-"))
    teardown = "before c97a30c (destroy, exit)" if args.old_teardown else \
        "today's (collect, destroy, wait for all)"
    print(cpu_line())
    print(f"Python {platform.python_version()}, torch {torch.__version__}, gloo on 127.0.0.1; "
          f"teardown: {teardown}")
    kinds: Counter[str] = Counter()
    abnormal_runs, aborts, examples = 0, 0, []
    t0 = time.perf_counter()
    try:
        for i in range(args.runs):
            ends = one_run(work, i, args.steps, args.old_teardown)
            bad = [(code, err) for code, err in ends if code != 0]
            abnormal_runs += bool(bad)
            for code, err in bad:
                kinds[kind(code)] += 1
                aborts += "terminate called" in err
                examples.append(f"run {i}: {kind(code)}: {err.splitlines()[-1] if err else ''}")
            print(f"\rrun {i + 1}/{args.runs}: {abnormal_runs} with an abnormal exit",
                  end="", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    print()
    print(f"{args.runs} runs of 2 processes ({2 * args.runs} exits), {args.steps} steps each, "
          f"{seconds / max(1, args.runs):.1f} s a run")
    print(f"runs with an abnormal exit: {abnormal_runs}; processes ended abnormally: "
          f"{sum(kinds.values())} ({', '.join(f'{k}: {n}' for k, n in kinds.items()) or 'none'}"
          f"); 'terminate called' on stderr: {aborts}")
    for line in examples[:10]:
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps({
            "cpu": cpu_summary(), "python": platform.python_version(),
            "torch": torch.__version__, "old_teardown": args.old_teardown, "runs": args.runs,
            "steps": args.steps, "abnormal_runs": abnormal_runs, "exits": dict(kinds),
            "terminate_called": aborts, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
