"""What a vocabulary of thousands costs: training speed and peak memory, 28 tokens against
5,000 (a Chinese text trained as characters, data.preset=raw).

Each configuration trains in a fresh process for --steps steps at the shipped recipe's shape
(configs/recipe.yaml: 512 units, batch 64 x 50), on The Time Machine (d2l preset, 28 tokens)
and on a synthetic text of --vocab distinct CJK characters drawn with Zipf's law
(s = 1.1, --chars characters, every character present), and reports tokens/s (the summary's
training speed), the peak resident memory of the process, the parameters, and the ratio of
each figure to the 28-token run measured in the same call. The output layer (num_hiddens x
vocabulary) is what grows.

Run: python benchmarks/vocab.py [--models lstm gru-scratch] [--vocab 5000] [--steps 40]
     [--json out.json]   (nothing else running: the ratios assume a quiet machine;
     --vocab 0 sets the models side by side on The Time Machine alone)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line  # noqa: E402

CHILD = """
import json, resource, sys
import gru_lm
run = gru_lm.train({config!r}, *{overrides!r}, name={name!r}, runs_dir={runs!r})
s = run.summary
print(json.dumps({{"tokens_per_s": s["tokens_per_s"], "params": s.get("params"),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def synthetic_text(path: Path, vocab: int, chars: int, seed: int = 0) -> None:
    """`chars` characters over `vocab` distinct CJK characters, Zipf-distributed (s = 1.1),
    each of them at least once; a line break every 40 characters."""
    rng = random.Random(seed)
    alphabet = [chr(0x4E00 + i) for i in range(vocab)]
    weights = [1 / (r + 1) ** 1.1 for r in range(vocab)]
    body = alphabet + rng.choices(alphabet, weights, k=chars - vocab)
    rng.shuffle(body)
    lines = ["".join(body[i:i + 40]) for i in range(0, len(body), 40)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def measure(model: str, data: list[str], steps: int, runs: Path, name: str) -> dict:
    overrides = [f"model.name={model}", f"train.max_steps={steps}", "train.warmup_steps=5",
                 f"train.eval_interval={steps}", f"train.sample_interval={steps}",
                 "train.eval_max_tokens=5000", *data]
    code = CHILD.format(config=str(ROOT / "configs" / "recipe.yaml"), overrides=overrides,
                        name=name, runs=str(runs))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "GRU_LM_OFFLINE": "1"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lstm", "gru-scratch"])
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--chars", type=int, default=300_000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(cpu_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "zh.txt"
        if args.vocab:
            synthetic_text(text, args.vocab, args.chars)
        corpora = {"28 (The Time Machine, d2l)": [],
                   f"{args.vocab + 1:,} (synthetic Chinese, raw)":
                       ["data.dataset=null", f"data.path={text}", "data.preset=raw"]}
        if not args.vocab:  # --vocab 0: the models side by side on The Time Machine only
            corpora.popitem()
        base = None  # the reference: each model's 28-token run (--vocab 0: the first model's)
        for model in args.models:
            base = base if not args.vocab else None
            for label, data in corpora.items():
                r = measure(model, data, args.steps, Path(tmp) / "runs", f"{model}-{len(rows)}")
                base = base or r
                rows.append({"model": model, "vocabulary": label, **r,
                             "speed_ratio": r["tokens_per_s"] / base["tokens_per_s"],
                             "memory_ratio": r["peak_rss_mb"] / base["peak_rss_mb"]})
                print(f"{model:<12} {label:<32} {r['tokens_per_s']:>9,.0f} tok/s "
                      f"({rows[-1]['speed_ratio']:.2f}x)  peak {r['peak_rss_mb']:>7,.0f} MB "
                      f"({rows[-1]['memory_ratio']:.2f}x)  {r['params']:,} parameters",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
