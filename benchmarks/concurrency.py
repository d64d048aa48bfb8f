"""Two trainings at once on a shared CPU: each one's tokens/s against one alone, one run.

Target (issue 14): each of two concurrent trainings keeps >= 40% of the solo throughput.
Every case trains configs/gru.yaml's model for the same wall-clock budget and reads
tokens/s (training time only) from summary.json. Cases: gru-lm's defaults; OpenMP threads
that spin while waiting (OMP_WAIT_POLICY=ACTIVE); and the pair pinned to one thread each.
Solo runs with the case's environment and the default threads.

Run: python benchmarks/concurrency.py [--seconds 20] [--config configs/gru.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line, cpu_summary  # noqa: E402


def train(work: Path, names: list[str], config: Path, seconds: float, env: dict,
          extra: list[str]) -> list[float]:
    """Start one training per name at once; tokens/s of each."""
    procs = []
    for name in names:
        cmd = [sys.executable, "-m", "gru_lm", "train", "-c", str(config), "--name", name, "-q",
               "train.max_steps=null", f"train.time_budget_s={seconds}",
               "train.eval_interval=1000000", "train.sample_interval=1000000",
               "data.val_fraction=0.005", "data.test_fraction=0.005", *extra]
        procs.append(subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"training failed: {err.decode()[-500:]}")
    out = []
    for name in names:
        summary = json.loads((work / "runs" / name / "summary.json").read_text())
        out.append(summary["tokens_per_s"])
        shutil.rmtree(work / "runs" / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "gru.yaml")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gru-lm-concurrency-"))
    results = {"cpu": cpu_summary(), "cores": len(os.sched_getaffinity(0)),
               "config": str(args.config), "seconds": args.seconds, "cases": {}}
    print(f"CPU: {cpu_line()}; {args.config.name} for {args.seconds:g} s per training")
    try:
        cases = (("gru-lm defaults", None, []),
                 ("OMP_WAIT_POLICY=ACTIVE", "ACTIVE", []),
                 ("threads=1 each", None, ["train.threads=1"]))
        for label, policy, extra in cases:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            solo = train(work, ["solo"], args.config, args.seconds, env, [])[0]
            pair = train(work, ["a", "b"], args.config, args.seconds, env, extra)
            worst = min(pair) / solo
            results["cases"][label] = {"solo": solo, "pair": pair, "worst_ratio": worst}
            print(f"{label:24} solo {solo:9,.0f} tok/s | two at once {pair[0]:9,.0f} and "
                  f"{pair[1]:9,.0f} tok/s | worst {worst:6.1%} of solo (target >= 40%)",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
