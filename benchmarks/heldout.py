"""The README's held-out table: every way of scoring, for single runs and for ensembles.

For each run: static, cache, dynamic and dynamic + cache scores of val and test (each
member's settings chosen on its val split, gru_lm/evaluation.py), kept per token; then, for
every group of runs (the seeds of a config, and all of them together), the same rows for
the ensemble, and every row mixed with the Kneser-Ney n-gram model (weight chosen on val).
Single-run rows are reported as mean ± std over the runs of a config. Each run's scores are
computed once, so the ensembles cost no second pass; `gru-lm evaluate --run A --run B ...`
gives the same figures one ensemble at a time.

Run: python benchmarks/heldout.py runs/cmp/lstm-s0 runs/cmp/lstm-s1 ... [--order 8]
     [--json out.json] [--scores DIR [--only-score]]  (DIR keeps each run's scores, so runs
     can be scored in separate calls, on separate cores, and combined in the last)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line  # noqa: E402


def main() -> None:
    import torch

    from gru_lm.comparison import _SEEDED
    from gru_lm.evaluation import check_methods, member_scores
    from gru_lm.evaluation import perplexity_of as ppl
    from gru_lm.members import load_member, locate, scoring_corpus
    from gru_lm.metrics import mixture_log_probs, mixture_weight
    from gru_lm.ngram import KneserNey
    from gru_lm.scorers import Scored, Texts, ensemble

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--order", type=int, default=8, help="n-gram order of the mixture")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--scores", type=Path, default=None,
                    help="keep each run's per-token scores here and reuse them")
    ap.add_argument("--methods", default="cache,dynamic",
                    help="the scorers beside static, comma-separated (gru_lm/scorers.py)")
    ap.add_argument("--only-score", action="store_true",
                    help="score the runs (into --scores) and stop")
    args = ap.parse_args()
    print(cpu_line(), f"| {torch.get_num_threads()} threads", flush=True)
    methods = check_methods(m for m in args.methods.split(",") if m)
    members = [load_member(locate(r).checkpoint) for r in args.runs]
    corpus = scoring_corpus(members, offline=None)
    val, test = corpus.val, corpus.test
    ngram = KneserNey(corpus.train, len(corpus.vocab), args.order)
    counted = {"val": torch.from_numpy(ngram.log_probs(val)).float(),
               "test": torch.from_numpy(ngram.log_probs(test)).float()}
    scores = {}
    for run, m in zip(args.runs, members, strict=True):
        saved = args.scores / f"{run.name}.pt" if args.scores else None
        if saved is not None and saved.is_file():  # scored by an earlier call
            scores[str(run)] = {k: Scored(**v) for k, v in torch.load(saved).items()}
            continue
        t0 = time.perf_counter()
        scores[str(run)] = member_scores(m, Texts(val, test, corpus.train), methods)
        print(f"scored {run} in {time.perf_counter() - t0:.0f} s", flush=True)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: vars(v) for k, v in scores[str(run)].items()}, saved)
    if args.only_score:
        return

    def label(run: Path) -> str:
        m = _SEEDED.match(run.name)
        return m.group("label") if m else run.name

    groups: dict[str, list[str]] = {}
    for run in args.runs:
        groups.setdefault(label(run), []).append(str(run))
    if len(groups) > 1:
        groups["all"] = [str(r) for r in args.runs]

    rows = []
    names = list(next(iter(scores.values())))
    for group, runs in groups.items():
        for name in names:
            parts = [scores[r][name] for r in runs]
            singles = [(ppl(p.val), ppl(p.target)) for p in parts]
            ens_val = ensemble([p.val for p in parts])
            ens_test = ensemble([p.target for p in parts])
            w = mixture_weight(ens_val, counted["val"])
            mixed = (ppl(mixture_log_probs(ens_val, counted["val"], w)),
                     ppl(mixture_log_probs(ens_test, counted["test"], w)))
            single_mixed = []
            for p in parts:
                ws = mixture_weight(p.val, counted["val"])
                single_mixed.append((ppl(mixture_log_probs(p.val, counted["val"], ws)),
                                     ppl(mixture_log_probs(p.target, counted["test"], ws))))
            for how, single, ens in ((name, singles, (ppl(ens_val), ppl(ens_test))),
                                     (f"{name} + {args.order}-gram", single_mixed, mixed)):
                row = {"group": group, "scored": how, "runs": len(runs),
                       "val_mean": statistics.fmean(v for v, _ in single),
                       "test_mean": statistics.fmean(t for _, t in single),
                       "val_std": statistics.stdev(v for v, _ in single) if len(runs) > 1
                       else 0.0,
                       "test_std": statistics.stdev(t for _, t in single) if len(runs) > 1
                       else 0.0,
                       "ensemble_val": ens[0], "ensemble_test": ens[1]}
                rows.append(row)
    print(f"{'group':<12} {'scored':<26} {'val (mean ± std)':>17} {'test (mean ± std)':>18} "
          f"{'ens. val':>9} {'ens. test':>9}")
    for r in rows:
        print(f"{r['group']:<12} {r['scored']:<26} {r['val_mean']:8.3f} ± {r['val_std']:.3f} "
              f"{r['test_mean']:9.3f} ± {r['test_std']:.3f} {r['ensemble_val']:9.3f} "
              f"{r['ensemble_test']:9.3f}")
    best = min(rows, key=lambda r: r["ensemble_val"])
    print(f"best on val: {best['group']} {best['scored']}, ensemble of {best['runs']}: "
          f"val {best['ensemble_val']:.3f}, test {best['ensemble_test']:.3f}")
    if args.json:
        settings = {r: {k: v.settings for k, v in s.items()} for r, s in scores.items()}
        args.json.write_text(json.dumps({"cpu": cpu_line(), "rows": rows,
                                         "settings": settings}, indent=2))


if __name__ == "__main__":
    main()
