"""The baselines a model of a Chinese corpus must beat, on gru-lm's own split of it: uniform,
unigram, Kneser-Ney n-grams of orders 2..--max-order (the order chosen on val), and the PPMd
compressor of order 6 given the training text (pyppmd's PPMd variant I, 256 MB: compressing
train + val and train alone, the difference is val's cost; test is read after train + val).
Every figure is a perplexity per character, punctuation and line breaks included, as gru-lm
scores them. With --run, the runs are scored on the same split beside them (static, and
with --methods such as temperature or dynamic).

Run: python benchmarks/poetry.py [--config configs/tang.yaml] [key=value ...]
     [--run runs/tang-...] [--methods temperature] [--json out.json]
The corpus comes from GRU_LM_DATA_DIR or the cache, as in training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line  # noqa: E402
from gru_lm.config import load_config  # noqa: E402
from gru_lm.data import load_corpus  # noqa: E402
from gru_lm.metrics import perplexity, reference_baselines  # noqa: E402
from gru_lm.ngram import KneserNey  # noqa: E402

PPMD_ORDER = 6
PPMD_MEMORY = 256 << 20


def ppmd_bits(text: str) -> int:
    """Bits PPMd (variant I, order 6) takes to code `text`'s UTF-8 bytes."""
    import pyppmd

    enc = pyppmd.Ppmd8Encoder(PPMD_ORDER, PPMD_MEMORY,
                              restore_method=pyppmd.PPMD8_RESTORE_METHOD_RESTART)
    return 8 * len(enc.encode(text.encode("utf-8")) + enc.flush(endmark=False))


def ppmd_perplexities(train: str, val: str, test: str) -> dict[str, float]:
    """val and test perplexity per character of PPMd given the text before them."""
    b_train = ppmd_bits(train)
    b_val = ppmd_bits(train + val)
    b_test = ppmd_bits(train + val + test)
    return {"val": 2 ** ((b_val - b_train) / len(val)),
            "test": 2 ** ((b_test - b_val) / len(test))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "tang.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value, as gru-lm train takes")
    ap.add_argument("--max-order", type=int, default=6)
    ap.add_argument("--run", action="append", default=[], help="a run to score beside them")
    ap.add_argument("--methods", nargs="*", default=[], help="evaluate's ways of scoring")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(cpu_line(), flush=True)
    cfg = load_config(args.config, args.overrides)
    corpus = load_corpus(cfg.data, progress=False)
    V, has_unk = len(corpus.vocab), corpus.vocab.has_unk
    print(f"{corpus.source}: {corpus.num_tokens:,} characters, vocabulary {V:,}; train / val "
          f"/ test {len(corpus.train):,} / {len(corpus.val):,} / {len(corpus.test):,}")
    rows = {}
    best = None
    for order in range(2, args.max_order + 1):
        t0 = time.perf_counter()
        kn = KneserNey(corpus.train, V, order)
        ppl = {split: perplexity(*kn.nll(getattr(corpus, split))) for split in ("val", "test")}
        rows[f"{order}-gram Kneser-Ney"] = ppl
        print(f"{order}-gram Kneser-Ney: val {ppl['val']:.2f} test {ppl['test']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if best is None or ppl["val"] < rows[best]["val"]:
            best = f"{order}-gram Kneser-Ney"
    for split in ("val", "test"):
        ref = reference_baselines(corpus.train, getattr(corpus, split), V, 2, has_unk=has_unk)
        rows.setdefault("uniform", {})[split] = ref["uniform_ppl"]
        rows.setdefault("unigram", {})[split] = ref["unigram_ppl"]
    text = {split: corpus.vocab.decode(getattr(corpus, split).tolist())
            for split in ("train", "val", "test")}
    t0 = time.perf_counter()
    rows[f"PPMd order {PPMD_ORDER}"] = ppmd_perplexities(text["train"], text["val"],
                                                          text["test"])
    print(f"PPMd order {PPMD_ORDER}: {time.perf_counter() - t0:.0f} s", flush=True)
    for run in args.run:
        import gru_lm

        scored = gru_lm.evaluate([run], "test", methods=args.methods)
        for row in scored.rows:  # (static first; each with the val figure it was chosen on)
            rows[f"{Path(run).name}: {row.name}"] = {"val": row.val_ppl, "test": row.ppl}
    ppmd_test = rows[f"PPMd order {PPMD_ORDER}"]["test"]
    print(f"\n{'':<40} {'val':>9} {'test':>9} {'test / PPMd':>12}")
    for name, ppl in rows.items():
        mark = " (best order on val)" if name == best else ""
        print(f"{name + mark:<40} {ppl['val']:>9.2f} {ppl['test']:>9.2f} "
              f"{ppl['test'] / ppmd_test:>12.3f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "source": corpus.source,
                                         "rows": rows, "best_ngram": best}, indent=2,
                                        ensure_ascii=False))
    assert all(math.isfinite(v) for r in rows.values() for v in r.values())


if __name__ == "__main__":
    main()
