"""Start-up latency of the CLI against `python -c "import torch"`, measured in one run.

Targets: `gru-lm --help` <= 0.5 s; `gru-lm predict` of 50 characters <= 1.3x import torch.
predict needs a trained run: by default a tiny one is trained first into a temp folder.

Run: python benchmarks/cli_latency.py [--reps 5] [--run DIR]   (make bench)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--run", type=Path, default=None, help="a trained run (default: train tiny)")
    args = ap.parse_args()
    py = sys.executable
    cli = [py, "-m", "gru_lm"]
    work = Path(tempfile.mkdtemp(prefix="gru-lm-latency-"))
    try:
        run = args.run
        if run is None:
            shutil.copytree(ROOT / "configs", work / "configs")
            done = subprocess.run(cli + ["train", "--config", "configs/tiny.yaml", "--name",
                                         "lat", "-q"], cwd=work, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"cli_latency: training the tiny run failed: {done.stderr.strip()}")
            run = work / "runs" / "lat"
        contenders = {
            "python -c 'import torch'": [py, "-c", "import torch"],
            "gru-lm --help": cli + ["--help"],
            "gru-lm predict (50 chars)": cli + ["predict", "time traveller", "--run",
                                                str(run.resolve())],
        }
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for cmd in contenders.values():  # warm the file cache once
            timed(cmd, work)
        for _ in range(args.reps):  # interleaved
            for name, cmd in contenders.items():
                times[name].append(timed(cmd, work))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["python -c 'import torch'"]
        print(f"{'command':<28} {'median s':>9} {'x import torch':>15}   target")
        targets = {"gru-lm --help": "<= 0.50 s", "gru-lm predict (50 chars)": "<= 1.30x"}
        for name, t in med.items():
            print(f"{name:<28} {t:9.3f} {t / base:14.2f}x   {targets.get(name, '')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("GRU_LM_OFFLINE", "1")
    main()
