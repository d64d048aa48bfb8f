"""The terminal under the gru-lm command line: plain option names in --help, usage errors
and domain errors as one red line with a non-zero exit (never a traceback), a stdout that
survives its reader leaving (`| head`) or being closed, and tables that fit the terminal.

Nothing here knows a command; gru_lm/cli.py and gru_lm/clidata.py hold the commands.
"""

from __future__ import annotations

import functools
import inspect
import io
import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any, TextIO, cast

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from gru_lm.errors import GruLmError, TrainingInterrupted


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
        elif choices := getattr(desc, "choices", None):
            p.metavar = "|".join(str(getattr(c, "value", c)) for c in choices)
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

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **kwargs: Any) -> Any:
        """A usage error (unknown option, bad value) is one `error:` line too, like every
        other error, instead of Typer's framed panel."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args,
                                **kwargs)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args,
                                **kwargs)
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


# Console takes any object with write/flush/isatty/fileno/encoding; Stdout is one.
stdout = Stdout()
_stdout_file = cast(TextIO, stdout)
console = Console(file=_stdout_file, soft_wrap=True)
err_console = Console(stderr=True)

def print_table(table, width: int | None = None) -> None:
    """Tables fit the terminal; piped, they keep their columns (160 wide, or $COLUMNS);
    `width` forces one (--wide: every column whole, however narrow the terminal). A table too
    wide for its frame loses the frame (columns two spaces apart); one too wide even so folds
    into a block of `column: value` lines a row: no column is dropped and no figure cut."""
    if width is not None:
        Console(file=_stdout_file, width=width).print(table)
        return
    out = console
    if not console.is_terminal:
        columns = os.environ.get("COLUMNS", "")
        out = Console(file=_stdout_file,
                      width=int(columns) if columns.isdigit() and int(columns) > 0 else 160)
    content = needed_width(table)
    n = len(table.columns)
    if content + 3 * n + 1 <= out.width:
        out.print(table)
    elif content + 2 * (n - 1) <= out.width:
        table.box, table.show_edge, table.pad_edge = None, False, False
        out.print(table)
    else:
        print_folded(table, out)


FOLD_MIN = 6  # cells a column of names may fold to (3 Chinese characters) before the frame goes


def needed_width(table) -> int:
    """Terminal cells the columns of a rich Table need, borders and padding aside: a no-wrap
    column its widest cell and header, a column that may wrap its widest cell up to FOLD_MIN
    (or its min_width: a column of figures sets it to keep them whole) and its longest
    header word."""
    from rich.cells import cell_len

    total = 0
    for col in table.columns:
        widest = max((cell_len(str(c)) for c in col.cells), default=0)
        header = str(col.header)
        if col.no_wrap:
            total += max(cell_len(header), widest)
        else:
            words = max((cell_len(w) for w in header.split()), default=0)
            total += max(words, col.min_width or 0, min(widest, FOLD_MIN))
    return total


def print_folded(table, out: Console) -> None:
    """A table too wide for `out`, as one block a row: `column: value`, names aligned."""
    if table.title:
        out.print(escape(str(table.title)), highlight=False)
    headers = [str(c.header) for c in table.columns]
    pad = max(map(len, headers))
    rows = zip(*(list(c.cells) for c in table.columns), strict=True)
    for i, row in enumerate(rows):
        if i:
            out.print("")
        for header, cell in zip(headers, row, strict=True):
            out.print(escape(f"{header.rjust(pad)}: {cell}"), highlight=False)


def handle_errors(fn):
    """Turn domain errors into one red line and a non-zero exit; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
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


def main_streams() -> None:
    """A terminal or pipe that cannot encode a character (LANG=C, PYTHONIOENCODING=ascii)
    gets "?" in its place rather than a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def with_flags(flags: dict[str, str], before: str | None = None):
    """A command decorator adding a boolean option --NAME for each of `flags` (name -> help)
    to the command's signature (before the parameter `before`, else at the end); the command
    receives them as keyword arguments (**kwargs). What a registry holds becomes options
    without a line of the command changing."""
    def add(fn):
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        extra = [inspect.Parameter(
            name.replace("-", "_"), inspect.Parameter.KEYWORD_ONLY, default=False,
            annotation=Annotated[bool, typer.Option(f"--{name}", help=text)])
            for name, text in flags.items()]
        at = next((i for i, p in enumerate(params) if p.name == before), len(params))
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        fn.__signature__ = sig.replace(parameters=params[:at] + extra + params[at:])
        fn.__annotations__ = {**{p.name: p.annotation for p in params + extra},
                              "return": sig.return_annotation}
        return fn

    return add


def flags_given(kwargs: dict[str, Any], flags: dict[str, str]) -> list[str]:
    """The names of `flags` that were set (for with_flags' keyword arguments)."""
    return [name for name in flags if kwargs.get(name.replace("-", "_"))]
