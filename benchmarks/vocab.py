"""What a vocabulary of thousands costs: training speed, peak memory and val perplexity.

Two modes. `--config configs/tang.yaml` (the one the target is set on) trains that config's
model three ways, each in a fresh process for --steps steps: on its own corpus as shipped
(全唐诗, ~9,600 characters, its adaptive softmax), on the book's 28 tokens (the same config
with data.dataset=timemachine data.preset=d2l data.script=as-is: the output layer fits the
vocabulary it gets), and on its own corpus with model.softmax=full, and reports tokens/s, the
ratio to the 28-token run, peak memory and val perplexity at the same step (so the adaptive
softmax's cost in quality shows beside its speed).

Without --config: the shipped recipe's shape (configs/recipe.yaml: 512 units, batch 64 x 50)
on The Time Machine (28 tokens) and on a synthetic text of --vocab distinct CJK characters
drawn with Zipf's law (s = 1.1, --chars characters, every character present), for each of
--models; --vocab 0 sets the models side by side on The Time Machine alone.

Run: python benchmarks/vocab.py --config configs/tang.yaml [--steps 300] [--json out.json]
     python benchmarks/vocab.py [--models lstm gru-scratch] [--vocab 5000] [--steps 40]
     (nothing else running: the ratios assume a quiet machine)
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
                  "val_ppl": s.get("final_val_ppl"),
                  "vocab_size": len(json.loads((run.path / "vocab.json").read_text())
                                    .get("idx_to_token", range(256))),
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


def measure(model: str | None, data: list[str], steps: int, runs: Path, name: str,
            config: Path = ROOT / "configs" / "recipe.yaml", eval_tokens: int = 5000) -> dict:
    overrides = [f"train.max_steps={steps}", f"train.warmup_steps={min(100, steps // 8)}",
                 f"train.eval_interval={steps}", f"train.sample_interval={steps}",
                 f"train.eval_max_tokens={eval_tokens}", *data]
    overrides += [f"model.name={model}"] if model else []
    code = CHILD.format(config=str(config), overrides=overrides, name=name, runs=str(runs))
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
    ap.add_argument("--config", type=Path, default=None,
                    help="a config on a large vocabulary: its model three ways (see above)")
    ap.add_argument("--eval-tokens", type=int, default=20_000,
                    help="--config: val tokens scored at the last step")
    args = ap.parse_args()
    print(cpu_line(), flush=True)
    rows = config_rows(args) if args.config else synthetic_rows(args)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "rows": rows}, indent=2))


def config_rows(args) -> list[dict]:
    """The config's model on its corpus, on the book's 28 tokens, and with the full softmax."""
    ways = {"its corpus, as shipped": [],
            "the book's 28 tokens": ["data.dataset=timemachine", "data.path=null",
                                     "data.preset=d2l", "data.script=as-is"],
            "its corpus, full softmax": ["model.softmax=full", "model.cutoffs=null"]}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, data in ways.items():
            r = measure(None, data, args.steps, Path(tmp) / "runs", f"way-{len(rows)}",
                        config=args.config, eval_tokens=args.eval_tokens)
            rows.append({"way": label, **r})
            print(f"{label:<26} vocabulary {r['vocab_size']:>6,}  {r['tokens_per_s']:>8,.0f} "
                  f"tok/s  peak {r['peak_rss_mb']:>6,.0f} MB  val ppl {r['val_ppl']:>8.2f} "
                  f"after {args.steps} steps  {r['params']:,} parameters", flush=True)
    book = rows[1]["tokens_per_s"]
    for r in rows:
        r["speed_ratio"] = r["tokens_per_s"] / book
    print(f"speed against the book's 28 tokens: {rows[0]['speed_ratio']:.2f}x as shipped, "
          f"{rows[2]['speed_ratio']:.2f}x with the full softmax")
    return rows


def synthetic_rows(args) -> list[dict]:
    """Each of --models on The Time Machine and on a synthetic text of --vocab characters."""
    rows: list[dict] = []
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
    return rows


if __name__ == "__main__":
    main()
