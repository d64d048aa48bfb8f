"""The gru-lm command line: thin commands that parse arguments and hand off.

Heavy modules (torch, pydantic, matplotlib) are imported inside the commands so that
`gru-lm --help` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from gru_lm import __version__
from gru_lm.cliargs import (
    CkptOpt,
    ConfigOpt,
    ExportFormat,
    OfflineOpt,
    Overrides,
    RunOpt,
    RunsDirOpt,
    Split,
    UnknownChars,
    in_range,
    offline_flag,
    one_of,
    read_prefix,
    scorer_flags,
)
from gru_lm.clidata import config_app, data_app
from gru_lm.errors import GruLmError
from gru_lm.terminal import (
    PlainGroup,
    console,
    err_console,
    example,
    flags_given,
    handle_errors,
    main_streams,
    stdout,
    with_flags,
)
from gru_lm.views import (
    said_newest,
    show_comparison,
    show_continuations,
    show_evaluation,
    show_export,
    show_gates,
    show_models,
    show_runs,
    show_summary,
)

app = typer.Typer(
    name="gru-lm",
    cls=PlainGroup,
    help="Train, sample and honestly compare character-level recurrent language models.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        console.print(f"gru-lm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Train, sample and honestly compare character-level recurrent language models."""


# ---------------------------------------------------------------- models


@app.command("models", epilog=example("gru-lm models",
                                      "gru-lm models --num-hiddens 512"))
@handle_errors
def models_cmd(
    num_hiddens: Annotated[int, typer.Option(help="Hidden units for the count.")] = 256,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size for the count.")] = 28,
) -> None:
    """List the registered models with their parameter counts."""

    from gru_lm.api import list_models

    found = list_models(num_hiddens, vocab_size)
    show_models(found, num_hiddens, vocab_size)


# ---------------------------------------------------------------- train


@app.command("train", epilog=example(
    "gru-lm train --config configs/gru.yaml",
    "gru-lm train --config configs/tiny.yaml train.max_steps=100 model.name=lstm",
    "gru-lm train --resume runs/gru-20261123-101500",
    "gru-lm train --config my.yaml --init-from runs/bytes-20261123-101500"))
@handle_errors
def train_cmd(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    name: Annotated[str | None, typer.Option(help="Run folder name.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run directory.")] = None,
    offline: OfflineOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="Print only the final summary.")] = False,
    nproc: Annotated[int | None, typer.Option(
        help="Train in N processes on this machine (DDP: gloo on CPU, nccl on GPU); each "
        "takes train.batch_size sequences and its share of the cores.")] = None,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", metavar="RUN|FILE", help="Start from this run's (or checkpoint's) "
        "weights with a fresh optimizer and schedule (fine-tuning).")] = None,
) -> None:
    """Train a model from a YAML config (or continue one with --resume).

    Also runs unchanged under torchrun: torchrun --nproc_per_node N -m gru_lm train ..."""
    from gru_lm.distributed import world_from_env

    in_range("--nproc", nproc, 1, 1024)
    if nproc is not None and nproc > 1:
        extra = [f"train.init_from={init_from}"] if init_from is not None else []
        args = [*(["--config", str(config)] if config else []),
                *(["--name", name] if name else []),
                *(["--resume", str(resume)] if resume else []),
                *(["--offline"] if offline else []), *(["--quiet"] if quiet else []),
                *(overrides or []), *extra]
        raise typer.Exit(_launch(nproc, config, [*(overrides or []), *extra], resume, name,
                                 args))
    from gru_lm.api import train

    stdout.keep_going = True
    run = train(config, *(overrides or []), name=name, resume=resume, init_from=init_from,
                offline=offline_flag(offline), show=not quiet, console=None if quiet else console)
    if world_from_env().is_main:
        show_summary(run.summary or {"run": run.path.name, "steps": 0,
                                       "stop_reason": "", "tokens_per_s": 0.0})


def _launch(nproc: int, config: Path | None, overrides: list[str], resume: Path | None,
            name: str | None, args: list[str]) -> int:
    """Run `gru-lm train ARGS` in `nproc` processes; its exit status. Bad input is refused
    here, once, before any process starts."""
    from gru_lm.building import gpu_count, load_new_config, new_run, usable_cores
    from gru_lm.distributed import launch

    if os.environ.get("WORLD_SIZE"):
        raise GruLmError("--nproc inside a torchrun job; drop --nproc (torchrun already "
                         "started the processes)")
    slots = max(usable_cores(), gpu_count())
    if nproc > slots:
        raise GruLmError(f"--nproc {nproc}: this machine has {usable_cores()} usable core(s) "
                         f"and {gpu_count()} GPU(s), so at most {slots} processes; each process "
                         "needs a core or a GPU of its own")
    if resume is None:
        new_run(load_new_config(config, overrides), config, name)  # name taken, or bad
    return launch(nproc, ["train", *args])


# ---------------------------------------------------------------- runs


@app.command("runs", epilog=example("gru-lm runs", "gru-lm runs --runs-dir runs/cmp"))
@handle_errors
def runs_cmd(runs_dir: RunsDirOpt = Path("runs")) -> None:
    """List the runs under --runs-dir, newest first: model, steps, perplexity, status."""

    from gru_lm.api import runs

    rows = runs(runs_dir)
    show_runs(rows, runs_dir)


# ---------------------------------------------------------------- predict / evaluate


BIG_PREDICT = 1_000_000  # characters to draw beyond which predict says what it costs


@app.command("predict", epilog=example(
    'gru-lm predict "time traveller"',
    'gru-lm predict "time traveller" --greedy',
    'gru-lm predict "the machine" -n 200 --num-samples 3 --seed 1',
    "gru-lm predict --prefix-file chapter1.txt --run runs/lstm-20261123-101500",
    "echo 'the time' | gru-lm predict --prefix-file - --temperature 0.8 --top-p 0.95",
    'gru-lm predict "the time machine" --beam 5 --no-repeat 4',
    "gru-lm predict --acrostic 春夏秋冬 --form 五绝 --run runs/tang"))
@handle_errors
def predict_cmd(
    prefix: Annotated[str | None, typer.Argument(
        help="Text to continue (or use --prefix-file).", show_default=False)] = None,
    prefix_file: Annotated[Path | None, typer.Option(
        "--prefix-file", metavar="FILE|-", help="Read the prefix from a file (- : stdin).")
                           ] = None,
    run: RunOpt = None,
    checkpoint: CkptOpt = None,
    num_chars: Annotated[int | None, typer.Option(
        "--num-chars", "-n", help="Characters to add (default 50; a form sets its own).",
        show_default=False)] = None,
    temperature: Annotated[float | None, typer.Option(
        help="Sampling temperature (default 0.6: the shipped models read well there).")
                           ] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    num_samples: Annotated[int, typer.Option(help="Continuations to draw.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling (default 0).")] = None,
    greedy: Annotated[bool, typer.Option(
        "--greedy", help="Take the likeliest character every time (the book's predict_ch8).")
                      ] = False,
    beam: Annotated[int | None, typer.Option(
        "--beam", metavar="K", help="Beam search: the K likeliest continuations, best first, "
        "each with its mean log-loss (nats per character).", show_default=False)] = None,
    no_repeat: Annotated[int | None, typer.Option(
        "--no-repeat", metavar="N", help="No N characters in a row twice in a continuation "
        "(beam search loops without it).", show_default=False)] = None,
    unknown: Annotated[UnknownChars, typer.Option(
        help="Prefix characters the corpus lacks: error (list them) or skip (drop them).")
                       ] = UnknownChars.error,
    acrostic: Annotated[str | None, typer.Option(
        help="A 藏头诗: line k starts with the k-th of these characters (one line each, of 5 "
        "or 7, unless --form says).", show_default=False)] = None,
    form: Annotated[str | None, typer.Option(
        help="A poem in a form: 五绝, 七绝, 五律 or 七律 (5 or 7 characters a line, 4 or 8 "
        "lines, ，and 。 in their places).", show_default=False)] = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Continue a prefix with a trained model, or write a poem in a form.

    Sampled at temperature 0.6 with seed 0 by default (the same text every time);
    --greedy decodes as the book; --beam K finds the likeliest continuations;
    --form and --acrostic write a poem, with or without a prefix."""
    from gru_lm.api import continue_text
    from gru_lm.decoding import DEFAULT_CHARS

    poem = acrostic is not None or form is not None
    drawn = num_samples * (num_chars if num_chars is not None else DEFAULT_CHARS)
    if drawn >= BIG_PREDICT and not poem:
        err_console.print(
            f"note: {num_samples:,} samples × {drawn // num_samples:,} characters is {drawn:,} "
            "characters to draw: this can take minutes on a CPU, and the samples show when "
            "the last is done (Ctrl-C stops it)",
            highlight=False, soft_wrap=True)
    r = continue_text(read_prefix(prefix, prefix_file, optional=poem), one_of(run, checkpoint),
                      num_samples, num_chars, unknown=unknown.value, runs_dir=runs_dir,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      greedy=greedy, beam=beam, no_repeat=no_repeat, acrostic=acrostic,
                      form=form)
    show_continuations(r)


@app.command("evaluate", epilog=example(
    "gru-lm evaluate", "gru-lm evaluate --run runs/lstm-20261123-101500 --dynamic --mix-ngram",
    "gru-lm evaluate --run runs/cmp/lstm-s0 --run runs/cmp/lstm-s1 --cache",
    "gru-lm evaluate --text my.txt"))
@handle_errors
@with_flags(scorer_flags(), before="ngram_order")
def evaluate_cmd(
    run: Annotated[list[Path] | None, typer.Option(
        "--run", metavar="DIR", help="Run directory (default: the newest run); repeat it to "
        "score the ensemble of several runs.")] = None,
    checkpoint: Annotated[list[Path] | None, typer.Option(
        "--checkpoint", metavar="FILE", help="Checkpoint file; repeatable, like --run.")
                          ] = None,
    split: Annotated[Split, typer.Option(help="Which split of the run's corpus to score.")
                     ] = Split.test,
    text: Annotated[Path | None, typer.Option(help="Score this text file instead.")] = None,
    ngram_order: Annotated[int | None, typer.Option(
        help="Order of the Kneser-Ney model, 1..8 (default: the run's train.ngram_order).")
                           ] = None,
    weighted: Annotated[bool, typer.Option(
        "--weighted", help="Weight an ensemble's members by EM on the val split (default: "
        "equal weights).")] = False,
    offline: OfflineOpt = False,
    runs_dir: RunsDirOpt = Path("runs"),
    **methods: Any,
) -> None:
    """Report perplexity and bits/char of a trained model (or an ensemble) on held-out text.

    Every token is scored once, in order, with all the text before it as context."""
    from gru_lm.api import evaluate
    from gru_lm.members import locate

    paths: list[str | Path] = [*(run or []), *(checkpoint or [])]
    if not paths:
        where = locate(None, runs_dir)
        said_newest(where.checkpoint)
        paths = [where.checkpoint]
    r = evaluate(paths, split.value, text=text, offline=offline_flag(offline),
                 methods=flags_given(methods, scorer_flags()), ngram_order=ngram_order,
                 weighted=weighted)
    show_evaluation(r, len(paths), "text" if text is not None else split.value)


# ---------------------------------------------------------------- compare / plot


@app.command("compare", epilog=example(
    "gru-lm compare configs/gru.yaml configs/lstm.yaml --seeds 3",
    "gru-lm compare configs/gru.yaml configs/gru-scratch.yaml --budget-s 60 -q",
    "gru-lm compare --runs runs/cmp/gru-s0 runs/cmp/lstm-s0 --wide"))
@handle_errors
def compare_cmd(
    configs: Annotated[list[Path] | None, typer.Argument(
        help="Configs to compare (same data section), or run folders with --runs.",
        show_default=False)] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per config.")] = 1,
    budget_s: Annotated[float | None, typer.Option(
        "--budget-s", help="Same wall-clock budget for every run.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Same epochs for every run.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Same training tokens for every run.")
                      ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    runs: Annotated[bool, typer.Option(
        "--runs", help="The arguments are finished run folders: compare without training.")
                    ] = False,
    resume: Annotated[bool, typer.Option(help="Skip finished member runs, resume the rest.")
                      ] = False,
    jobs: Annotated[int, typer.Option(
        help="Train N members at a time, each in a process of its own with 1/N of the "
        "cores (its output in OUT/NAME.log).")] = 1,
    wide: Annotated[bool, typer.Option(
        "--wide", help="All columns (params, train ppl, bits/char, time, time to target, stop "
        "reason); results.csv and results.json always have them.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="Print only the table, not the training.")
                     ] = False,
    offline: OfflineOpt = False,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Train configs x seeds under one budget and report perplexity, speed, curves, samples."""
    from gru_lm.api import compare

    given = list(configs or [])
    if runs and not given:
        raise GruLmError("--runs needs run folders, e.g. gru-lm compare --runs runs/a runs/b")
    result = compare([] if runs else given, runs=given if runs else [],
                     seeds=seeds, budget_s=budget_s, epochs=epochs, tokens=tokens, out=out,
                     resume=resume, runs_dir=runs_dir, offline=offline_flag(offline),
                     console=None if quiet else console, jobs=jobs)
    show_comparison(result, wide)


@app.command("plot", epilog=example(
    "gru-lm plot runs/gru-20261123-101500",
    "gru-lm plot runs/cmp/gru-s0 runs/cmp/lstm-s0 --out gru-vs-lstm.svg"))
@handle_errors
def plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (one or more).",
                                               show_default=False)],
    out: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Figure file, .png, .svg or .pdf (default: RUN/curves.png for "
        "one run, curves.png for several).")] = None,
) -> None:
    """Plot train and validation perplexity of one or more runs.

    The best evaluation is starred; the unigram and n-gram baselines are grey lines."""
    from gru_lm.api import plot

    path = out or (runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png"))
    for note in plot(runs, path):
        err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print(f"wrote {path}", highlight=False)


# ---------------------------------------------------------------- gates


@app.command("gates", epilog=example(
    'gru-lm gates "the time traveller smiled"',
    'gru-lm gates "the time traveller" --units 32 --png gates.svg --json gates.json'))
@handle_errors
def gates_cmd(
    text: Annotated[str, typer.Argument(help="Text to run through the model.")],
    run: RunOpt = None,
    checkpoint: CkptOpt = None,
    layer: Annotated[int, typer.Option(help="Which layer's gates.")] = 0,
    units: Annotated[int, typer.Option(help="How many of the most active units to plot.")
                     ] = 16,
    png: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Write a heatmap here (.png, .svg or .pdf).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the values as JSON.")
                        ] = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Show a trained GRU's update/reset gates (LSTM: input/forget/output) per character."""
    from gru_lm.api import gates

    if png is not None:
        from gru_lm.utils import figure_format

        figure_format(png)
    g = gates(text, one_of(run, checkpoint), layer, units, figure=png is not None,
              runs_dir=runs_dir)
    show_gates(g, layer, png, json_out)


# ---------------------------------------------------------------- a model that leaves gru-lm


@app.command("export", epilog=example(
    "gru-lm export runs/lstm-20261123-101500",
    "gru-lm export runs/lstm-20261123-101500 --format onnx --out lstm-onnx",
    "gru-lm predict \"time traveller\" --run exports/lstm-20261123-101500-safetensors"))
@handle_errors
def export_cmd(
    run: Annotated[str | None, typer.Argument(
        help="Run folder or checkpoint (default: the newest run).",
        show_default=False)] = None,
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="safetensors: weights + config + vocabulary + model card, no pickle "
        "(gru-lm loads it again); onnx: a one-step graph for onnxruntime.")
                   ] = ExportFormat.safetensors,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="DIR", help="Folder to write (default exports/RUN-FORMAT): new, "
        "empty, or an earlier export, whose files are replaced (others there are kept).",
        show_default=False)] = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Write a trained model for use outside gru-lm: safetensors or ONNX.

    Needs the export extra: pip install "gru-lm\\[export]"."""
    from gru_lm.api import export

    show_export(export(run, fmt.value, out, runs_dir=runs_dir))


@app.command("serve", epilog=example(
    "gru-lm serve runs/lstm-20261123-101500",
    "gru-lm serve exports/lstm-20261123-101500-safetensors --port 8080 --max-concurrent 8"))
@handle_errors
def serve_cmd(
    run: Annotated[str | None, typer.Argument(
        help="Run folder, checkpoint or safetensors export (default: the "
        "newest run).", show_default=False)] = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8000,
    max_concurrent: Annotated[int, typer.Option(
        help="Generations at a time; past it a request gets HTTP 429.")] = 4,
    max_chars: Annotated[int, typer.Option(
        help="Most characters a request may ask for (1..10000).")] = 2_000,
    max_prefix: Annotated[int, typer.Option(
        help="Longest prefix (or text for the gates), in characters.")] = 10_000,
    max_samples: Annotated[int, typer.Option(
        help="Most samples (or beams) a request may ask for.")] = 8,
    timeout: Annotated[float, typer.Option(
        help="Seconds a generation may take; past it HTTP 504.")] = 30.0,
    max_body: Annotated[int | None, typer.Option(
        help="Largest request body in bytes; past it HTTP 413 (default: 256 KiB, more if "
        "--max-prefix needs it).", show_default=False)] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for the model, 1 or more (default: torch's).",
        show_default=False)] = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Serve a trained model: a JSON API and a web page that continues a prefix.

    The page writes the continuation as it is drawn and shows the model's gates.
    The API's OpenAPI docs are at /docs.
    Needs the serve extra: pip install "gru-lm\\[serve]"."""
    from gru_lm.server import LOOPBACK, Limits, serve

    limits = Limits(max_prefix, max_chars, max_samples, max_concurrent, timeout, max_body)

    def ready(url: str) -> None:  # (said once it listens: a bad --host is one error line)
        if host not in LOOPBACK:
            err_console.print(f"note: listening on {host}: other machines can reach this "
                              "server (it has no authentication)", highlight=False,
                              soft_wrap=True)
        err_console.print(f"serving on {url} (the page; the API's docs at {url}/docs); "
                          "Ctrl-C stops it", highlight=False, soft_wrap=True)

    serve(run, host, port, limits, runs_dir=runs_dir, threads=threads, ready=ready)


def main() -> None:
    from gru_lm.utils import record_signals_early

    record_signals_early()  # a process of a distributed job: a Ctrl-C stops it at a step
    main_streams()
    app()
