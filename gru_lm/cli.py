"""The gru-lm command line: thin commands that parse arguments and hand off.

Heavy modules (torch, pydantic, matplotlib) are imported inside the commands so that
`gru-lm --help` stays fast.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from gru_lm import __version__


def _plain_metavars(params) -> None:
    """`--seeds INT`, `--run DIR`, nothing after a flag, where Typer would print `<int>`,
    `<path>` and `<bool>`."""
    for p in params:
        if p.metavar is not None:
            continue
        desc = getattr(p, "type_descriptor", None)
        if getattr(p, "is_flag", False):
            p.metavar = ""
        elif p.param_type_name == "argument":
            p.metavar = p.name.upper()
            p.display_type_rich = lambda ctx: None  # the name says it; no second column
        elif getattr(desc, "choices", None):
            p.metavar = "|".join(str(getattr(c, "value", c)) for c in desc.choices)
        elif hasattr(p, "bare_type"):
            bare = p.bare_type().removeprefix("list[").removesuffix("]")
            p.metavar = {"int": "INT", "float": "FLOAT", "Path": "PATH"}.get(bare, "TEXT")


class PlainGroup(TyperGroup):
    """The root command: gives every command plain metavars (-h/--help and the completion
    options are made later, so they are done as they are asked for)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def walk(cmd) -> None:
            _plain_metavars(cmd.params)
            make_help = cmd.get_help_option

            def help_option(ctx):
                option = make_help(ctx)
                _plain_metavars([option] if option is not None else [])
                return option

            cmd.get_help_option = help_option
            for sub in getattr(cmd, "commands", {}).values():
                walk(sub)

        walk(self)

    def get_params(self, ctx):
        params = super().get_params(ctx)
        _plain_metavars(params)
        return params

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """A usage error (unknown option, bad value) is one `error:` line too, like every
        other error, instead of Typer's framed panel."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            err_console.print("[red]aborted[/red]")
            sys.exit(1)
        except OSError as e:  # help text written straight to a stdout that takes nothing
            stdout.failure = stdout.failure or (e.strerror or str(e))
            code = 1
        except Exception as e:  # click's ClickException, whose module Typer keeps private
            if not hasattr(e, "format_message") or not hasattr(e, "exit_code"):
                raise
            if type(e).__name__ != "NoArgsIsHelpError":  # that one printed the help already
                ctx = getattr(e, "ctx", None)
                hint = f" (see {ctx.command_path} -h)" if ctx is not None else ""
                message = e.format_message().replace("Value error, ", "").rstrip(".")
                err_console.print(f"[red]error:[/red] {escape(message + hint)}",
                                  highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        if stdout.failure and not stdout.keep_going:  # --help, --version: the output is the job
            try:
                _output_lost()
            except typer.Exit:
                pass
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


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
data_app = typer.Typer(help="Download and inspect corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")
config_app = typer.Typer(help="Show the configuration keys and their values.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


def example(*lines: str) -> str:
    """An epilog for --help: the command lines that show how a command is used."""
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  $ {line}" for line in lines)

# A stream closed before the process started (`>&-`, `<&-`) is None in sys; it becomes
# os.devnull so nothing fails on it, and is remembered: reading a closed stdin or losing the
# output of a command whose output is the point is an error, said in one line.
CLOSED = [name for name in ("stdin", "stdout", "stderr") if getattr(sys, name) is None]
for _name in CLOSED:
    setattr(sys, _name, open(os.devnull, "r" if _name == "stdin" else "w"))  # noqa: SIM115


class Stdout:
    """sys.stdout (looked up at each write, so tests can swap it) that survives its reader
    leaving: after `gru-lm train ... | head -2` output is dropped and training goes on. A
    stdout that cannot be written (closed, /dev/full) is dropped too, and `failure` says why:
    training goes on; other commands end with an error."""

    def __init__(self) -> None:
        self.gone = False
        self.failure = "it is closed" if "stdout" in CLOSED else ""
        self.keep_going = False  # train: losing the display is no reason to stop
        self.failure_said = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                sys.stdout.write(text)
            except BrokenPipeError:
                self._reader_left()
            except OSError as e:
                self._cannot_write(e)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                self._reader_left()
            except OSError as e:
                self._cannot_write(e)

    def _cannot_write(self, e: OSError) -> None:
        self.failure = self.failure or (e.strerror or str(e))
        self._reader_left()

    def _reader_left(self) -> None:
        self.gone = True
        try:  # the interpreter's own flush at exit must not fail on the closed pipe either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def isatty(self) -> bool:
        return not self.gone and sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


stdout = Stdout()
console = Console(file=stdout, soft_wrap=True)
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", metavar="FILE",
                                               help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Argument(
    help="Overrides like train.lr=0.5 model.num_hiddens=512.", show_default=False)]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never touch the network.")]
RunOpt = Annotated[Path | None, typer.Option("--run", metavar="DIR",
                                            help="Run directory (default: the newest run).")]
CkptOpt = Annotated[Path | None, typer.Option("--checkpoint", metavar="FILE",
                                              help="Checkpoint file.")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", metavar="DIR", help="Where runs live.")]


class UnknownChars(StrEnum):
    error = "error"
    skip = "skip"


class Split(StrEnum):
    val = "val"
    test = "test"
    train = "train"


def print_table(table, width: int | None = None) -> None:
    """Tables fit the terminal; piped, they keep their columns (160 wide, or $COLUMNS);
    `width` forces one (--wide: every column whole, however narrow the terminal)."""
    if width is not None:
        Console(file=stdout, width=width).print(table)
        return
    if console.is_terminal:
        console.print(table)
        return
    columns = os.environ.get("COLUMNS", "")
    Console(file=stdout, width=int(columns) if columns.isdigit() and int(columns) > 0 else 160
            ).print(table)


def handle_errors(fn):
    """Turn domain errors into one red line and a non-zero exit; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from gru_lm.errors import GruLmError, TrainingInterrupted

        try:
            result = fn(*args, **kwargs)
            _output_lost()
            return result
        except TrainingInterrupted as e:  # Ctrl-C or SIGTERM, saved: not an error
            if not e.silent:
                err_console.print(f"[yellow]interrupted:[/yellow] {escape(str(e))}",
                                  highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except GruLmError as e:
            if not e.silent:
                err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False,
                                  soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            err_console.print(f"[red]error:[/red] {escape(str(e.strerror or e) + where)}; "
                              "check the path, "
                              "free disk space or fix permissions", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper


def _output_lost() -> None:
    """After a command: say once if stdout could not be written (a reader that left with
    `| head` is not that). Training went on; any other command failed at its one job."""
    if not stdout.failure or stdout.failure_said:
        return
    stdout.failure_said = True
    if stdout.keep_going:
        err_console.print(f"[yellow]warning:[/yellow] stdout could not be written "
                          f"({stdout.failure}); training went on and the run's files hold "
                          "every figure", highlight=False, soft_wrap=True)
        return
    err_console.print(f"[red]error:[/red] the output could not be written to stdout "
                      f"({stdout.failure}); write it to a file instead (> out.txt)",
                      highlight=False, soft_wrap=True)
    raise typer.Exit(1)


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


def _offline(flag: bool) -> bool | None:
    return True if flag else None


def in_range(flag: str, value: int | None, lo: int, hi: int) -> None:
    """Refuse an integer option outside lo..hi before anything is built from it."""
    if value is not None and not lo <= value <= hi:
        from gru_lm.errors import GruLmError

        raise GruLmError(f"{flag} {value} is out of range; give {lo:,}..{hi:,}")


# ---------------------------------------------------------------- data


@data_app.command("download", epilog=example(
    "gru-lm data download", "GRU_LM_DATA_DIR=/mnt/corpora gru-lm data download --offline"))
@handle_errors
def data_download(
    dataset: Annotated[str, typer.Option(
        help="Registered dataset name: timemachine, text8 or enwik8.")] = "timemachine",
    cache_dir: Annotated[Path, typer.Option(help="Download cache folder.")] = Path("data"),
    offline: OfflineOpt = False,
) -> None:
    """Download a dataset into the cache (verified by SHA-1)."""
    from gru_lm.download import fetch, find_local, get_dataset

    spec = get_dataset(dataset)
    found = find_local(spec, cache_dir)
    if found is not None:
        console.print(f"{dataset}: {found[0]} (found in {found[1]}, SHA-1 verified; nothing "
                      "downloaded)", highlight=False)
        return
    path = fetch(spec, cache_dir, offline=_offline(offline))
    console.print(f"{dataset}: downloaded to {path} (SHA-1 verified)", highlight=False)


@data_app.command("info", epilog=example(
    "gru-lm data info", "gru-lm data info --config configs/gru.yaml data.path=my.txt "
    "data.preset=raw"))
@handle_errors
def data_info(config: ConfigOpt = None, overrides: Overrides = None,
              offline: OfflineOpt = False,
              top: Annotated[int, typer.Option(help="How many frequent tokens to show.")] = 8,
              ) -> None:
    """Show corpus statistics: characters, tokens, vocabulary, splits."""
    from rich.table import Table

    from gru_lm.api import corpus_info

    in_range("--top", top, 1, 1000)
    info = corpus_info(config, *(overrides or []), offline=_offline(offline))
    table = Table(title=f"corpus: {info.source}")
    table.add_column("what")
    table.add_column("value")
    table.add_row("source", info.origin)
    table.add_row("raw characters", f"{info.raw_chars:,}")
    table.add_row(f"tokens ({info.preset} preset)", f"{info.num_tokens:,}")
    if info.note:
        table.add_row("preprocessing", info.note)
    table.add_row("vocabulary size", str(info.vocab_size))
    shown = (lambda t: repr(t.encode("latin-1"))) if info.preset == "bytes" else repr
    freqs = ", ".join(f"{shown(t)} {f:,}" for t, f in info.token_freqs[:top])
    table.add_row(f"top {top} tokens", freqs)
    table.add_row("train / val / test tokens", f"{info.train:,} / {info.val:,} / {info.test:,}")
    table.add_row("token store", f"{info.store} ("
                  f"{'reused' if info.store_reused else 'prepared now'}, "
                  f"{info.bytes_per_token} byte(s) a token)")
    if info.store_note:
        table.add_row("note", info.store_note)
    print_table(table)


# ---------------------------------------------------------------- config


@config_app.command("show", epilog=example(
    "gru-lm config show", "gru-lm config show --config configs/gru.yaml train.lr=0.005"))
@handle_errors
def config_show(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Print the resolved config as YAML, with what each key means.

    Defaults, then the file (its `base:` first), then the overrides; a value that differs
    from the default shows the default and where it was set. The output is a valid config
    file."""
    from gru_lm.api import config_sources, resolve_config
    from gru_lm.config import described_yaml

    cfg = resolve_config(config, *(overrides or []))
    sources = config_sources(config, *(overrides or []))
    console.print(f"# resolved from {config or 'the defaults'}"
                  f"{' + ' + ' '.join(overrides) if overrides else ''}", highlight=False,
                  markup=False)
    console.print(described_yaml(cfg, sources), highlight=False, markup=False, end="")


# ---------------------------------------------------------------- models


@app.command("models", epilog=example("gru-lm models",
                                      "gru-lm models --num-hiddens 512"))
@handle_errors
def models_cmd(
    num_hiddens: Annotated[int, typer.Option(help="Hidden units for the count.")] = 256,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size for the count.")] = 28,
) -> None:
    """List the registered models with their parameter counts."""
    from rich.table import Table

    from gru_lm.api import list_models

    found = list_models(num_hiddens, vocab_size)
    table = Table(title=f"models ({num_hiddens} hiddens, 1 layer, vocab {vocab_size})")
    for col in ("name", "description", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for m in found:
        table.add_row(m.name, m.description, f"{m.parameters:,}")
    print_table(table)


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
                offline=_offline(offline), show=not quiet, console=None if quiet else console)
    if world_from_env().is_main:
        _print_summary(run.summary or {"run": run.path.name, "steps": 0,
                                       "stop_reason": "", "tokens_per_s": 0.0})


def _launch(nproc: int, config: Path | None, overrides: list[str], resume: Path | None,
            name: str | None, args: list[str]) -> int:
    """Run `gru-lm train ARGS` in `nproc` processes; its exit status. Bad input is refused
    here, once, before any process starts."""
    from gru_lm.distributed import launch
    from gru_lm.errors import GruLmError
    from gru_lm.runner import gpu_count, load_new_config, new_run, usable_cores

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


def _print_summary(summary: dict) -> None:
    parts = [f"[bold green]done[/bold green] {summary['run']}: {summary['steps']} steps",
             f"stop: {summary['stop_reason']}"]
    for key, label in (("best_val_ppl", "best val ppl"), ("best_test_ppl", "test ppl"),
                       ("final_train_ppl", "train ppl")):
        if key in summary:
            parts.append(f"{label} {summary[key]:.3f}")
    parts.append(f"{summary['tokens_per_s']:,.0f} tok/s")
    console.print(" | ".join(parts), highlight=False)


# ---------------------------------------------------------------- runs


@app.command("runs", epilog=example("gru-lm runs", "gru-lm runs --runs-dir runs/cmp"))
@handle_errors
def runs_cmd(runs_dir: RunsDirOpt = Path("runs")) -> None:
    """List the runs under --runs-dir, newest first: model, steps, perplexity, status."""
    import time

    from rich.table import Table

    from gru_lm.api import runs
    from gru_lm.display import rate

    rows = runs(runs_dir)
    if not rows:
        console.print(f"no runs under {runs_dir}/; train one with `gru-lm train --config "
                      "configs/gru.yaml`", highlight=False)
        return
    table = Table(title=f"runs in {runs_dir}/ (newest first)")
    for col in ("name", "model", "steps", "best val ppl", "test ppl", "tok/s", "status", "age"):
        table.add_column(col, justify="left" if col in ("name", "model", "status") else "right")

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    now = time.time()
    for r in rows:
        mark = "" if r.one_stream else "*"
        table.add_row(r.name, r.model or "?", f(r.steps, ","),
                      f(r.best_val_ppl, ".3f") + mark, f(r.test_ppl, ".3f") + mark,
                      rate(r.tokens_per_s), r.status,
                      "-" if r.modified is None else _age(now - r.modified))
    print_table(table)
    if not all(r.one_stream for r in rows):
        console.print("* scored by an older gru-lm as parallel streams from a zero state, about "
                      "1.5% too high; `gru-lm evaluate --run DIR --split val` (or test) scores "
                      "it as one stream", highlight=False)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def _which_checkpoint(run: Path | None, checkpoint: Path | None, runs_dir: Path) -> Path:
    """--checkpoint, --run or the newest run; the last is said on stderr (stdout stays clean
    for pipes), since after a smoke test the newest run may not be the one meant."""
    from gru_lm.runner import checkpoint_for

    path = checkpoint_for(run, checkpoint, runs_dir)
    if run is None and checkpoint is None:
        err_console.print(f"using {path} (the newest run; choose with --run, see `gru-lm "
                          "runs`)", highlight=False, style="dim", soft_wrap=True)
    return path


# ---------------------------------------------------------------- predict / evaluate


@app.command("predict", epilog=example(
    'gru-lm predict "time traveller"',
    'gru-lm predict "time traveller" --greedy',
    'gru-lm predict "the machine" -n 200 --num-samples 3 --seed 1',
    "gru-lm predict --prefix-file chapter1.txt --run runs/lstm-20261123-101500",
    "echo 'the time' | gru-lm predict --prefix-file - --temperature 0.8 --top-p 0.95"))
@handle_errors
def predict_cmd(
    prefix: Annotated[str | None, typer.Argument(
        help="Text to continue (or use --prefix-file).", show_default=False)] = None,
    prefix_file: Annotated[Path | None, typer.Option(
        "--prefix-file", metavar="FILE|-", help="Read the prefix from a file (- : stdin).")
                           ] = None,
    run: RunOpt = None,
    checkpoint: CkptOpt = None,
    num_chars: Annotated[int, typer.Option("--num-chars", "-n", help="Characters to add.")] = 50,
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
    unknown: Annotated[UnknownChars, typer.Option(
        help="Prefix characters the corpus lacks: error (list them) or skip (drop them).")
                       ] = UnknownChars.error,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Continue a prefix with a trained model: sampled at temperature 0.6 with seed 0 by
    default (the same text every time), or --greedy as the book."""
    from gru_lm.errors import GruLmError
    from gru_lm.sampling import (
        check_prefix,
        check_sampling_args,
        read_prefix_file,
        sampling_settings,
    )

    if (prefix is None) == (prefix_file is None):
        raise GruLmError("give the prefix as an argument or with --prefix-file FILE (- for "
                         "stdin), not both" if prefix is not None else
                         "give a prefix to continue, e.g. gru-lm predict \"time traveller\"")
    if prefix_file is not None:
        if str(prefix_file) == "-" and "stdin" in CLOSED:
            raise GruLmError("--prefix-file -: stdin is closed; pipe text into gru-lm or give "
                             "a file")
        prefix = read_prefix_file(prefix_file)
    check_prefix(prefix)  # bad arguments are refused before a checkpoint is looked for
    check_sampling_args(num_chars, temperature, top_k, top_p, num_samples, seed)
    sampling_settings(greedy, temperature, top_k, top_p, num_samples, seed)
    from gru_lm.api import load

    path = _which_checkpoint(run, checkpoint, runs_dir)
    prompt, outputs, how = load(path).continuations(
        prefix, num_samples, num_chars, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, greedy=greedy, unknown=unknown.value)
    if how.skipped:
        err_console.print(f"dropped {how.skipped:,} character(s) of the prefix that the "
                          "corpus does not have (--unknown skip)", highlight=False, style="dim")
    if how.note:
        err_console.print(how.note, highlight=False, style="dim", soft_wrap=True)
    if len(prompt) > ECHO_PREFIX:  # a chapter used as a prime is not echoed whole, per sample
        err_console.print(f"(the prefix has {len(prompt):,} characters; each sample shows its "
                          f"last {ECHO_PREFIX:,})", highlight=False, style="dim")
        prompt = "…" + prompt[-ECHO_PREFIX:]
    pretty = console.is_terminal
    for text in outputs:
        if pretty:
            console.print(f"[bold cyan]{escape(prompt)}[/bold cyan]{escape(text)}",
                          highlight=False,
                          markup=True)
        else:
            stdout.write(prompt + text + "\n")


@app.command("evaluate", epilog=example(
    "gru-lm evaluate", "gru-lm evaluate --run runs/lstm-20261123-101500 --dynamic --mix-ngram",
    "gru-lm evaluate --run runs/cmp/lstm-s0 --run runs/cmp/lstm-s1 --cache",
    "gru-lm evaluate --text my.txt"))
@handle_errors
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
    cache: Annotated[bool, typer.Option(
        "--cache", help="Also score with a continuous cache (window, theta and lambda chosen "
        "on val).")] = False,
    dynamic: Annotated[bool, typer.Option(
        "--dynamic", help="Also score with dynamic evaluation (settings chosen on val).")
                       ] = False,
    mix_ngram: Annotated[bool, typer.Option(
        "--mix-ngram", help="Also score each of the above interpolated with the Kneser-Ney "
        "n-gram model (weight chosen on val).")] = False,
    ngram_order: Annotated[int | None, typer.Option(
        help="Order of the Kneser-Ney model, 1..8 (default: the run's train.ngram_order).")
                           ] = None,
    offline: OfflineOpt = False,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Report perplexity and bits/char of a trained model (or an ensemble) on held-out text.

    Every token is scored once, in order, with all the text before it as context."""
    from gru_lm.api import evaluate
    from gru_lm.display import references_text

    in_range("--ngram-order", ngram_order, 1, 8)
    paths = _checkpoints(run or [], checkpoint or [], runs_dir)
    r = evaluate(paths, split.value, text=text, offline=_offline(offline), dynamic=dynamic,
                 cache=cache, mix_ngram=mix_ngram, ngram_order=ngram_order)
    if r.note:  # before the figure: most of a text may not be scored at all
        console.print(f"[yellow]note:[/yellow] {escape(r.note)}", highlight=False)
    console.print(f"{r.what}: {r.tokens:,} tokens, scored as one stream | loss {r.loss:.4f} | "
                  f"ppl {r.ppl:.3f} | {r.bpc:.3f} bits/{r.unit}", highlight=False)
    if r.per_char:
        console.print(f"per character: ppl {r.per_char['ppl']:.3f} over its "
                      f"{r.per_char['chars']:,} characters (the byte-level loss, summed over "
                      "each character's bytes)", highlight=False)
    if r.references is not None:
        console.print(f"references (counted on the training split): "
                      f"{references_text(r.references)}", highlight=False)
    if len(paths) > 1:
        console.print(f"ensemble of {len(paths)} runs (their probabilities averaged): "
                      f"{', '.join(r.checkpoints)}", highlight=False, soft_wrap=True)
    if len(r.rows) > 1 or len(paths) > 1:
        _print_score_rows(r, "text" if text is not None else split.value)
    if r.unknown:
        console.print(f"[yellow]note:[/yellow] {r.unknown} token(s) outside the vocabulary "
                      "were scored as <unk>", highlight=False)


ECHO_PREFIX = 1_000  # characters of the prefix printed before each continuation


def _checkpoints(runs: list[Path], checkpoints: list[Path], runs_dir: Path) -> list[Path]:
    """The checkpoints to score: each --run's best (or last), each --checkpoint, or the newest
    run's (said on stderr)."""
    from gru_lm.rundir import RunDir

    if not runs and not checkpoints:
        return [_which_checkpoint(None, None, runs_dir)]
    paths = [RunDir(r).best_or_last() for r in runs] + list(checkpoints)
    seen: set[str] = set()
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            from gru_lm.errors import GruLmError

            raise GruLmError(f"{p} is given twice; give each run or checkpoint once")
        seen.add(key)
    return paths


def _settings_text(settings: list[dict]) -> str:
    """What val chose, per member: 'window 500, theta 0.3, lambda 0.052; ...'."""
    def one(d: dict) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:.3g}" if isinstance(v, float) else
                         f"{k.replace('_', ' ')} {v}" for k, v in d.items())

    texts = [one(d) for d in settings]
    return texts[0] if len(set(texts)) == 1 else "; ".join(texts)


def _print_score_rows(r, target: str) -> None:
    """One row a way of scoring (api.Evaluation's rows): its ppl on the target, bits/char,
    val ppl, what val chose; then the one val prefers."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("scored", f"{target} ppl", f"bits/{r.unit}", "val ppl", "chosen on val"):
        table.add_column(col, justify="left" if col in ("scored", "chosen on val") else "right")
    for row in r.rows:
        table.add_row(row.name, f"{row.ppl:.3f}", f"{row.bpc:.3f}",
                      "-" if row.val_ppl is None else f"{row.val_ppl:.3f}",
                      _settings_text(row.settings))
    print_table(table)
    if r.best is not None:
        console.print(f"best on val: {r.best.name}, {target} ppl {r.best.ppl:.3f}",
                      highlight=False)
    if r.tuned_on_target:
        console.print("note: val chose every setting and is also the split scored, so these "
                      "figures are optimistic; report --split test", highlight=False)


def main() -> None:
    from gru_lm.utils import record_signals_early

    record_signals_early()  # a process of a distributed job: a Ctrl-C stops it at a step
    # A terminal or pipe that cannot encode a character (LANG=C, PYTHONIOENCODING=ascii)
    # gets "?" in its place rather than a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    app()


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
    from gru_lm.errors import GruLmError

    if runs and not configs:
        raise GruLmError("--runs needs run folders, e.g. gru-lm compare --runs runs/a runs/b")
    result = compare([] if runs else list(configs), runs=list(configs) if runs else [],
                     seeds=seeds, budget_s=budget_s, epochs=epochs, tokens=tokens, out=out,
                     resume=resume, runs_dir=runs_dir, offline=_offline(offline),
                     console=None if quiet else console)
    _print_comparison(result, wide)


def _print_comparison(result, wide: bool = False) -> None:
    """api.Comparison as a table that fits 80 columns: model, seeds, val and test ppl (mean ±
    the 95% CI's half width over seeds), tok/s; --wide adds the rest. Then a verdict on every
    pair."""
    from rich.table import Table

    from gru_lm.display import rate

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    def ci(r, key):
        text = f(r.get(f"{key}_mean"), ".3f")
        iv = r.get(f"{key}_ci95")
        return text + (f" ± {(iv['high'] - iv['low']) / 2:.3f}" if iv else "")

    target = result.target_val_ppl
    columns = ["model", "seeds", "val ppl", "test ppl", "tok/s"]
    if wide:
        columns += ["params", "train ppl", "bits/char", "wall s",
                    f"s to val ppl {f(target, '.2f')}", "stopped by"]
    table = Table(title="comparison (mean ± 95% CI over seeds)")
    for col in columns:
        # a name too long for the terminal folds onto a second line; it is never cut
        table.add_column(col, justify="left" if col in ("model", "stopped by") else "right",
                         no_wrap=col not in ("model", "stopped by"), overflow="fold")
    for r in result.rows:
        name = "  ensemble" if r.get("kind") == "ensemble" else r["model"]  # of the row above
        cells = [name, str(r["seeds"]), ci(r, "val_ppl"), ci(r, "test_ppl"),
                 rate(r.get("tokens_per_s_mean"))]
        if wide:
            cells += [f(r["params"], ","), f(r.get("train_ppl_mean"), ".3f"),
                      f(r["val_bpc_mean"], ".3f"), f(r.get("wall_s_mean"), ".1f"),
                      f(r.get("time_to_target_s_mean"), ".1f"), ", ".join(r["stopped_by"])]
        table.add_row(*cells)
    print_table(table, width=200 if wide else None)
    refs = result.references
    if "ngram_ppl" in refs:
        from gru_lm.display import references_text

        console.print(f"references on the val split: {references_text(refs)}",
                      highlight=False)
    for r in result.rows:
        if r.get("differs"):
            console.print(f"note: {r['model']} is {r['differs']}", highlight=False,
                          soft_wrap=True)
    for line in result.verdicts:
        console.print(f"verdict: {line}", highlight=False, soft_wrap=True)
    console.print(f"wrote {result.out}/results.csv, results.json, verdicts.csv, curves.png, "
                  "samples.md", highlight=False)


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
    from gru_lm.api import load
    from gru_lm.gates import check_text, check_units

    check_units(units)
    check_text(text, png is not None)
    if png is not None:
        from gru_lm.utils import figure_format

        figure_format(png)
    path = _which_checkpoint(run, checkpoint, runs_dir)
    trained = load(path)
    report = trained.gates(text, layer, units)
    name = trained.config.model.name
    console.print(f"{name} layer {layer}, {report.trace.H.shape[1]} units, from {path}",
                  highlight=False)
    for strip in report.strips():
        console.print(strip)
    console.print(report.legend(), highlight=False, markup=False)
    if png is not None:
        report.write_png(png, title=f"{name} gates, layer {layer}, run {trained.path.name}")
        console.print(f"wrote {png}", highlight=False)
    if json_out is not None:
        report.write_json(json_out)
        console.print(f"wrote {json_out}", highlight=False)
