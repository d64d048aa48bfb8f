"""What the gru-lm commands share: their common options, the choices they take, and the
checks and readers of their arguments."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from gru_lm.errors import GruLmError
from gru_lm.scorers import options
from gru_lm.terminal import CLOSED

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", metavar="FILE|NAME",
    help="YAML config file, or a shipped recipe's name (gru-lm config list).")]
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


class ExportFormat(StrEnum):
    safetensors = "safetensors"
    onnx = "onnx"


class Split(StrEnum):
    val = "val"
    test = "test"
    train = "train"



def offline_flag(flag: bool) -> bool | None:
    return True if flag else None


def in_range(flag: str, value: int | None, lo: int, hi: int) -> None:
    """Refuse an integer option outside lo..hi before anything is built from it."""
    if value is not None and not lo <= value <= hi:
        raise GruLmError(f"{flag} {value} is out of range; give {lo:,}..{hi:,}")



def read_prefix(prefix: str | None, prefix_file: Path | None, optional: bool = False
            ) -> str | None:
    """The prefix argument, or the text of --prefix-file (- : stdin); None when neither is
    given and the prefix is `optional` (a poem in a form)."""
    from gru_lm.sampling import read_prefix_file

    if optional and prefix is None and prefix_file is None:
        return None
    if (prefix is None) == (prefix_file is None):
        raise GruLmError("give the prefix as an argument or with --prefix-file FILE (- for "
                         "stdin), not both" if prefix is not None else
                         "give a prefix to continue, e.g. gru-lm predict \"time traveller\"")
    if prefix_file is None:
        assert prefix is not None
        return prefix
    if str(prefix_file) == "-" and "stdin" in CLOSED:
        raise GruLmError("--prefix-file -: stdin is closed; pipe text into gru-lm or give a "
                         "file")
    return read_prefix_file(prefix_file)


def one_of(run: Path | None, checkpoint: Path | None) -> Path | None:
    if run is not None and checkpoint is not None:
        raise GruLmError("give --run or --checkpoint, not both")
    return run if run is not None else checkpoint


def scorer_flags() -> dict[str, str]:
    """evaluate's --METHOD options: the scorers and mixers of gru_lm/scorers.py."""
    return options()
