"""Compare models honestly: same data, split, vocabulary and budget; seeds; table, CSV, plots."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from gru_lm.config import load_config
from gru_lm.errors import GruLmError, TrainingInterrupted
from gru_lm.rundir import RunDir
from gru_lm.utils import write_output

_SEEDED = re.compile(r"^(?P<label>.+)-s(?P<seed>\d+)$")


@dataclass(frozen=True)
class Budget:
    """One limit imposed on every member run, or None to keep each config's own."""

    seconds: float | None = None
    epochs: int | None = None
    tokens: int | None = None

    def overrides(self, batch_size: int, num_steps: int) -> list[str]:
        given = [x for x in (self.seconds, self.epochs, self.tokens) if x is not None]
        if len(given) > 1:
            raise GruLmError("give at most one of --budget-s, --epochs, --tokens")
        if not given:
            return []
        off = ["train.time_budget_s=null", "train.epochs=null", "train.max_steps=null",
               "train.early_stopping_patience=null"]
        if self.seconds is not None:
            return off + [f"train.time_budget_s={self.seconds}"]
        if self.epochs is not None:
            return off + [f"train.epochs={self.epochs}"]
        assert self.tokens is not None  # (the one left)
        steps = max(1, math.ceil(self.tokens / (batch_size * num_steps)))
        return off + [f"train.max_steps={steps}"]


def _check_budget(budget: Budget) -> None:
    for name, v in (("--budget-s", budget.seconds), ("--epochs", budget.epochs),
                    ("--tokens", budget.tokens)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise GruLmError(f"{name} {v} is invalid; give a finite number > 0")


def run_comparison(configs: list[Path], *, seeds: int, budget: Budget, out: Path,
                   resume: bool, offline: bool | None, console=None, jobs: int = 1
                   ) -> Comparison:
    """Train every config x seed into `out` (`jobs` members at a time, each in a process of
    its own), then write the report."""
    if not configs:
        raise GruLmError("give at least one config (e.g. configs/gru.yaml configs/lstm.yaml) "
                         "or --runs DIR ...")
    if not 1 <= seeds <= 100:
        raise GruLmError(f"--seeds {seeds} is out of range; give 1..100")
    _check_jobs(jobs)
    _check_budget(budget)
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise GruLmError(f"config names must differ, got {', '.join(stems)}")
    loaded = [load_config(c) for c in configs]
    for c, cfg in zip(configs, loaded, strict=True):  # the budget must suit every member
        load_config(c, budget.overrides(cfg.train.batch_size, cfg.train.num_steps))
    recipes: dict[str, Path] = {}
    for c, cfg in zip(configs, loaded, strict=True):
        key = recipe_key(recipe(cfg))
        if key in recipes:
            raise GruLmError(f"{recipes[key]} and {c} are the same recipe (they differ only in "
                             "the seed, the run folder or how progress is shown), so their "
                             "runs of each seed would be one experiment counted twice; give "
                             f"one of them, and --seeds N for more seeds")
        recipes[key] = c
    data0 = loaded[0].data.model_dump(mode="json")
    for c, cfg in zip(configs[1:], loaded[1:], strict=True):
        if cfg.data.model_dump(mode="json") != data0:
            raise GruLmError(f"{c}: its data section differs from {configs[0]}'s; a fair "
                             "comparison needs the same corpus, split and vocabulary")
    if out.exists() and not resume and any(out.iterdir()):
        raise GruLmError(f"{out} already exists; continue it with --resume or pick another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _train_members(configs, loaded, seeds, budget, out, offline, console, jobs)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a comparison that failed to start leaves no empty folder
        raise
    return report([out / f"{Path(c).stem}-s{s}" for c in configs for s in range(seeds)], out,
                  offline)


def _check_jobs(jobs: int) -> None:
    from gru_lm.building import usable_cores

    if not 1 <= jobs <= usable_cores():
        raise GruLmError(f"--jobs {jobs} is out of range: this machine has {usable_cores()} "
                         f"usable core(s); give 1..{usable_cores()} (each job needs a core)")


@dataclass
class _Member:
    """One config x seed of a comparison: its folder, and how to train (or continue) it."""

    number: int
    name: str
    run: RunDir
    config: Path
    overrides: list[str]


def _members(configs: list[Path], loaded: list, seeds: int, budget: Budget, out: Path
             ) -> list[_Member]:
    """Every member, in order, each kept folder checked against this call's recipe."""
    members: list[_Member] = []
    for cfg_path, cfg in zip(configs, loaded, strict=True):
        for seed in range(seeds):
            name = f"{Path(cfg_path).stem}-s{seed}"
            m = _Member(len(members) + 1, name, RunDir(out / name), Path(cfg_path),
                        [f"train.seed={seed}", f"run.runs_dir={out}",
                         *budget.overrides(cfg.train.batch_size, cfg.train.num_steps)])
            if m.run.config.is_file():
                _check_same_recipe(m.run, m.config, m.overrides)
            if m.run.path.exists() and not m.run.summary.is_file() and \
                    not m.run.checkpoint().is_file():
                raise GruLmError(f"{m.run} exists without a checkpoint; remove that folder "
                                 "and run again with --resume")
            members.append(m)
    return members


def _train_members(configs: list[Path], loaded: list, seeds: int, budget: Budget, out: Path,
                   offline: bool | None, console, jobs: int = 1) -> None:
    members = _members(configs, loaded, seeds, budget, out)
    todo = []
    for m in members:
        if m.run.summary.is_file():
            if console is not None:
                console.print(f"[dim]{escape(f'member {m.number}/{len(members)} {m.name}')}: "
                              "finished earlier, kept[/dim]")
        else:
            todo.append(m)
    try:
        if jobs > 1:
            _train_in_processes(todo, len(members), jobs, offline, console)
        else:
            _train_here(todo, len(members), offline, console)
    except TrainingInterrupted as e:  # (its message: the members it stopped)
        args = " ".join(str(c) for c in configs)
        more = f" --jobs {jobs}" if jobs > 1 else ""
        raise TrainingInterrupted(
            f"comparison interrupted in {e}; finished members are kept. Continue with: gru-lm "
            f"compare {args} --seeds {seeds}{more} --out {out} --resume (and the same budget "
            "option)", exit_code=e.exit_code) from None


def _train_here(todo: list[_Member], total: int, offline: bool | None, console) -> None:
    """The members one after another, in this process."""
    from gru_lm.runner import train_run

    durations: list[float] = []  # wall seconds of the members trained in this call
    for k, m in enumerate(todo):
        if console is not None:
            left = len(todo) - k
            eta = (f", about {_duration(statistics.fmean(durations) * left)} left"
                   if durations else "")
            console.rule(escape(f"member {m.number}/{total}: {m.name}{eta}"))
        started = time.perf_counter()
        try:
            if m.run.checkpoint().is_file():
                train_run(None, [], resume=m.run.path, offline=offline, console=console)
            else:
                train_run(m.config, m.overrides, name=m.name, offline=offline,
                          console=console)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(m.name, exit_code=e.exit_code) from None
        durations.append(time.perf_counter() - started)


def _train_in_processes(todo: list[_Member], total: int, jobs: int, offline: bool | None,
                        console) -> None:
    """The members `jobs` at a time, each a `gru-lm train` process of its own with
    usable cores // jobs threads, its output in OUT/NAME.log. Ctrl-C and SIGTERM reach every
    running member once (each saves a checkpoint and stops; none more is started); a member
    that fails stops none of the others, and the comparison then fails naming it."""
    import signal

    from gru_lm.building import usable_cores

    pool = _Pool(max(1, usable_cores() // jobs), offline, console, total)
    old = {s: signal.signal(s, pool.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    queue = list(todo)
    try:
        while queue or pool.running:
            while queue and len(pool.running) < jobs and pool.stopped_by is None:
                pool.start(queue.pop(0))
            pool.reap()
            time.sleep(0.2)
    finally:
        if pool.running:  # (an error here: the members are not left behind)
            pool.stop(signal.SIGTERM, None)
            while pool.running:
                pool.reap()
                time.sleep(0.2)
        for s, handler in old.items():
            signal.signal(s, handler)
    if pool.stopped_by is not None:
        raise TrainingInterrupted(", ".join(pool.interrupted) or "no member",
                                  exit_code=128 + pool.stopped_by)
    if pool.failed:
        m, why = min(pool.failed, key=lambda f: f[0].number)  # (the first by number)
        raise GruLmError(f"member {m.name} ({why}); its output is in {pool.log(m)}")


class _Pool:
    """The member processes of `compare --jobs`: started, reaped, stopped together."""

    def __init__(self, threads: int, offline: bool | None, console, total: int):
        self.threads, self.offline, self.console, self.total = threads, offline, console, total
        self.running: dict[str, tuple[_Member, Any, float]] = {}  # name: member, Popen, start
        self.stopped_by: int | None = None  # the signal that stopped the comparison
        self.stopped_at = 0.0
        self.interrupted: list[str] = []
        self.failed: list[tuple[_Member, str]] = []  # with its exit status and last line

    def start(self, m: _Member) -> None:
        import subprocess
        import sys

        from gru_lm.distributed import LAUNCHER

        resuming = m.run.checkpoint().is_file()
        args = ["--resume", str(m.run.path)] if resuming else \
            ["--config", str(m.config), "--name", m.name, *m.overrides]
        log = self.log(m)
        # A resumed member's output goes on after what it wrote before; a new one's replaces
        # the log of an attempt that left no checkpoint.
        with open(log, "a" if resuming else "w", encoding="utf-8") as f:
            if resuming and f.tell():
                f.write(f"--- resumed by gru-lm compare at {time.strftime('%Y-%m-%d %H:%M:%S')}"
                        " ---\n")
                f.flush()
            # Its own session (a Ctrl-C at the terminal reaches it once, through stop()), and
            # the parent-death signal (LAUNCHER): if this process dies, even by kill -9, the
            # member saves a checkpoint and stops instead of training on unseen.
            p = subprocess.Popen(
                [sys.executable, "-m", "gru_lm", "train", "--quiet", *args,
                 *(["--offline"] if self.offline else []), f"train.threads={self.threads}"],
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, LAUNCHER: str(os.getpid())})
        self.running[m.name] = (m, p, time.perf_counter())
        self.say(m, f"started ({self.threads} thread{'s' * (self.threads > 1)}, output in "
                    f"{log})")

    def reap(self) -> None:
        """Note the members that ended; kill one still running a minute after a stop."""
        for name, (m, p, started) in list(self.running.items()):
            if p.poll() is None:
                if self.stopped_by is not None and \
                        time.monotonic() - self.stopped_at > STOP_GRACE_S:
                    p.kill()
                continue
            del self.running[name]
            if p.returncode == 0:
                self.say(m, f"finished in {_duration(time.perf_counter() - started)}")
            elif self.stopped_by is not None:
                self.interrupted.append(name)
            else:
                self.failed.append((m, f"exit {p.returncode}: {_last_line(self.log(m))}"))

    def stop(self, signum: int, _frame) -> None:
        """A signal handler: SIGINT to every running member (each saves and stops)."""
        import signal

        if self.stopped_by is None:
            self.stopped_by, self.stopped_at = signum, time.monotonic()
        for _, p, _ in self.running.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)

    @staticmethod
    def log(m: _Member) -> Path:
        return m.run.path.parent / f"{m.name}.log"

    def say(self, m: _Member, text: str) -> None:
        if self.console is not None:
            self.console.print(escape(f"member {m.number}/{self.total} {m.name}: {text}"),
                               highlight=False)


STOP_GRACE_S = 60  # how long an interrupted member may take to save before it is killed


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()
             if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def _check_same_recipe(run: RunDir, config: Path, overrides: list[str]) -> None:
    """A member kept from an earlier call must be what this call would train: a config edited
    in between would otherwise be averaged with runs of the old one."""
    kept, wanted = recipe(run.read_config()), recipe(load_config(config, overrides))
    changed = [k for k in wanted if wanted[k] != kept.get(k)]
    if changed:
        k = changed[0]
        raise GruLmError(f"{run} was trained from another recipe than {config} and this budget "
                         f"give now ({k}: {kept.get(k)!r} there, {wanted[k]!r} now); move it out "
                         f"of {run.path.parent} or compare into another --out")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ---------------------------------------------------------------- reading runs


def _read_run(run_dir: Path) -> dict[str, Any]:
    run = RunDir(run_dir)
    summary = run.read_summary()
    m = _SEEDED.match(run.name)
    label = m.group("label") if m else run.name
    cfg = run.read_config()
    return {"dir": run.path, "label": label, "summary": summary, "evals": run.evals(),
            "seed": cfg.train.seed, "recipe": recipe(cfg)}


# Keys that do not change what a run learns: runs differing only in these are seeds of one
# recipe. Everything else (model, data, optimizer, budget, evaluation) makes another row.
NOT_RECIPE = {"train.seed", "train.threads", "train.device", "train.log_interval",
              "train.tensorboard", "train.sample_interval", "train.sample_prefixes",
              "train.sample_length", "train.sample_temperature"}


def recipe(cfg) -> dict[str, Any]:
    """What a run is, as flat dotted keys: its config without the seed, the run folder and
    the settings that only change how it is shown or how fast it runs."""
    return {f"{section}.{k}": v for section, values in cfg.to_dict().items() if section != "run"
            for k, v in values.items() if f"{section}.{k}" not in NOT_RECIPE}


def recipe_key(rec: dict[str, Any]) -> str:
    """A recipe as one comparable string (runs with equal keys are seeds of one recipe)."""
    return json.dumps(rec, sort_keys=True)


def group_members(runs: list[dict]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Members grouped by recipe, not by folder: one group per recipe, named by its first
    member's folder label (made unique), and for a group whose label another group has too,
    what differs between them."""
    by_recipe: dict[str, list[dict]] = {}
    for r in runs:
        by_recipe.setdefault(recipe_key(r["recipe"]), []).append(r)
    groups: dict[str, list[dict]] = {}
    differs: dict[str, str] = {}
    for members in by_recipe.values():
        label, n = members[0]["label"], 2
        name = label
        while name in groups:
            name, n = f"{label} ({n})", n + 1
        if name != label:
            first, mine = groups[label][0]["recipe"], members[0]["recipe"]
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


def _time_to(evals: list[dict], target: float) -> float | None:
    for e in evals:
        if e.get("val_ppl") is not None and e["val_ppl"] <= target:
            return e.get("elapsed_s")
    return None


def _score_members(runs: list[dict], offline: bool | None = None) -> None:
    """Load every member's best checkpoint once (kept as r["member"] for the samples) and
    score it on val and test as one stream (float32 per token, kept for the ensembles and
    the bootstrap); all members must share one corpus, the text they were trained on."""
    from gru_lm.members import load_member, locate, scoring_corpus
    from gru_lm.metrics import token_log_probs

    members = [load_member(locate(r["dir"]).checkpoint) for r in runs]
    corpus = scoring_corpus(members, offline)
    cap = members[0].cfg.train.eval_max_tokens
    for r, m in zip(runs, members, strict=True):
        r["member"], r["corpus"] = m, corpus
        for split in ("val", "test"):
            ids = getattr(corpus, split)[:cap]
            r[split] = token_log_probs(m.model, ids, *m.cfg.train.reading) if len(ids) > 1 \
                else None


def _interval(xs: list[float | None]) -> dict[str, float] | None:
    from gru_lm.stats import t_interval

    iv = t_interval([x for x in xs if x is not None])
    return None if iv is None else {"low": iv.low, "high": iv.high}


def _mean_nll(by_seed: dict[int, dict], seeds: list[int]):
    """Per-token test NLL averaged over the given seeds (float64 numpy)."""
    import torch

    return -torch.stack([by_seed[s]["test"] for s in seeds]).double().mean(0).numpy()


def _comparisons(groups: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Every pair of models: the change of test perplexity over paired seeds (t interval) and
    over blocks of the test text (paired bootstrap of the mean over seeds), and a verdict."""
    from gru_lm.stats import block_bootstrap, paired_seeds, verdict

    out = []
    labels = list(groups)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            by_seed = {x: {r["seed"]: r for r in groups[x]} for x in (a, b)}
            # seeds pair up when each model ran each seed once
            seeds = sorted(set(by_seed[a]) & set(by_seed[b])) if all(
                len(by_seed[x]) == len(groups[x]) for x in (a, b)) else []
            if not seeds or groups[a][0]["test"] is None:
                continue
            nll = {x: _mean_nll(by_seed[x], seeds) for x in (a, b)}
            lo, hi = (a, b) if nll[a].mean() <= nll[b].mean() else (b, a)  # lo: the better
            seed_iv = paired_seeds([_ppl(by_seed[lo][s]["test"]) for s in seeds],
                                   [_ppl(by_seed[hi][s]["test"]) for s in seeds])
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
    from gru_lm.evaluation import perplexity_of

    ppl = perplexity_of(logp)
    assert ppl is not None
    return ppl


def _check_one_experiment_each(runs: list[dict]) -> None:
    """Two folders with the same recipe and the same seed are one experiment (a copy, or the
    same config trained twice): counted as two seeds they would shrink the interval to
    nothing and make any verdict look certain, so they are refused."""
    seen: dict[tuple[str, int], Path] = {}
    for r in runs:
        key = (recipe_key(r["recipe"]), r["seed"])
        if key in seen:
            raise GruLmError(f"{seen[key]} and {r['dir']} are one experiment (the same recipe "
                             f"and train.seed {r['seed']}), not two seeds; counted twice they "
                             "would fake a spread of zero. Give one of them (train other "
                             "seeds with train.seed=N)")
        seen[key] = r["dir"]


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
        import html

        from gru_lm.display import html_table

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
    from gru_lm.members import check_distinct

    check_distinct(run_dirs, "run folder (each run counts once)")
    runs = [_read_run(Path(d)) for d in run_dirs]
    _check_one_experiment_each(runs)
    _score_members(runs, offline)
    groups, differs = group_members(runs)
    target = _target_val_ppl(groups)
    rows = []
    for label, g in groups.items():
        rows.append(_seed_row(label, g, differs.get(label, ""), target))
        if len(g) > 1 and g[0]["val"] is not None:
            rows.append(_ensemble_row(f"{label} ensemble", g))
    if len(groups) > 1 and runs[0]["val"] is not None:
        rows.append(_ensemble_row("all runs, weighted on val", runs, weighted=True))
    comparisons = _comparisons(groups)
    first = runs[0]["summary"]
    result = Comparison(
        rows=rows, comparisons=comparisons, verdicts=[c["verdict"] for c in comparisons],
        references={k: first[k] for k in ("uniform_ppl", "unigram_ppl", "ngram_order",
                                          "ngram_ppl") if k in first},
        members=[str(r["dir"]) for r in runs], out=out, target_val_ppl=target,
        scoring="best checkpoint of each member, val and test each read as one stream; "
                "ensembles average the seeds' probabilities; the ensemble of every run "
                "weights them by EM on val")
    _write_report(result, groups, out)
    return result


def _target_val_ppl(groups: dict[str, list[dict]]) -> float | None:
    """The worst recipe's mean best val perplexity: every recipe reaches it."""
    from gru_lm.evaluation import perplexity_of

    means = [_mean(perplexity_of(r["val"]) for r in g) for g in groups.values()]
    finite = [v for v in means if v is not None]
    return max(finite) if finite else None


def _seed_row(label: str, g: list[dict], differs: str, target: float | None) -> ResultRow:
    from gru_lm.evaluation import perplexity_of

    s = [r["summary"] for r in g]
    val = [perplexity_of(r["val"]) for r in g]
    test = [perplexity_of(r["test"]) for r in g]
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
        time_to_target_s_mean=_mean(_time_to(r["evals"], target) for r in g)
        if target else None)


def _ensemble_row(label: str, g: list[dict], weighted: bool = False) -> ResultRow:
    """The runs of `g` in one ensemble: their probabilities averaged ("ensemble": the seeds
    of one recipe) or mixed with weights fitted on val ("weighted", EM on the next-character
    mixture: every run of every recipe, what diversity gives beside more seeds)."""
    from gru_lm.evaluation import perplexity_of
    from gru_lm.metrics import mixture_weights
    from gru_lm.scorers import ensemble

    weights = mixture_weights([r["val"] for r in g]) if weighted else None
    val = perplexity_of(ensemble([r["val"] for r in g], weights))
    params = [r["summary"].get("params") for r in g]
    return ResultRow(
        model=label, kind="weighted" if weighted else "ensemble",
        name=None if weighted else g[0]["summary"].get("model"), seeds=len(g),
        params=sum(params) if all(params) else None, val_ppl_mean=val,
        test_ppl_mean=perplexity_of(ensemble([r["test"] for r in g], weights))
        if g[0]["test"] is not None else None,
        val_bpc_mean=None if val is None else math.log2(val), stopped_by=[],
        member_weights=None if weights is None else
        dict(zip(distinct_names([Path(r["dir"]) for r in g]), weights, strict=True)))


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


def _write_report(result: Comparison, groups: dict[str, list[dict]], out: Path) -> None:
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
    from gru_lm.plots import plot_curves

    plot_curves(groups, out / "curves.png")
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


def write_samples(groups: dict[str, list[dict]], path: Path) -> None:
    """Continuations of each recipe's own sample prefixes (train.sample_prefixes, or ones
    from its text: sampling.run_prefixes), greedy and sampled, from its first seed's model
    (loaded once, when it was scored)."""
    lines = ["# Samples", "", "Sampled (each model's train.sample_temperature, seed 0) and "
             "greedy (the book's argmax) continuations of each model's train.sample_prefixes, "
             "from its first seed's best checkpoint; each line holds the continuation only, "
             "after the prefix it continues.", ""]
    for label, g in groups.items():
        lines += [f"## {label}", "", *_sample_lines(g[0]["member"], g[0]["corpus"]), ""]
    write_output(path, lambda f: f.write("\n".join(lines)), "w")


SAMPLE_CHARS = 80  # characters of each continuation in samples.md


def _sample_lines(m, corpus) -> list[str]:
    from gru_lm.decoding import DEFAULT_TEMPERATURE, Decoding
    from gru_lm.sampling import encode_prefix, generate, run_prefixes

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


def timestamped_out(runs_dir: Path) -> Path:
    return Path(runs_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
