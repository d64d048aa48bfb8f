"""The Mogrifier LSTM's training speed against the LSTM's, at the recipe's shape.

Three contenders, each through the real Trainer.train_step (AdamW, dropout, DropConnect,
EMA: what `gru-lm train` runs) on the same batches of The Time Machine, interleaved and
repeated, for each thread count asked:
  * lstm:             configs/lstm.yaml (torch.nn's LSTM, the recipe's model);
  * mogrifier fused:  configs/mogrifier.yaml with its fused CPU kernels (gru_lm/csrc/cells.cpp);
  * mogrifier loop:   the same model stepped in PyTorch with autograd (cells.portable_loops()).
Prints tokens/s (median over --reps) and each one's ratio to the LSTM measured in the same
run; the issue's target is fused >= 0.8x the LSTM on one thread (the recipe trains two runs
at a time, one core each) and on two.

Run: python benchmarks/mogrifier.py [--threads 1 2] [--reps 5] [--batches 4] [--json out.json]
     (nothing else running: the ratios assume a quiet machine)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm import cells  # noqa: E402
from gru_lm._ext import cpu_line, cpu_summary  # noqa: E402
from gru_lm.building import make_optimizer  # noqa: E402
from gru_lm.config import load_config  # noqa: E402
from gru_lm.data import BatchLoader, load_corpus  # noqa: E402
from gru_lm.models import build_model  # noqa: E402
from gru_lm.trainer import Trainer  # noqa: E402

CONTENDERS = {  # name: (config, run it under the portable loops)
    "lstm": ("configs/lstm.yaml", False),
    "mogrifier fused": ("configs/mogrifier.yaml", False),
    "mogrifier loop": ("configs/mogrifier.yaml", True),
}


def make_step(config: str, loops: bool, corpus):
    cfg = load_config(ROOT / config, ["train.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(corpus.vocab))
    trainer = Trainer(cfg, model, make_optimizer(cfg, model), corpus)

    def step(X, Y):
        with cells.portable_loops() if loops else contextlib.nullcontext():
            trainer.train_step(X, Y)

    return step, cfg


def tokens_per_s(step, data) -> float:
    step(*data[0])  # warm-up (the first call builds or loads the kernels)
    t0 = time.perf_counter()
    for X, Y in data:
        step(X, Y)
    return sum(X.numel() for X, _ in data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4, help="training steps per measurement")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base = load_config(ROOT / "configs/lstm.yaml")
    corpus = load_corpus(base.data, progress=False)
    B, T = base.train.batch_size, base.train.num_steps
    X, Y = BatchLoader(corpus.train, B, T, "sequential", seed=0).epoch().stacked()
    data = [(X[i], Y[i]) for i in range(args.batches)]
    steps = {name: make_step(cfg, loops, corpus)[0] for name, (cfg, loops) in
             CONTENDERS.items()}
    print(f"CPU: {cpu_line()}; batch {B} x {T}, {base.model.num_hiddens} hiddens, "
          f"{len(corpus.vocab)} tokens; median of {args.reps} rounds of {args.batches} steps")
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.reps):  # interleaved: a busy moment slows every contender alike
            for name, step in steps.items():
                samples[name].append(tokens_per_s(step, data))
        med = {name: statistics.median(v) for name, v in samples.items()}
        for name, tps in med.items():
            ratio = tps / med["lstm"]
            print(f"{threads} thread(s)  {name:<16} {tps:>9,.0f} tokens/s  {ratio:.2f}x lstm")
            results.append({"threads": threads, "contender": name, "tokens_per_s": tps,
                            "vs_lstm": ratio, "samples": samples[name]})
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
