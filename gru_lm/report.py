"""A comparison's report: finished runs read, rescored as one stream, grouped by recipe,
compared pair by pair with verdicts, and written as results.json/.csv, verdicts.csv,
curves.png and samples.md."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gru_lm.config import recipe_key
from gru_lm.data import Corpus
from gru_lm.decoding import DEFAULT_TEMPERATURE, Decoding
from gru_lm.display import html_table
from gru_lm.errors import GruLmError
from gru_lm.evaluation import perplexity_of
from gru_lm.members import Member, check_distinct, load_member, locate, scoring_corpus
from gru_lm.metrics import mixture_weights, token_log_probs
from gru_lm.plots import plot_curves
from gru_lm.rundir import RunDir
from gru_lm.sampling import encode_prefix, generate, run_prefixes
from gru_lm.scorers import ensemble
from gru_lm.stats import block_bootstrap, paired_seeds, t_interval, verdict
from gru_lm.utils import write_output

SEEDED = re.compile(r"^(?P<label>.+)-s(?P<seed>\d+)$")  # a member's folder: LABEL-sSEED


@dataclass
class ScoredRun:
    """A finished run as the report reads it: its folder, its recipe's label (the folder's
    name without -sN), summary, evaluations, seed and recipe; once scored (_score_members),
    its best checkpoint loaded, the corpus it was scored on, and its per-token log-probs on
    val and test as one stream (None: a split with no tokens)."""

    dir: Path
    label: str
    summary: dict[str, Any]
    evals: list[dict[str, Any]]
    seed: int
    recipe: dict[str, Any]
    member: Member | None = None
    corpus: Corpus | None = None
    val: Tensor | None = None
    test: Tensor | None = None

    @classmethod
    def read(cls, run_dir: Path) -> ScoredRun:
        run = RunDir(run_dir)
        summary = run.read_summary()
        m = SEEDED.match(run.name)
        cfg = run.read_config()
        return cls(run.path, m.group("label") if m else run.name, summary, run.evals(),
                   cfg.train.seed, cfg.recipe())


def group_members(runs: list[ScoredRun]) -> tuple[dict[str, list[ScoredRun]], dict[str, str]]:
    """Members grouped by recipe, not by folder: one group per recipe, named by its first
    member's folder label (made unique), and for a group whose label another group has too,
    what differs between them."""
    by_recipe: dict[str, list[ScoredRun]] = {}
    for r in runs:
        by_recipe.setdefault(recipe_key(r.recipe), []).append(r)
    groups: dict[str, list[ScoredRun]] = {}
    differs: dict[str, str] = {}
    for members in by_recipe.values():
        label, n = members[0].label, 2
        name = label
        while name in groups:
            name, n = f"{label} ({n})", n + 1
        if name != label:
            first, mine = groups[label][0].recipe, members[0].recipe
            keys = [k for k in mine if mine[k] != first.get(k)]
            differs[name] = f"another recipe than {label}: " + "; ".join(
                f"{k} {mine[k]!r} (not {first.get(k)!r})" for k in keys[:4])
        groups[name] = members
    return groups, differs


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0 if xs else None


def _time_to(evals: list[dict[str, Any]], target: float) -> float | None:
    for e in evals:
        if e.get("val_ppl") is not None and e["val_ppl"] <= target:
            return e.get("elapsed_s")
    return None


def _score_members(runs: list[ScoredRun], offline: bool | None = None) -> None:
    """Load every member's best checkpoint once (kept as r.member for the samples) and
    score it on val and test as one stream (float32 per token, kept for the ensembles and
    the bootstrap); all members must share one corpus, the text they were trained on."""
    members = [load_member(locate(r.dir).checkpoint) for r in runs]
    corpus = scoring_corpus(members, offline)
    cap = members[0].cfg.train.eval_max_tokens
    for r, m in zip(runs, members, strict=True):
        r.member, r.corpus = m, corpus
        r.val, r.test = (token_log_probs(m.model, ids, *m.cfg.train.reading)
                         if len(ids) > 1 else None
                         for ids in (corpus.val[:cap], corpus.test[:cap]))


def _scores(runs: list[ScoredRun], split: str) -> list[Tensor]:
    """The runs' per-token log-probs on `split` (scored, and the split has tokens)."""
    out = [getattr(r, split) for r in runs]
    assert all(x is not None for x in out), f"{split} was not scored"
    return out


def _interval(xs: list[float | None]) -> dict[str, float] | None:
    iv = t_interval([x for x in xs if x is not None])
    return None if iv is None else {"low": iv.low, "high": iv.high}


def _mean_nll(by_seed: dict[int, ScoredRun], seeds: list[int]):
    """Per-token test NLL averaged over the given seeds (float64 numpy)."""
    return -torch.stack(_scores([by_seed[s] for s in seeds], "test")).double().mean(0).numpy()


def _comparisons(groups: dict[str, list[ScoredRun]]) -> list[dict[str, Any]]:
    """Every pair of models: the change of test perplexity over paired seeds (t interval) and
    over blocks of the test text (paired bootstrap of the mean over seeds), and a verdict."""
    out = []
    labels = list(groups)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            by_seed = {x: {r.seed: r for r in groups[x]} for x in (a, b)}
            # seeds pair up when each model ran each seed once
            seeds = sorted(set(by_seed[a]) & set(by_seed[b])) if all(
                len(by_seed[x]) == len(groups[x]) for x in (a, b)) else []
            if not seeds or groups[a][0].test is None:
                continue
            nll = {x: _mean_nll(by_seed[x], seeds) for x in (a, b)}
            lo, hi = (a, b) if nll[a].mean() <= nll[b].mean() else (b, a)  # lo: the better
            seed_iv = paired_seeds([_ppl(by_seed[lo][s].test) for s in seeds],
                                   [_ppl(by_seed[hi][s].test) for s in seeds])
            text_iv = block_bootstrap(nll[lo], nll[hi])
            out.append({
                "better": lo, "worse": hi, "paired_seeds": seeds,
                "change_pct": seed_iv.mean if seed_iv else text_iv.mean,
                "seeds_ci_pct": None if seed_iv is None else [seed_iv.low, seed_iv.high],
                "bootstrap_ci_pct": [text_iv.low, text_iv.high],
                "verdict": verdict(lo, hi, seed_iv, text_iv)})
    return out


def _ppl(logp) -> float:
    """A member's perplexity on a split it was scored on (it has tokens)."""
    ppl = perplexity_of(logp)
    assert ppl is not None
    return ppl


def _check_one_experiment_each(runs: list[ScoredRun]) -> None:
    """Two folders with the same recipe and the same seed are one experiment (a copy, or the
    same config trained twice): counted as two seeds they would shrink the interval to
    nothing and make any verdict look certain, so they are refused."""
    seen: dict[tuple[str, int], Path] = {}
    for r in runs:
        key = (recipe_key(r.recipe), r.seed)
        if key in seen:
            raise GruLmError(f"{seen[key]} and {r.dir} are one experiment (the same recipe "
                             f"and train.seed {r.seed}), not two seeds; counted twice they "
                             "would fake a spread of zero. Give one of them (train other "
                             "seeds with train.seed=N)")
        seen[key] = r.dir


@dataclass
class ResultRow:
    """One line of the comparison: a recipe over its seeds (mean, std, 95% interval),
    ("ensemble") the average of its seeds' probabilities, or ("weighted") every run of every
    recipe mixed with weights fitted on val."""

    model: str  # the recipe's label (its first member's folder without -sN)
    kind: str  # "seeds", "ensemble" or "weighted"
    name: str | None  # the registered model
    seeds: int
    params: int | None
    val_ppl_mean: float | None
    test_ppl_mean: float | None
    val_bpc_mean: float | None
    stopped_by: list[str]
    differs: str = ""  # how this recipe differs from another with the same label
    val_ppl_std: float | None = None
    val_ppl_ci95: dict[str, float] | None = None
    test_ppl_std: float | None = None
    test_ppl_ci95: dict[str, float] | None = None
    train_ppl_mean: float | None = None
    tokens_per_s_mean: float | None = None
    wall_s_mean: float | None = None
    tokens_seen_mean: float | None = None
    target_val_ppl: float | None = None
    time_to_target_s_mean: float | None = None
    member_weights: dict[str, float] | None = None  # "weighted": each run's weight (val)


@dataclass
class Comparison:
    """What `gru-lm compare` prints and writes: a row per recipe (and one per ensemble of its
    seeds), a comparison of every pair, and one sentence a pair."""

    rows: list[ResultRow]
    comparisons: list[dict[str, Any]]
    verdicts: list[str]
    references: dict[str, Any]
    members: list[str]
    out: Path
    target_val_ppl: float | None = None
    scoring: str = ""

    def to_json(self) -> dict[str, Any]:
        """results.json: every field, the rows as objects."""
        d = asdict(self)
        d.pop("out")
        return d

    def _repr_html_(self) -> str:
        rows = [(r.model, r.seeds, r.val_ppl_mean, _half(r.val_ppl_ci95), r.test_ppl_mean,
                 _half(r.test_ppl_ci95), r.tokens_per_s_mean) for r in self.rows]
        table = html_table("comparison (mean ± 95% CI over seeds)",
                           ["model", "seeds", "val ppl", "±", "test ppl", "±", "tok/s"], rows)
        return table + "".join(f"<p>{html.escape(v)}</p>" for v in self.verdicts)


def _half(iv: dict[str, float] | None) -> float | None:
    return None if iv is None else (iv["high"] - iv["low"]) / 2


def report(run_dirs: list[Path], out: Path, offline: bool | None = None) -> Comparison:
    """Aggregate finished runs by recipe, rescored as one stream; add each recipe's ensemble
    and a verdict for every pair; write results.csv/.json, verdicts.csv, curves.png and
    samples.md."""
    check_distinct(run_dirs, "run folder (each run counts once)")
    runs = [ScoredRun.read(Path(d)) for d in run_dirs]
    _check_one_experiment_each(runs)
    _score_members(runs, offline)
    groups, differs = group_members(runs)
    target = _target_val_ppl(groups)
    rows = []
    for label, g in groups.items():
        rows.append(_seed_row(label, g, differs.get(label, ""), target))
        if len(g) > 1 and g[0].val is not None:
            rows.append(_ensemble_row(f"{label} ensemble", g))
    if len(groups) > 1 and runs[0].val is not None:
        rows.append(_ensemble_row("all runs, weighted on val", runs, weighted=True))
    comparisons = _comparisons(groups)
    first = runs[0].summary
    result = Comparison(
        rows=rows, comparisons=comparisons, verdicts=[c["verdict"] for c in comparisons],
        references={k: first[k] for k in ("uniform_ppl", "unigram_ppl", "ngram_order",
                                          "ngram_ppl") if k in first},
        members=[str(r.dir) for r in runs], out=out, target_val_ppl=target,
        scoring="best checkpoint of each member, val and test each read as one stream; "
                "ensembles average the seeds' probabilities; the ensemble of every run "
                "weights them by EM on val")
    _write_report(result, groups, out)
    return result


def _target_val_ppl(groups: dict[str, list[ScoredRun]]) -> float | None:
    """The worst recipe's mean best val perplexity: every recipe reaches it."""
    means = [_mean(perplexity_of(r.val) for r in g) for g in groups.values()]
    finite = [v for v in means if v is not None]
    return max(finite) if finite else None


def _seed_row(label: str, g: list[ScoredRun], differs: str, target: float | None) -> ResultRow:
    s = [r.summary for r in g]
    val = [perplexity_of(r.val) for r in g]
    test = [perplexity_of(r.test) for r in g]
    return ResultRow(
        model=label, kind="seeds", differs=differs, name=s[0].get("model"), seeds=len(g),
        params=s[0].get("params"), val_ppl_mean=_mean(val), val_ppl_std=_std(val),
        val_ppl_ci95=_interval(val), test_ppl_mean=_mean(test), test_ppl_std=_std(test),
        test_ppl_ci95=_interval(test),
        train_ppl_mean=_mean(x.get("final_train_ppl") for x in s),
        val_bpc_mean=_mean(math.log2(v) for v in val if v is not None),
        tokens_per_s_mean=_mean(x.get("tokens_per_s") for x in s),
        wall_s_mean=_mean(x.get("elapsed_s") for x in s),
        tokens_seen_mean=_mean(x.get("tokens_seen") for x in s),
        stopped_by=sorted({x.get("stop_reason", "") for x in s}), target_val_ppl=target,
        time_to_target_s_mean=_mean(_time_to(r.evals, target) for r in g)
        if target else None)


def _ensemble_row(label: str, g: list[ScoredRun], weighted: bool = False) -> ResultRow:
    """The runs of `g` in one ensemble: their probabilities averaged ("ensemble": the seeds
    of one recipe) or mixed with weights fitted on val ("weighted", EM on the next-character
    mixture: every run of every recipe, what diversity gives beside more seeds)."""
    weights = mixture_weights(_scores(g, "val")) if weighted else None
    val = perplexity_of(ensemble(_scores(g, "val"), weights))
    params = [r.summary.get("params") for r in g]
    return ResultRow(
        model=label, kind="weighted" if weighted else "ensemble",
        name=None if weighted else g[0].summary.get("model"), seeds=len(g),
        params=sum(p for p in params if p) if all(params) else None, val_ppl_mean=val,
        test_ppl_mean=perplexity_of(ensemble(_scores(g, "test"), weights))
        if g[0].test is not None else None,
        val_bpc_mean=None if val is None else math.log2(val), stopped_by=[],
        member_weights=None if weights is None else
        dict(zip(distinct_names([Path(r.dir) for r in g]), weights, strict=True)))


def distinct_names(paths: list[Path]) -> list[str]:
    """A name for each run folder that tells it from the others: its own name, or as many of
    its parent folders as it takes (runs/base and other/base: runs/base, other/base)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth, strict=True)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def _write_report(result: Comparison, groups: dict[str, list[ScoredRun]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    write_output(out / "results.json", lambda f: f.write(json.dumps(data, indent=2) + "\n"),
                 "w")
    _write_csv(out / "results.csv", data["rows"])
    _write_csv(out / "verdicts.csv", [
        {"better": c["better"], "worse": c["worse"],
         "paired_seeds": [str(x) for x in c["paired_seeds"]], "change_pct": c["change_pct"],
         "seeds_ci_low_pct": (c["seeds_ci_pct"] or [None, None])[0],
         "seeds_ci_high_pct": (c["seeds_ci_pct"] or [None, None])[1],
         "bootstrap_ci_low_pct": c["bootstrap_ci_pct"][0],
         "bootstrap_ci_high_pct": c["bootstrap_ci_pct"][1], "verdict": c["verdict"]}
        for c in result.comparisons])
    plot_curves({label: [r.evals for r in g] for label, g in groups.items()},
                out / "curves.png")
    write_samples(groups, out / "samples.md")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One CSV line a row (lists joined with "; ", intervals as low..high, member weights as
    "name w; ..."), written whole."""
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row)) or ["verdict"]
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    write_output(path, lambda f: f.write(buf.getvalue()), "w")


def _csv_cell(v: Any) -> Any:
    if isinstance(v, list):
        return "; ".join(v)
    if isinstance(v, dict):
        return f"{v['low']}..{v['high']}" if "low" in v else \
            "; ".join(f"{k} {w}" for k, w in v.items())
    return v


# ---------------------------------------------------------------- samples


def write_samples(groups: dict[str, list[ScoredRun]], path: Path) -> None:
    """Continuations of each recipe's own sample prefixes (train.sample_prefixes, or ones
    from its text: sampling.run_prefixes), greedy and sampled, from its first seed's model
    (loaded once, when it was scored)."""
    lines = ["# Samples", "", "Sampled (each model's train.sample_temperature, seed 0) and "
             "greedy (the book's argmax) continuations of each model's train.sample_prefixes, "
             "from its first seed's best checkpoint; each line holds the continuation only, "
             "after the prefix it continues.", ""]
    for label, g in groups.items():
        lines += [f"## {label}", "", *_sample_lines(g[0].member, g[0].corpus), ""]
    write_output(path, lambda f: f.write("\n".join(lines)), "w")


SAMPLE_CHARS = 80  # characters of each continuation in samples.md


def _sample_lines(m, corpus) -> list[str]:
    cfg, vocab, lines = m.cfg, m.vocab, []
    for prefix in run_prefixes(cfg, corpus):
        try:
            ids, _ = encode_prefix(prefix, vocab, cfg.data)
        except GruLmError as e:
            lines.append(f"- `{prefix}`: (no sample: {e})")
            continue
        t = cfg.train.sample_temperature or DEFAULT_TEMPERATURE
        sampled = vocab.decode(generate(m.model, ids, Decoding(SAMPLE_CHARS, t))[0])
        greedy = vocab.decode(generate(m.model, ids, Decoding(SAMPLE_CHARS, None, seed=None))[0])
        lines += [f"- prefix `{vocab.decode(ids)}`, continued:",
                  f"  - sampled at {t:g}: `{sampled}`", f"  - greedy: `{greedy}`"]
    return lines

