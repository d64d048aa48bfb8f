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

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from gru_lm.decoding import Decoding, DecodingOptions, decoding_of
from gru_lm.errors import GruLmError
from gru_lm.members import Member, load_member, locate
from gru_lm.rundir import RunDir

if TYPE_CHECKING:
    from gru_lm.config import Config
    from gru_lm.evaluation import Evaluation
    from gru_lm.gates import GateReport
    from gru_lm.report import Comparison


# ---------------------------------------------------------------- arguments


def _checked(fn):
    """`fn` with its arguments checked against its annotations before it runs (pydantic,
    strict: "5" is not an int, 2.5 is not an int, b"x" is not a str): a wrong one is one
    GruLmError line naming the function, the argument and what it takes, as the CLI's
    errors are. The values are passed on as given. The CLI calls these functions, so both
    share one set of checks."""
    import functools
    import inspect

    sig = inspect.signature(fn)
    where = fn.__qualname__
    adapters: dict[str, Any] = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from gru_lm.config import short

        if not adapters:
            adapters.update(_adapters(fn, sig))
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise GruLmError(f"gru_lm.{where}: {e}; see help(gru_lm.{where})") from None
        for name, value in bound.arguments.items():
            if name not in adapters:
                continue
            kind = sig.parameters[name].kind
            named = (((name, v) for v in value) if kind is inspect.Parameter.VAR_POSITIONAL
                     else value.items() if kind is inspect.Parameter.VAR_KEYWORD
                     else [(name, value)])
            for key, v in named:
                adapter = adapters[name]
                wanted = sig.parameters[name].annotation
                if isinstance(adapter, dict):  # **options: Unpack[a TypedDict]
                    if key not in adapter:
                        raise GruLmError(f"gru_lm.{where}: no argument {key}=; it takes "
                                         f"{', '.join(adapter)}; see help(gru_lm.{where})")
                    adapter, wanted = adapter[key]
                try:
                    adapter.validate_python(v, strict=True)
                except ValidationError:
                    raise GruLmError(
                        f"gru_lm.{where}: {key}={short(v, 40)} is {_a(type(v).__name__)}, not "
                        f"{wanted}; see help(gru_lm.{where})"
                    ) from None
        return fn(*args, **kwargs)

    return wrapper


def _adapters(fn, sig) -> dict[str, Any]:
    """A pydantic TypeAdapter for each annotated argument of `fn` (its annotations are text:
    this module has `from __future__ import annotations`); for **options: Unpack[a
    TypedDict], {key: (adapter, its type's name)} of the TypedDict's keys."""
    import typing

    from pydantic import ConfigDict, TypeAdapter

    config = ConfigDict(arbitrary_types_allowed=True)
    out: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if p.annotation is p.empty or name in ("self", "decoding"):  # (decoding_of checks it)
            continue
        hint = eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str) \
            else p.annotation  # (annotations of this module's own signatures only)
        if typing.get_origin(hint) is Unpack:
            (typed,) = typing.get_args(hint)
            out[name] = {key: (TypeAdapter(t, config=config), _type_name(t))
                         for key, t in typing.get_type_hints(typed).items()}
        else:
            out[name] = TypeAdapter(hint, config=config)
    return out


def _type_name(t: Any) -> str:
    """`float | None`, `bool`: a type as it is written."""
    return t.__name__ if isinstance(t, type) else str(t)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


# ---------------------------------------------------------------- configs


@_checked
def resolve_config(config=None, *overrides: str, **sections: Mapping[str, Any]) -> Config:
    """A validated Config from a YAML path, a dict or a Config (None: the defaults), then
    dotted overrides ("train.lr=0.01") and section dicts (train={"lr": 0.01}), all checked
    as the CLI checks them."""
    from gru_lm.config import Config, apply_overrides, load_config, model_needs_checks, validate

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


@_checked
def config_sources(config: str | Path | None = None, *overrides: str) -> dict[str, str]:
    """Where each key of a config came from: its file (or a `base:` file it names), or
    "override"; keys at their default are absent."""
    from gru_lm.config import override_keys, resolve_yaml

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


@_checked
def runs(runs_dir: str | Path = "runs") -> list[RunInfo]:
    """Every run under `runs_dir`, newest first."""
    from gru_lm.rundir import list_runs

    return [RunInfo(**{**r, "path": Path(r["path"])}) for r in list_runs(Path(runs_dir))]


@_checked
def evaluate(runs: Sequence[str | Path] | str | Path, split: str = "test", *,
             text: str | Path | None = None, methods: Sequence[str] = (),
             ngram_order: int | None = None, offline: bool | None = None,
             weighted: bool = False, **asked: bool) -> Evaluation:
    """Score runs (or checkpoints) on a split or a text file; several are an ensemble
    (`weighted`: its member weights fitted on val by EM, else equal). Ways of scoring beyond
    the static one are named in `methods` or as keywords set to True (cache=True,
    dynamic=True, mix_ngram=True, temperature=True: gru_lm/scorers.py)."""
    from gru_lm.evaluation import evaluate as score

    paths = [locate(r).checkpoint for r in ([runs] if isinstance(runs, str | Path) else runs)]
    return score(paths, split, text=None if text is None else Path(text),
                 methods=[*methods, *(k for k, on in asked.items() if on)],
                 ngram_order=ngram_order, offline=offline, weighted=weighted)


@_checked
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


@_checked
def plot(runs: Sequence[str | Path], out: str | Path | None = None):
    """Train and val perplexity of one or more runs against steps: written to `out` (png,
    svg or pdf, by its suffix) with the notes for the user returned, or without `out` the
    matplotlib Figure (drawn in a notebook)."""
    from gru_lm.plots import plot_runs

    if not runs:
        raise GruLmError("give at least one run folder to plot (see gru_lm.runs())")
    return plot_runs([Path(r) for r in runs], None if out is None else Path(out))


# ---------------------------------------------------------------- a run


class Run:
    """A view of a run's folder: every attribute reads the folder as it is now. Its config,
    summary and history are read on each use; predict, evaluate and gates load the checkpoint
    on first use and again whenever that file has changed (training went on, or the folder
    was replaced), so the weights always agree with the summary. A folder that is gone is a
    GruLmError on every use, never an empty answer."""

    @_checked
    def __init__(self, path: str | Path, checkpoint: str | Path | None = None):
        self.dir = RunDir(path)
        self.path = self.dir.path
        self._checkpoint = Path(checkpoint) if checkpoint is not None else None
        self._loaded: Member | None = None
        self._loaded_from: tuple | None = None  # (path, inode, size, mtime) of what is loaded

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def _here(self) -> RunDir:
        if not self.path.is_dir():
            raise GruLmError(f"run {self.path} does not exist (or no longer: moved or "
                             "deleted); load a run where it is with gru_lm.load(PATH), see "
                             "gru_lm.runs()")
        return self.dir

    @property
    def checkpoint(self) -> Path:
        """The checkpoint it samples and scores: best.pt, else last.pt (or the one given)."""
        return self._checkpoint or locate(self._here().path).checkpoint

    def _model(self):
        path = self.checkpoint
        try:
            st = path.stat()
        except OSError:
            raise GruLmError(f"checkpoint {path} no longer exists; load the run again with "
                             "gru_lm.load(PATH)") from None
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if self._loaded is None or key != self._loaded_from:
            self._loaded, self._loaded_from = load_member(path), key
        m = self._loaded
        return m.cfg, m.vocab, m.model

    @property
    def config(self) -> Config:
        return self._model()[0]

    @property
    def summary(self) -> dict[str, Any] | None:
        """summary.json (None while it trains or when it was interrupted)."""
        run = self._here()
        return run.read_summary() if run.summary.is_file() else None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The metrics.jsonl records: one per evaluation, train and val perplexity..."""
        return self._here().evals()

    @_checked
    def predict(self, prefix: str | None = None, num_chars: int | None = None, *,
                unknown: str = "error", decoding: Decoding | None = None,
                **options: Unpack[DecodingOptions]) -> str:
        """The prefix and its continuation, as the book's predict_ch8: sampled at
        temperature 0.6 with seed 0 unless told otherwise (temperature=, top_k=, top_p=,
        seed=), greedy=True (argmax), or beam=K (the likeliest of K beams); 50 characters,
        or a poem in a form (`form`: 五绝, 七绝, 五律, 七律; `acrostic`: the characters that
        start its lines, 藏头诗), which needs no prefix. no_repeat=N: no N characters twice
        in a row. `decoding`: a gru_lm.Decoding holding all of these instead."""
        d = decoding_of(decoding, num_chars, 1, options)
        return self.continuations(prefix, unknown=unknown, decoding=d).texts[0]

    @_checked
    def samples(self, prefix: str | None = None, num_samples: int | None = None,
                num_chars: int | None = None, *, unknown: str = "error",
                decoding: Decoding | None = None, **options: Unpack[DecodingOptions]
                ) -> list[str]:
        """`num_samples` continuations of `prefix` (default 3; with beam=K, the K beams best
        first), each with the prefix before it; the options are Run.predict's."""
        if num_samples is None:
            num_samples = 1 if options.get("beam") is not None else 3
        d = decoding_of(decoding, num_chars, num_samples, options)
        return self.continuations(prefix, unknown=unknown, decoding=d).texts

    @_checked
    def continuations(self, prefix: str | None = None, num_samples: int = 1,
                      num_chars: int | None = None, *, unknown: str = "error",
                      decoding: Decoding | None = None, **options: Unpack[DecodingOptions]
                      ) -> Continuations:
        """The prefix as the model read it ("" for a poem started without one), the
        continuations alone, how they were drawn (a Decoding, whose note says which defaults
        were taken) and, for beams, each one's mean log-loss; the options are Run.predict's."""
        d = decoding_of(decoding, num_chars, num_samples, options)
        _check_prompt(prefix, d, unknown)
        return self._continue(prefix, d, unknown)

    def _continue(self, prefix: str | None, d: Decoding, unknown: str = "error",
                  deadline: float | None = None) -> Continuations:
        """continuations, with its arguments checked (`deadline`: a time.monotonic() past
        which it stops with sampling.TimedOut, as the server bounds a request)."""
        from gru_lm.sampling import (
            beam_search,
            encode_prefix,
            generate,
            poem_context,
            poem_writer,
        )

        cfg, vocab, model = self._model()
        poem = poem_writer(d.poem, vocab, cfg.data, d.num_samples)
        skip = unknown == "skip"
        if poem is not None:
            ids, skipped = poem_context(prefix, vocab, cfg.data, poem, skip)
        else:
            assert prefix is not None  # (_check_prompt refused a missing one)
            ids, skipped = encode_prefix(prefix, vocab, cfg.data, skip)
        losses = None
        if d.beam is not None:
            beams = beam_search(model, ids, d, deadline=deadline)
            outs, losses = [b.ids for b in beams], [b.log_loss for b in beams]
        else:
            outs = generate(model, ids, d, poem=poem, deadline=deadline)
        shown = "" if prefix is None or not prefix.strip() else vocab.decode(ids)
        return Continuations(shown, [vocab.decode(o) for o in outs], d, self.checkpoint,
                             skipped=skipped, log_losses=losses)

    @_checked
    def evaluate(self, split: str = "test", *, text: str | Path | None = None,
                 methods: Sequence[str] = (), ngram_order: int | None = None,
                 offline: bool | None = None, **asked: bool) -> Evaluation:
        """Score the run on a split (or a text file), one stream; see gru_lm.evaluate."""
        return evaluate([self.checkpoint], split, text=text, methods=methods,
                        ngram_order=ngram_order, offline=offline, **asked)

    @_checked
    def gates(self, text: str, layer: int = 0, units: int = 16, *, figure: bool = False
              ) -> GateReport:
        """The update/reset (LSTM: input/forget/output) gates at every character of `text`;
        in a notebook, the text shaded by each gate (`figure`: a text short enough to draw
        as a heatmap)."""
        from gru_lm.gates import gate_report

        _gate_args(text, units, figure)
        cfg, vocab, model = self._model()
        return gate_report(model, vocab, cfg.data, text, layer, units)

    @_checked
    def plot(self, out: str | Path | None = None):
        """Train and val perplexity against steps: written to `out` (png/svg/pdf) and its
        path returned, or without `out` a matplotlib Figure (drawn in a notebook)."""
        if out is not None:
            plot([self.path], out)
            return Path(out)
        return plot([self.path])

    def _repr_html_(self) -> str:
        s = self.summary or {}
        rows = [("run", str(self.path)), ("model", s.get("model")), ("steps", s.get("steps")),
                ("best val ppl", s.get("best_val_ppl")), ("test ppl", s.get("best_test_ppl")),
                ("tokens/s", s.get("tokens_per_s")),
                ("status", "finished" if s else "not finished")]
        from gru_lm.display import html_table

        return html_table(f"run {self.path.name}", ["", ""], rows)


def _check_prompt(prefix: str | None, d: Decoding, unknown: str) -> None:
    """The prefix and --unknown checked against the decoding (before any checkpoint is
    looked for)."""
    from gru_lm.sampling import check_prefix

    if unknown not in ("error", "skip"):
        raise GruLmError(f"--unknown {unknown!r}: give 'error' or 'skip'")
    if prefix is None and d.poem is None:
        raise GruLmError("give a prefix to continue, e.g. \"time traveller\" (only a poem in "
                         "a form, form= or acrostic=, starts without one)")
    if prefix is not None and (d.poem is None or prefix.strip()):  # (a poem needs none)
        check_prefix(prefix)


@dataclass
class Continuations:
    """What `gru-lm predict` prints: the prefix as the model read it, the continuations
    alone, how they were drawn (a Decoding), the prefix characters dropped (unknown="skip"),
    each beam's mean log-loss in nats per character (beam search only), and the checkpoint
    (`newest`: no run was named, the newest was taken)."""

    prompt: str
    outputs: list[str]
    decoding: Decoding
    checkpoint: Path
    skipped: int = 0
    log_losses: list[float] | None = None
    newest: bool = False

    @property
    def texts(self) -> list[str]:
        """Each continuation after the prefix."""
        return [self.prompt + o for o in self.outputs]


@_checked
def continue_text(prefix: str | None = None, run: str | Path | None = None,
                  num_samples: int = 1, num_chars: int | None = None, *,
                  unknown: str = "error", runs_dir: str | Path = "runs",
                  decoding: Decoding | None = None, **options: Unpack[DecodingOptions]
                  ) -> Continuations:
    """Continue `prefix` with a run or checkpoint (None: the newest run under runs_dir), or
    write a poem in a form; the options are Run.predict's, checked before any run is looked
    for."""
    d = decoding_of(decoding, num_chars, num_samples, options)
    _check_prompt(prefix, d, unknown)
    where = locate(run, runs_dir)
    r = Run(where.run.path, checkpoint=where.checkpoint).continuations(
        prefix, unknown=unknown, decoding=d)
    return dataclasses.replace(r, checkpoint=where.checkpoint, newest=where.newest)


def _gate_args(text: str, units: int, figure: bool) -> None:
    from gru_lm.gates import check_text, check_units

    check_units(units)
    check_text(text, figure)


@dataclass
class Gates:
    """What `gru-lm gates` shows: the report, the run it came from, its checkpoint, and
    whether the newest run was taken (no run named)."""

    report: GateReport
    run: Run
    checkpoint: Path
    newest: bool


@_checked
def gates(text: str, run: str | Path | None = None, layer: int = 0, units: int = 16, *,
          figure: bool = False, runs_dir: str | Path = "runs") -> Gates:
    """The gates of a run or checkpoint (None: the newest run under runs_dir) at every
    character of `text`; the arguments are checked before any run is looked for."""
    _gate_args(text, units, figure)
    where = locate(run, runs_dir)
    trained = Run(where.run.path, checkpoint=where.checkpoint)
    return Gates(trained.gates(text, layer, units, figure=figure), trained, where.checkpoint,
                 where.newest)


@dataclass
class Exported:
    """What `gru-lm export` wrote: the folder, the format and its files."""

    folder: Path
    format: str
    files: list[Path]
    checkpoint: Path
    newest: bool = False


@_checked
def export(run: str | Path | None = None, format: str = "safetensors",
           out: str | Path | None = None, *, runs_dir: str | Path = "runs") -> Exported:
    """Write a run (None: the newest under runs_dir) as `format` into the folder `out`
    (default exports/RUN-FORMAT): "safetensors" (weights, config.json, vocab.json and a model
    card; gru_lm.load() reads the folder back) or "onnx" (a one-step graph, model.onnx, with
    the same JSON files). Needs the export extra: pip install "gru-lm[export]"."""
    from gru_lm.exporting import FORMATS, model_card, write_export
    from gru_lm.recurrent import count_parameters

    if format not in FORMATS:
        raise GruLmError(f"--format {format!r}: give one of {', '.join(FORMATS)}")
    where = locate(run, runs_dir)
    name = where.run.path.resolve().name
    folder = Path(out) if out is not None else Path("exports") / f"{name}-{format}"
    m = load_member(where.checkpoint)
    summary = Run(where.run.path, checkpoint=where.checkpoint).summary
    card = model_card(name, m.cfg, m.vocab, count_parameters(m.model), summary, format,
                      where.checkpoint)
    files = write_export(format, folder, m.cfg, m.vocab, m.model, card)
    return Exported(folder, format, files, where.checkpoint, where.newest)


@_checked
def load(run_or_checkpoint: str | Path) -> Run:
    """A run folder, or a checkpoint file, as a Run."""
    p = Path(run_or_checkpoint)
    where = locate(p)
    return Run(p) if p.is_dir() else Run(where.run.path, checkpoint=p)


@_checked
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
    from gru_lm.config import SECTIONS

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


@_checked
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


@_checked
def list_models(num_hiddens: int = 256, vocab_size: int = 28) -> list[ModelInfo]:
    """The registered models and their parameter counts at this size (1 layer)."""
    from gru_lm.config import MAX_HIDDENS, ModelConfig
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


def __getattr__(name: str):
    """The result types Comparison and Evaluation, imported on first use: their modules bring
    torch and pydantic, which `gru-lm runs` and `gru-lm config show` do without."""
    if name == "Comparison":
        from gru_lm.report import Comparison

        return Comparison
    if name == "Evaluation":
        from gru_lm.evaluation import Evaluation

        return Evaluation
    raise AttributeError(f"module 'gru_lm.api' has no attribute {name!r}")


__all__ = ["Comparison", "Continuations", "CorpusInfo", "Decoding", "Evaluation", "Exported",
           "Gates", "ModelInfo", "Run", "RunInfo", "compare", "config_sources", "continue_text",
           "corpus_info", "evaluate", "export", "gates", "list_models", "load", "plot",
           "resolve_config", "runs", "train"]
