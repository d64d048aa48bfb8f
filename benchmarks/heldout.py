"""The README's held-out table: every way of scoring, for single runs and for ensembles.

For each run: static, cache, dynamic and dynamic + cache scores of val and test (each
member's settings chosen on its val split, gru_lm/evaluation.py), kept per token; then, for
every group of runs (the seeds of a config, all of them together, and each --set), the
same rows for the ensemble, equally weighted and with member weights fitted on val (EM),
and every row mixed with the Kneser-Ney n-gram model (weight chosen on val). Each group's
training cost is the core-minutes its runs trained (train_time_s x threads).
Single-run rows are reported as mean ± std over the runs of a config. Each run's scores are
computed once, so the ensembles cost no second pass; `gru-lm evaluate --run A --run B ...`
gives the same figures one ensemble at a time.

Run: python benchmarks/heldout.py runs/cmp/lstm-s0 runs/cmp/lstm-s1 ... [--order 8]
     [--json out.json] [--scores DIR [--only-score]]  (DIR keeps each run's scores, so runs
     can be scored in separate calls, on separate cores, and combined in the last)
     [--set NAME=RUN,RUN,...]  (a group of your own, runs named by folder name)
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

    from gru_lm.evaluation import check_methods, member_scores
    from gru_lm.evaluation import perplexity_of as ppl
    from gru_lm.members import load_member, locate, scoring_corpus
    from gru_lm.metrics import mixture_log_probs, mixture_weight, mixture_weights
    from gru_lm.ngram import KneserNey
    from gru_lm.report import SEEDED
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
    ap.add_argument("--set", action="append", default=[], metavar="NAME=RUN,RUN",
                    help="one more group of the given runs (folder names); repeatable")
    args = ap.parse_args()
    sets = _sets(args.set, args.runs)  # (checked before anything is scored)
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
        m = SEEDED.match(run.name)
        return m.group("label") if m else run.name

    groups: dict[str, list[str]] = {}
    for run in args.runs:
        groups.setdefault(label(run), []).append(str(run))
    if len(groups) > 1:
        groups["all"] = [str(r) for r in args.runs]
    groups.update(sets)
    cost = {str(r): _core_minutes(r) for r in args.runs}

    def mixed(val_lp, test_lp):
        w = mixture_weight(val_lp, counted["val"])
        return (ppl(mixture_log_probs(val_lp, counted["val"], w)),
                ppl(mixture_log_probs(test_lp, counted["test"], w)))

    rows = []
    names = list(next(iter(scores.values())))
    for group, runs in groups.items():
        for name in names:
            parts = [scores[r][name] for r in runs]
            singles = [(ppl(p.val), ppl(p.target)) for p in parts]
            single_mixed = [mixed(p.val, p.target) for p in parts]
            weights = mixture_weights([p.val for p in parts]) if len(parts) > 1 else [1.0]
            uniform = [ensemble([p.val for p in parts]), ensemble([p.target for p in parts])]
            fitted = [ensemble([p.val for p in parts], weights),
                      ensemble([p.target for p in parts], weights)]
            for how, single, ens, ens_w in (
                    (name, singles, [ppl(x) for x in uniform], [ppl(x) for x in fitted]),
                    (f"{name} + {args.order}-gram", single_mixed, mixed(*uniform),
                     mixed(*fitted))):
                rows.append({
                    "group": group, "scored": how, "runs": len(runs),
                    "core_minutes": sum(cost[r] for r in runs),
                    "val_mean": statistics.fmean(v for v, _ in single),
                    "test_mean": statistics.fmean(t for _, t in single),
                    "val_std": statistics.stdev(v for v, _ in single) if len(runs) > 1
                    else 0.0,
                    "test_std": statistics.stdev(t for _, t in single) if len(runs) > 1
                    else 0.0,
                    "ensemble_val": ens[0], "ensemble_test": ens[1],
                    "weighted_val": ens_w[0], "weighted_test": ens_w[1],
                    "weights": dict(zip([Path(r).name for r in runs], weights, strict=True))})
    print(f"{'group':<12} {'scored':<26} {'core-min':>8} {'val (mean ± std)':>17} "
          f"{'test (mean ± std)':>18} {'ens. val':>9} {'ens. test':>9} {'wtd val':>8} "
          f"{'wtd test':>8}")
    for r in rows:
        print(f"{r['group']:<12} {r['scored']:<26} {r['core_minutes']:8.1f} "
              f"{r['val_mean']:8.3f} ± {r['val_std']:.3f} {r['test_mean']:9.3f} ± "
              f"{r['test_std']:.3f} {r['ensemble_val']:9.3f} {r['ensemble_test']:9.3f} "
              f"{r['weighted_val']:8.3f} {r['weighted_test']:8.3f}")
    for group, runs in groups.items():
        if len(runs) > 1:
            w = next(r["weights"] for r in rows if r["group"] == group)
            print(f"weights of {group} ({names[0]}): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in w.items()))
    best = min(rows, key=lambda r: min(r["ensemble_val"], r["weighted_val"]))
    print(f"best on val: {best['group']} {best['scored']}, ensemble of {best['runs']}: "
          f"val {best['ensemble_val']:.3f}, test {best['ensemble_test']:.3f} (weighted: val "
          f"{best['weighted_val']:.3f}, test {best['weighted_test']:.3f})")
    if args.json:
        settings = {r: {k: v.settings for k, v in s.items()} for r, s in scores.items()}
        args.json.write_text(json.dumps({"cpu": cpu_line(), "rows": rows,
                                         "settings": settings}, indent=2))


def _sets(specs: list[str], runs: list[Path]) -> dict[str, list[str]]:
    """--set NAME=RUN,RUN,... as groups of run paths (runs named by folder name)."""
    by_name = {r.name: str(r) for r in runs}
    sets = {}
    for spec in specs:
        name, _, members = spec.partition("=")
        unknown = [x for x in members.split(",") if x not in by_name]
        if not name or unknown or not members:
            sys.exit(f"--set {spec}: give NAME=RUN,RUN with runs among the arguments "
                     f"(unknown: {', '.join(unknown) or 'none given'})")
        sets[name] = [by_name[x] for x in members.split(",")]
    return sets


def _core_minutes(run: Path) -> float:
    """The core-minutes a run trained: its training seconds times its threads, / 60."""
    s = json.loads((run / "summary.json").read_text())
    return s["train_time_s"] * (s.get("threads") or 1) * (s.get("processes") or 1) / 60


if __name__ == "__main__":
    main()
