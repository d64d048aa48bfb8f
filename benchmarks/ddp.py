"""Distributed data parallel on this machine: 2 processes x 1 thread against 1 x 1, one run.

Target (issue 16): 2 ranks x 1 thread reach >= 1.6x the tokens/s of 1 rank x 1 thread on
configs/gru.yaml's model at batch 64 (per process: the 2-rank run trains 128 sequences a
step). tokens/s is training time only (summary.json), both runs the same number of steps.

Run: python benchmarks/ddp.py [--steps 60] [--config configs/gru.yaml] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line, cpu_summary  # noqa: E402


def train(work: Path, name: str, config: Path, steps: int, nproc: int, extra: list[str]
          ) -> dict:
    cmd = [sys.executable, "-m", "gru_lm", "train", "-c", str(config), "--name", name, "-q",
           "--nproc", str(nproc), f"train.max_steps={steps}", "train.threads=1",
           "train.batch_size=64", "train.eval_interval=1000000",
           "train.sample_interval=1000000", "data.val_fraction=0.005",
           "data.test_fraction=0.005", *extra]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"training failed: {out.stderr[-800:]}")
    summary = json.loads((work / "runs" / name / "summary.json").read_text())
    shutil.rmtree(work / "runs" / name)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "gru.yaml")
    ap.add_argument("--model", default=None, help="model.name override (e.g. gru-scratch)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gru-lm-ddp-"))
    extra = [f"model.name={args.model}"] if args.model else []
    try:
        print(cpu_line())
        one = train(work, "one", args.config, args.steps, 1, extra)
        two = train(work, "two", args.config, args.steps, 2, extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = two["tokens_per_s"] / one["tokens_per_s"]
    print(f"model {one['model']} ({one['kernels']}), batch 64 per process, {args.steps} steps")
    print(f"1 process  x 1 thread: {one['tokens_per_s']:>9,.0f} tokens/s")
    print(f"2 processes x 1 thread: {two['tokens_per_s']:>9,.0f} tokens/s  = {ratio:.2f}x "
          f"(target >= 1.6x: {'met' if ratio >= 1.6 else 'missed'})")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "one": one, "two": two,
                                         "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
