"""Trained runs from Python: a run folder as a Run (predict, samples, evaluate, gates,
plot), continuations and gates of the newest run or a named one, evaluation of runs and
ensembles, and export. gru_lm.api re-exports all of it.

The modules that bring torch are imported on first use: `import gru_lm.api`, which `gru-lm
runs` and `gru-lm config show` do, stays free of them (tests/test_cli.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from gru_lm.argcheck import checked
from gru_lm.decoding import Decoding, DecodingOptions, decoding_of
from gru_lm.errors import GruLmError
from gru_lm.members import Member, load_member, locate
from gru_lm.rundir import RunDir

if TYPE_CHECKING:
    from gru_lm.config import Config
    from gru_lm.evaluation import Evaluation
    from gru_lm.gatereport import GateReport


@checked
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



class Run:
    """A view of a run's folder: every attribute reads the folder as it is now. Its config,
    summary and history are read on each use; predict, evaluate and gates load the checkpoint
    on first use and again whenever that file has changed (training went on, or the folder
    was replaced), so the weights always agree with the summary. A folder that is gone is a
    GruLmError on every use, never an empty answer."""

    @checked
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

    @checked
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

    @checked
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

    @checked
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

    @checked
    def evaluate(self, split: str = "test", *, text: str | Path | None = None,
                 methods: Sequence[str] = (), ngram_order: int | None = None,
                 offline: bool | None = None, **asked: bool) -> Evaluation:
        """Score the run on a split (or a text file), one stream; see gru_lm.evaluate."""
        return evaluate([self.checkpoint], split, text=text, methods=methods,
                        ngram_order=ngram_order, offline=offline, **asked)

    @checked
    def gates(self, text: str, layer: int = 0, units: int = 16, *, figure: bool = False
              ) -> GateReport:
        """The update/reset (LSTM: input/forget/output) gates at every character of `text`;
        in a notebook, the text shaded by each gate (`figure`: a text short enough to draw
        as a heatmap)."""
        from gru_lm.gatereport import gate_report

        _gate_args(text, units, figure)
        cfg, vocab, model = self._model()
        return gate_report(model, vocab, cfg.data, text, layer, units)

    @checked
    def plot(self, out: str | Path | None = None):
        """Train and val perplexity against steps: written to `out` (png/svg/pdf) and its
        path returned, or without `out` a matplotlib Figure (drawn in a notebook)."""
        from gru_lm.plots import plot_runs

        if out is not None:
            plot_runs([self.path], Path(out))
            return Path(out)
        return plot_runs([self.path], None)

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


@checked
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
    from gru_lm.gatereport import check_text, check_units

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


@checked
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


@checked
def export(run: str | Path | None = None, format: str = "safetensors",
           out: str | Path | None = None, *, runs_dir: str | Path = "runs") -> Exported:
    """Write a run (None: the newest under runs_dir) as `format` into the folder `out`
    (default exports/RUN-FORMAT): "safetensors" (weights, config.json, vocab.json and a model
    card; gru_lm.load() reads the folder back) or "onnx" (a one-step graph, model.onnx, with
    the same JSON files); export.json lists them with their SHA-256. `out` is new, empty or
    an earlier export, of which only the files it wrote are replaced. Needs the export
    extra: pip install "gru-lm[export]"."""
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


@checked
def load(run_or_checkpoint: str | Path) -> Run:
    """A run folder, or a checkpoint file, as a Run."""
    p = Path(run_or_checkpoint)
    where = locate(p)
    return Run(p) if p.is_dir() else Run(where.run.path, checkpoint=p)
