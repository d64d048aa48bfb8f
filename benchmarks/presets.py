"""Characters or bytes: the raw and bytes presets trained on one text, and fine-tuning.

Trains `--config` (default configs/gru-scratch.yaml) with `--steps` steps on TEXT twice, with
data.preset=raw and data.preset=bytes, and prints each run's best val perplexity per token
and per character (a byte-level model's loss summed over each character's bytes), so the two
can be set side by side. With --from OTHER, it also trains a bytes model on OTHER and then
fine-tunes it on TEXT for --ft-steps steps (train --init-from), against as many steps from
scratch.

Run: python benchmarks/presets.py TEXT [--steps 1500] [--from OTHER --ft-steps 300]
     [--set model.num_hiddens=256 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line  # noqa: E402


def per_char(run: Path) -> dict:
    """Best checkpoint's val perplexity per token and per character, scored as one stream."""
    from gru_lm.data import char_ends, load_corpus
    from gru_lm.members import load_member, locate
    from gru_lm.metrics import evaluate

    m = load_member(locate(run).checkpoint)
    corpus = load_corpus(m.cfg.data, vocab=m.vocab, progress=False)
    nll, n = evaluate(m.model, corpus.val, *m.cfg.train.reading)
    chars = len(char_ends(corpus.val[1:].numpy())) if m.cfg.data.preset == "bytes" else n
    return {"preset": m.cfg.data.preset, "vocab": len(m.vocab), "val_tokens": n,
            "val_chars": chars, "ppl_token": math.exp(nll / n),
            "ppl_char": math.exp(nll / chars), "bits_char": nll / chars / math.log(2)}


def train(runs: Path, name: str, config: Path, text: Path, *extra: str) -> Path:
    from gru_lm.runner import train_run

    t0 = time.perf_counter()
    train_run(config, [f"data.path={text}", "data.dataset=null", f"run.runs_dir={runs}",
                       *extra], name=name)
    print(f"  trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return runs / name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", type=Path)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "gru-scratch.yaml")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--from", dest="source", type=Path, default=None)
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run (e.g. model.num_hiddens=256)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    threads = [*args.set, *([f"train.threads={args.threads}"] if args.threads else [])]
    print(cpu_line(), flush=True)
    out: dict = {"cpu": cpu_line(), "text": str(args.text), "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="gru-lm-presets-") as tmp:
        runs = Path(tmp)
        steps = [f"train.max_steps={args.steps}", *threads]
        for preset in ("raw", "bytes"):
            run = train(runs, preset, args.config, args.text, f"data.preset={preset}", *steps)
            out[preset] = r = per_char(run)
            print(f"{preset:>5}: vocabulary {r['vocab']:,}, val ppl {r['ppl_token']:.3f} per "
                  f"token, {r['ppl_char']:.3f} per character ({r['bits_char']:.3f} bits/char)",
                  flush=True)
        if args.source is not None:
            src = train(runs, "source", args.config, args.source, "data.preset=bytes", *steps)
            few = [f"train.max_steps={args.ft_steps}", *threads]
            for name, extra in (("fine-tuned", [f"train.init_from={src}"]), ("scratch", [])):
                run = train(runs, name, args.config, args.text, "data.preset=bytes", *few, *extra)
                out[name] = r = per_char(run)
                print(f"{name:>10}: {args.ft_steps} steps on {args.text.name}: val ppl "
                      f"{r['ppl_token']:.3f} per byte, {r['ppl_char']:.3f} per character",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
