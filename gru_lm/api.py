"""gru-lm from Python: train, load, sample, evaluate and compare, in a notebook or a script.

    import gru_lm
    run = gru_lm.train("configs/gru.yaml")          # a live perplexity figure in Jupyter
    run.predict("time traveller")                   # the prefix and its continuation
    run.evaluate("test", dynamic=True)              # rows of numbers, a table in Jupyter

The command line is a thin layer over these functions: each CLI command calls one of them
and only formats what it returns. Results are plain dataclasses (numbers, not formatted
strings) that render as tables in a notebook; errors are the GruLmError family with the
CLI's one-line messages; nothing here exits the interpreter, and nothing prints unless
asked (`show=True`, or a notebook's live figure while training).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gru_lm.argcheck import checked
from gru_lm.config import (
    MAX_HIDDENS,
    SECTIONS,
    Config,
    ModelConfig,
    load_config,
    model_needs_checks,
    validate,
)
from gru_lm.decoding import Decoding
from gru_lm.errors import GruLmError
from gru_lm.importing import Imported, import_archive
from gru_lm.rundir import list_runs
from gru_lm.trained import (
    Continuations,
    Exported,
    Gates,
    Run,
    continue_text,
    evaluate,
    export,
    gates,
    load,
)
from gru_lm.yamlconf import apply_overrides, override_keys, recipe_summary, recipes, resolve_yaml

if TYPE_CHECKING:
    from gru_lm.evaluation import Evaluation
    from gru_lm.report import Comparison


# ---------------------------------------------------------------- configs


@checked
def resolve_config(config=None, *overrides: str, **sections: Mapping[str, Any]) -> Config:
    """A validated Config from a YAML path, a dict or a Config (None: the defaults), then
    dotted overrides ("train.lr=0.01") and section dicts (train={"lr": 0.01}), all checked
    as the CLI checks them."""
    pairs = [*overrides, *_section_pairs(sections)]
    if config is None or isinstance(config, str | Path):
        cfg = load_config(None if config is None else Path(config), pairs)
    else:
        if isinstance(config, Config):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise GruLmError(f"config must be a YAML path, a dict or a Config, not "
                             f"{type(config).__name__}")
        cfg = validate(apply_overrides(dict(config), pairs), source="config", overrides=pairs)
    if model_needs_checks(cfg.model):
        from gru_lm.models import check_model_config

        check_model_config(cfg.model)
    return cfg


@checked
def config_sources(config: str | Path | None = None, *overrides: str) -> dict[str, str]:
    """Where each key of a config came from: its file (or a `base:` file it names), or
    "override"; keys at their default are absent."""
    sources = resolve_yaml(Path(config))[1] if isinstance(config, str | Path) else {}
    sources.update(dict.fromkeys(override_keys(list(overrides)), "override"))
    return sources


def _yaml(value: Any) -> str:
    """A Python value as the text of a key=value override (parsed back as YAML)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix(
        "\n...\n").strip()


# ---------------------------------------------------------------- results


@dataclass
class RunInfo:
    """One line of `gru-lm runs`."""

    name: str
    path: Path
    model: str | None
    steps: int
    best_val_ppl: float | None
    test_ppl: float | None
    tokens_per_s: float | None
    status: str  # finished, running, interrupted, not started
    modified: float | None  # seconds since the epoch
    one_stream: bool  # False: scored by an older gru-lm (parallel streams from zero)


@checked
def runs(runs_dir: str | Path = "runs") -> list[RunInfo]:
    """Every run under `runs_dir`, newest first."""
    return [RunInfo(**{**r, "path": Path(r["path"])}) for r in list_runs(Path(runs_dir))]


@checked
def compare(configs: Sequence[str | Path] = (), *, runs: Sequence[str | Path] = (),
            seeds: int = 1, budget_s: float | None = None, epochs: int | None = None,
            tokens: int | None = None, out: str | Path | None = None, resume: bool = False,
            runs_dir: str | Path = "runs", offline: bool | None = None,
            show: bool = False, console=None, jobs: int = 1) -> Comparison:
    """Train configs x seeds under one budget (or gather finished `runs`) and compare them:
    perplexities with 95% intervals over seeds, ensembles, a verdict on every pair. `jobs`:
    members trained at a time, each in a process of its own with its share of the cores."""
    from gru_lm.campaign import Budget, run_comparison, timestamped_out
    from gru_lm.report import report

    if configs and runs:
        raise GruLmError("give configs to train or finished runs to gather, not both")
    dest = Path(out) if out is not None else timestamped_out(Path(runs_dir))
    if runs:
        if (dest / "config.yaml").exists() or (dest / "checkpoints").is_dir():
            raise GruLmError(f"--out {dest} is a run folder; the report would mix its files "
                             "with the run's: give another folder")
        return report([Path(r) for r in runs], dest, offline)
    return run_comparison([Path(c) for c in configs], seeds=seeds,
                          budget=Budget(budget_s, epochs, tokens), out=dest, resume=resume,
                          offline=offline, jobs=jobs,
                          console=console if console is not None else _console(show))


def _console(show: bool):
    """A rich console on stdout when asked to show progress, else None (silent)."""
    if not show:
        return None
    from rich.console import Console

    return Console(soft_wrap=True)


@checked
def plot(runs: Sequence[str | Path], out: str | Path | None = None):
    """Train and val perplexity of one or more runs against steps: written to `out` (png,
    svg or pdf, by its suffix) with the notes for the user returned, or without `out` the
    matplotlib Figure (drawn in a notebook)."""
    from gru_lm.plots import plot_runs

    if not runs:
        raise GruLmError("give at least one run folder to plot (see gru_lm.runs())")
    return plot_runs([Path(r) for r in runs], None if out is None else Path(out))


@checked
def train(config=None, *overrides: str, name: str | None = None,
          resume: str | Path | None = None, init_from: str | Path | None = None,
          runs_dir: str | Path | None = None, offline: bool | None = None,
          show: bool | None = None, console=None, **sections: Mapping[str, Any]) -> Run:
    """Train a new run from a config (a YAML path, a dict or a Config) with dotted overrides
    ("train.max_steps=100") or section dicts (train={"max_steps": 100}); or continue the run
    `resume` (a config path and overrides may change what a resume may change). Returns the
    Run. In Jupyter it draws train and val perplexity as it trains (the book's Animator)
    unless show=False; elsewhere it is silent unless show=True."""
    from gru_lm.runner import train_run

    pairs = [*overrides, *_section_pairs(sections)]
    if init_from is not None:
        if resume is not None:
            raise GruLmError("--init-from starts a new run from another run's weights; a "
                             "resumed run continues its own, so drop one of the two")
        pairs.append(f"train.init_from={init_from}")
    if runs_dir is not None and resume is None:
        pairs.append(f"run.runs_dir={runs_dir}")
    if config is None or isinstance(config, str | Path):
        source = None if config is None else Path(config)
    elif resume is not None:
        raise GruLmError("a resumed run keeps its own config: give a YAML path or overrides, "
                         "not a dict or a Config")
    else:
        source = resolve_config(config)
    summary = train_run(source, pairs, name=name,
                        resume=None if resume is None else Path(resume), offline=offline,
                        reporter=_reporter(show, console))
    return Run(Path(summary["path"]))


def _section_pairs(sections: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """train={"lr": 0.01} -> ["train.lr=0.01"], refusing what is not a section of dicts."""
    pairs = []
    for section, values in sections.items():
        if section not in SECTIONS:
            raise GruLmError(f"unknown config section {section!r}; the sections are "
                             f"{', '.join(SECTIONS)}")
        if not isinstance(values, Mapping):
            raise GruLmError(f"{section}=... takes a dict of keys, e.g. {section}="
                             "{'lr': 0.01}")
        pairs += [f"{section}.{k}={_yaml(v)}" for k, v in values.items()]
    return pairs


def _reporter(show: bool | None, console):
    """What the trainer shows: the CLI's console, a notebook's live figure, or nothing."""
    from gru_lm.display import NotebookReporter, Reporter, in_notebook

    if console is not None:
        return Reporter(console)
    if show is None:
        show = in_notebook()
    if not show:
        return Reporter(None)
    return NotebookReporter() if in_notebook() else Reporter(_console(True))


# ---------------------------------------------------------------- data and models


@dataclass
class CorpusInfo:
    """What `gru-lm data info` shows."""

    source: str
    origin: str  # the dataset, data.path or data.url it came from
    preset: str
    raw_chars: int
    num_tokens: int
    note: str
    vocab_size: int
    token_freqs: list[tuple[str, int]]
    train: int
    val: int
    test: int
    store: str
    store_reused: bool
    store_note: str
    bytes_per_token: int
    min_freq: int = 0
    unk_types: int = 0  # distinct characters mapped to <unk> (rarer than min_freq)
    unk_share: float = 0.0  # the share of the text's tokens that are <unk>
    script: str = "as-is"  # data.script: the Chinese characters converted to


@checked
def corpus_info(config=None, *overrides: str, offline: bool | None = None,
                **sections: Mapping[str, Any]) -> CorpusInfo:
    """The corpus a config reads: characters, tokens, vocabulary, splits, token store."""
    from gru_lm.data import load_corpus

    cfg = resolve_config(config, *overrides, **sections)
    c = load_corpus(cfg.data, offline=offline)
    d = cfg.data
    origin = d.url if d.url else f"data.path {d.path}" if d.path else f"dataset {d.dataset}"
    unk_types, unk_tokens = c.vocab.unk_counts()
    return CorpusInfo(c.source, origin, d.preset, c.raw_chars, c.num_tokens, c.note,
                      len(c.vocab), list(c.vocab.token_freqs), len(c.train), len(c.val),
                      len(c.test), c.store, c.store_reused, c.store_note,
                      c.train.element_size(), d.min_freq, unk_types,
                      unk_tokens / max(1, c.num_tokens), d.script)


@dataclass
class ModelInfo:
    name: str
    description: str
    parameters: int


@checked
def list_models(num_hiddens: int = 256, vocab_size: int = 28) -> list[ModelInfo]:
    """The registered models and their parameter counts at this size (1 layer)."""
    from gru_lm.models import MAX_VOCAB, build_model, count_parameters, model_class
    from gru_lm.models import list_models as names

    for flag, value, hi in (("num_hiddens", num_hiddens, MAX_HIDDENS),
                            ("vocab_size", vocab_size, MAX_VOCAB)):
        if not 1 <= value <= hi:
            raise GruLmError(f"--{flag.replace('_', '-')} {value} is out of range; give "
                             f"1..{hi:,}")
    out = []
    for name in names():
        model = build_model(ModelConfig(name=name, num_hiddens=num_hiddens), vocab_size)
        out.append(ModelInfo(name, model_class(name).description, count_parameters(model)))
    return out


@dataclass
class RecipeInfo:
    name: str  # what --config takes
    path: Path
    model: str
    dataset: str  # data.dataset, or the file it reads
    summary: str  # the first sentence of the comment at the top of its file


@checked
def list_recipes() -> list[RecipeInfo]:
    """The recipes that ship in the package: `--config NAME` trains one from any folder."""
    out = []
    for name, path in recipes().items():
        cfg = load_config(path)
        d = cfg.data
        data = d.dataset or (str(d.path) if d.path else d.url or "?")
        out.append(RecipeInfo(name, path, cfg.model.name, data, recipe_summary(path)))
    return out


@checked
def import_corpus(archive: str | Path, cache_dir: str | Path = "data") -> Imported:
    """Put the chinese-poetry files found in `archive` (`npm pack chinese-poetry@2.0.1`'s
    .tgz, another tar or zip, or a folder) where a download would: every file recognised by
    its pinned SHA-256; a damaged archive imports nothing."""
    if not str(archive).strip():
        raise GruLmError("give the archive to import: the .tgz that npm pack "
                         "chinese-poetry@2.0.1 writes (or a folder holding the files)")
    return import_archive(Path(archive), Path(cache_dir))


# The result types whose modules bring torch (which `gru-lm runs` and `gru-lm config show`
# do without), imported on first use: name -> module.
LAZY = {"Comparison": "gru_lm.report", "Evaluation": "gru_lm.evaluation"}


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'gru_lm.api' has no attribute {name!r}")


# The API: gru_lm re-exports these names (gru_lm/__init__.py's _API, tested equal to this).
__all__ = ["Comparison", "Continuations", "CorpusInfo", "Decoding", "Evaluation", "Exported",
           "Gates", "Imported", "ModelInfo", "RecipeInfo", "Run", "RunInfo", "compare",
           "config_sources", "continue_text", "corpus_info", "evaluate", "export", "gates",
           "import_corpus", "list_models", "list_recipes", "load", "plot", "resolve_config",
           "runs", "train"]
