"""Token store on a big corpus: preparation speed and peak memory per character, one run.

Targets (issue 16): preparing and training a 100 MB corpus costs at most 3 bytes of peak RSS
per character above the process' baseline (its RSS once torch and gru_lm are imported), and
preparation runs at 20 MB/s or more. Issue 24: evaluation memory does not grow with the
split, so configs/tiny.yaml on the whole corpus (val and test of 10% each, scored in full at
every evaluation, the n-gram reference counting 10M training tokens) stays within 3 bytes a
character too.

The corpus is synthetic English: words drawn at random, with their frequencies, from The Time
Machine, in lines of 60-100 characters, so it has as many distinct n-grams as real text of its
size. Each phase runs in a fresh process that reports VmHWM (peak RSS) from /proc:
  prepare   load_corpus on a new store (two streaming passes over the file)
  reuse     load_corpus again (the store is only mapped)
  train     gru-lm's train_run for a few steps on the mapped store, capped evaluation
  evaluate  configs/tiny.yaml on the whole corpus: evaluation without a cap

Run: python benchmarks/tokenstore.py [--mb 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line, cpu_summary  # noqa: E402

CHILD = r"""
import json, os, sys, time
from pathlib import Path

def rss(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

import torch, numpy
import gru_lm.data, gru_lm.runner, gru_lm.trainer, gru_lm.tokenstore
from gru_lm.config import DataConfig
base = rss("VmRSS")
phase, corpus, cache = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
t0 = time.perf_counter()
if phase in ("prepare", "reuse"):
    c = gru_lm.data.load_corpus(DataConfig(path=corpus, cache_dir=cache), progress=False)
    extra = {"tokens": c.num_tokens, "reused": c.store_reused, "dtype": str(c.train.dtype)}
else:
    from gru_lm.runner import train_run
    config, extra = (Path(sys.argv[4]), []) if phase == "train" else (
        Path("configs/tiny.yaml"), ["data.dataset=null", "data.max_tokens=null"])
    summary = train_run(config, [f"data.path={corpus}", f"data.cache_dir={cache}",
                        f"run.runs_dir={cache / 'runs'}", *extra], name=phase)
    extra = {"steps": summary["steps"], "tokens_per_s": summary["tokens_per_s"]}
seconds = time.perf_counter() - t0
print(json.dumps({"base": base, "peak": rss("VmHWM"), "seconds": seconds, **extra}))
"""

TRAIN_CONFIG = """\
model: {name: gru-scratch, num_hiddens: 256}
train:
  max_steps: 30
  batch_size: 32
  num_steps: 35
  eval_interval: 1000
  eval_max_tokens: 100000
  sample_interval: 1000
  threads: 1
"""


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """Write `megabytes` MB of synthetic text built from The Time Machine's words."""
    from gru_lm.config import DataConfig
    from gru_lm.data import corpus_path, read_text

    words = re.findall(r"[A-Za-z']+|[.,;!?]", read_text(corpus_path(DataConfig(),
                                                                      progress=False)))
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = " ".join(rng.choices(words, k=rng.randint(12, 20))) + "\n"
            f.write(line)
            written += len(line)


def phase(name: str, corpus: Path, cache: Path, config: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, name, str(corpus), str(cache),
                          str(config)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{name} failed: {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gru-lm-tokenstore-"))
    try:
        corpus, cache, config = work / "big.txt", work / "cache", work / "train.yaml"
        config.write_text(TRAIN_CONFIG)
        t0 = time.perf_counter()
        make_corpus(corpus, args.mb)
        chars = corpus.stat().st_size  # ASCII: one byte a character
        print(cpu_line())
        print(f"corpus: {chars / 1e6:.1f} MB of synthetic text, written in "
              f"{time.perf_counter() - t0:.1f} s")
        results = {"cpu": cpu_summary(), "chars": chars, "phases": {}}
        print(f"{'phase':<8} {'seconds':>8} {'MB/s':>7} {'peak - base MB':>15} "
              f"{'bytes/char':>11}")
        for name in ("prepare", "reuse", "train", "evaluate"):
            r = phase(name, corpus, cache, config)
            above = r["peak"] - r["base"]
            r["bytes_per_char"] = above / chars
            results["phases"][name] = r
            speed = f"{chars / 1e6 / r['seconds']:7.1f}" if name == "prepare" else f"{'':>7}"
            print(f"{name:<8} {r['seconds']:8.2f} {speed} {above / 1e6:15.1f} "
                  f"{r['bytes_per_char']:11.2f}")
        worst = max(r["bytes_per_char"] for r in results["phases"].values())
        speed = chars / 1e6 / results["phases"]["prepare"]["seconds"]
        print(f"targets: peak <= 3 bytes/char above baseline: {worst:.2f} "
              f"({'met' if worst <= 3 else 'missed'}); preparation >= 20 MB/s: {speed:.1f} "
              f"({'met' if speed >= 20 else 'missed'})")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("GRU_LM_OFFLINE", "1")
    main()
