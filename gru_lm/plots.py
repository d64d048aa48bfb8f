"""Figures of training curves: one or more runs against steps (`gru-lm plot`), and a
comparison's recipes with their seeds' band (compare's curves.png)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from gru_lm.errors import GruLmError
from gru_lm.members import check_distinct
from gru_lm.rundir import RunDir
from gru_lm.utils import figure, figure_format, glyph_note, say_glyph_note, write_output


def plot_curves(groups: dict[str, list[list[dict]]], path: Path) -> None:
    """Val perplexity against tokens seen and seconds: a line per recipe (its seeds' mean)
    with their min-max band; `groups`: each recipe's seeds' evaluation records."""
    fig = figure(figsize=(10, 4), dpi=80)
    axes = fig.subplots(1, 2)
    for label, g in groups.items():
        for ax, key in zip(axes, ("tokens_seen", "elapsed_s"), strict=True):
            xs, mean, lo, hi = _band(g, key)
            if xs:
                (line,) = ax.plot(xs, mean, label=label)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    for ax, xlabel in zip(axes, ("tokens seen", "seconds"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend()
    fig.suptitle("validation perplexity (mean over seeds, min-max band)")
    fig.tight_layout()
    write_output(path, lambda f: fig.savefig(f, format="png"))
    say_glyph_note(fig)


def _band(evals_per_seed: list[list[dict]], x_key: str):
    """Common x grid (the eval points of the shortest seed): mean, min and max of val ppl."""
    series = [[(e[x_key], e["val_ppl"]) for e in ev if "val_ppl" in e and x_key in e]
              for ev in evals_per_seed]
    series = [s for s in series if s]
    if not series:
        return [], [], [], []
    n = min(len(s) for s in series)
    xs = [statistics.fmean(s[i][0] for s in series) for i in range(n)]
    ys = [[s[i][1] for s in series] for i in range(n)]
    return xs, [statistics.fmean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot_runs(run_dirs: list[Path], path: Path | None):
    """Train (dashed) and validation (solid) perplexity of one or more runs against steps, the
    best evaluation starred, and the baselines of the first finished run as grey lines. The
    format follows the suffix of `path`; returns notes for the user (runs drawn as points,
    unfinished runs). Without `path`: the matplotlib Figure (for a notebook)."""
    fmt = figure_format(path) if path is not None else None
    check_distinct(run_dirs, "run folder")
    series = [(Path(d), _read_metrics_only(Path(d))) for d in run_dirs]
    fig = figure(figsize=(7, 4.5), dpi=80)
    ax = fig.subplots()
    notes = [note for i, (run_dir, evals) in enumerate(series)
             for note in _draw_run(ax, i, run_dir, evals)]
    summaries = [RunDir(d).read_summary() if RunDir(d).summary.is_file() else {}
                 for d in run_dirs]  # an interrupted run has none, wherever it is listed
    for d, summary, (_, evals) in zip(run_dirs, summaries, series, strict=True):
        if not summary:
            notes.append(f"{d} is not finished (no summary.json): drawn up to step "
                         f"{evals[-1]['step']}")
    _draw_references(ax, next((x for x in summaries if "ngram_ppl" in x), {}))
    _finish_axes(ax, series[0][0].name if len(series) == 1 else f"{len(series)} runs")
    fig.tight_layout()
    if path is None:
        return fig
    write_output(path, lambda f: fig.savefig(f, format=fmt))
    note = glyph_note(fig)
    return [*notes, *([note] if note else [])]


def _draw_run(ax, i: int, run_dir: Path, evals: list[dict]) -> list[str]:
    """One run's train and val curves, its best evaluation starred; a note when it has one
    evaluation only (drawn as points)."""
    marker = "o" if len(evals) < 3 else None
    steps = [e["step"] for e in evals]
    (line,) = ax.plot(steps, [e["train_ppl"] for e in evals], linestyle="--",
                      marker=marker, label=f"{run_dir.name} train")
    val = [(e["step"], e["val_ppl"]) for e in evals if "val_ppl" in e]
    if val:
        ax.plot(*zip(*val, strict=True), color=line.get_color(), marker=marker,
                label=f"{run_dir.name} val")
        # the best evaluation as the trainer kept it: raw or EMA weights, whichever won
        scored = [(e["step"], min(e["val_ppl"], e.get("ema_val_ppl", math.inf)),
                   " (EMA)" if e.get("ema_val_ppl", math.inf) < e["val_ppl"] else "")
                  for e in evals if "val_ppl" in e]
        step, ppl, which = min(scored, key=lambda x: x[1])
        ax.plot(step, ppl, marker="*", markersize=14, color=line.get_color(),
                markeredgecolor="black", linestyle="none")
        ax.annotate(f"best {ppl:.3f}{which}", (step, ppl), textcoords="offset points",
                    xytext=(-80, 10 + 10 * i), fontsize=7, color=line.get_color())
    if len(evals) == 1:
        return [f"{run_dir} has one evaluation (step {evals[0]['step']}): drawn as points, "
                "not a curve"]
    return []


def _draw_references(ax, refs: dict) -> None:
    """The uniform, unigram and n-gram perplexities as grey lines."""
    for key, label in (("uniform_ppl", "uniform"), ("unigram_ppl", "unigram"),
                       ("ngram_ppl", f"{refs.get('ngram_order')}-gram Kneser-Ney")):
        if key in refs:
            ax.axhline(refs[key], color="grey", linewidth=0.8, linestyle=":")
            ax.annotate(f"{label} {refs[key]:.2f}", (0, refs[key]), xycoords=("axes fraction",
                        "data"), textcoords="offset points", xytext=(2, 2), fontsize=7,
                        color="grey")


def _finish_axes(ax, title: str) -> None:
    from matplotlib.ticker import ScalarFormatter

    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(ScalarFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _read_metrics_only(run_dir: Path) -> list[dict]:
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise GruLmError(f"{run_dir} has no metrics.jsonl; pass a run directory")
    evals = run.evals()
    if not evals:
        raise GruLmError(f"{run.metrics} has no evaluations yet; train longer")
    usable = [e for e in evals if "train_ppl" in e]
    if not usable:
        raise GruLmError(f"{run.metrics}: no evaluation has a numeric train_ppl (the file was "
                         "edited or damaged); nothing to plot")
    for e in usable:  # a perplexity is at least 1; past 1e9 no figure can draw it
        for key in ("train_ppl", "val_ppl", "ema_val_ppl"):
            if key in e and not 1 <= e[key] <= MAX_PPL:
                raise GruLmError(f"{run.metrics}: step {e['step']} has {key} {e[key]:g}, not a "
                                 f"perplexity (1 to {MAX_PPL:g}); the file was edited or "
                                 "damaged")
    return usable


MAX_PPL = 1e9
