"""What a person sees while training: the header, one line per evaluation, samples, a live bar.

Programs read the same numbers from metrics.jsonl and summary.json; nothing here is stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.markup import escape

from gru_lm.errors import ConfigError
from gru_lm.metrics import perplexity
from gru_lm.schedule import fraction_done
from gru_lm.utils import figure


class TensorBoard:
    """The numbers of each metrics.jsonl record as TensorBoard scalars (train.tensorboard),
    in RUN/tensorboard; a resume first drops the events after its checkpoint's step."""

    def __init__(self, log_dir, purge_step: int | None = None):
        self.writer = tensorboard_writer()(str(log_dir), purge_step=purge_step)

    def scalars(self, rec: dict[str, Any]) -> None:
        for key, value in rec.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, rec["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_writer():
    """torch's SummaryWriter, or a ConfigError saying how to get it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install "
                          "'gru-lm[tensorboard]' (or set train.tensorboard=false)") from None
    return SummaryWriter


def rate(x: float | None) -> str:
    """A tokens/s figure in at most 5 characters (9,999, 12.3k, 123k, 1.23M ... 999G), so a
    table's columns keep their width from a slow CPU to a GPU."""
    if x is None:
        return "-"
    if x < 9_999.5:
        return f"{x:,.0f}"
    for size, unit in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        scaled = x / size
        if scaled < 999.5:
            return f"{scaled:.3g}{unit}"
    return f"{x:.0e}"


def references_text(ref: dict) -> str:
    """The baselines a model should beat, in one phrase."""
    return (f"uniform ppl {ref['uniform_ppl']:.1f}, unigram ppl {ref['unigram_ppl']:.2f}, "
            f"{ref['ngram_order']}-gram Kneser-Ney ppl {ref['ngram_ppl']:.3f}")


class Reporter:
    """Prints to a rich console, or nothing when the console is None (--quiet)."""

    def __init__(self, console=None):
        self.console = console

    def _print(self, text: str, **kw) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True, **kw)

    def header(self, *, corpus, model: str, params: int, batches_per_epoch: int,
               device: str, kernels: str, reference: dict[str, float],
               reference_split: str) -> None:
        train, val, test = len(corpus.train), len(corpus.val), len(corpus.test)
        self._print(f"corpus {corpus.source}: {corpus.raw_chars:,} characters, "
                    f"{corpus.num_tokens:,} tokens, vocabulary {len(corpus.vocab):,}",
                    markup=False)
        if corpus.note:
            self._print(f"[dim]{escape(corpus.note)}[/dim]")
        self._print(
            f"[bold]{model}[/bold] {params:,} params | train {train:,} / val {val:,} / "
            f"test {test:,} tokens | {batches_per_epoch} batches/epoch | device {device} | "
            f"{kernels}\n"
            f"reference on the {reference_split} split: {references_text(reference)}")

    def eval_line(self, rec: dict[str, Any]) -> None:
        parts = [f"step {rec['step']:>6}", f"epoch {rec['epoch']:>3}",
                 f"train ppl {rec['train_ppl']:7.3f}"]
        if "val_ppl" in rec:
            parts.append(f"val ppl {rec['val_ppl']:7.3f}")
        parts += [f"{rec['tokens_per_s']:,.0f} tok/s", f"lr {rec['lr']:.2e}",
                  f"{rec['elapsed_s']:.0f}s"]
        self._print(" | ".join(parts))

    def note(self, text: str) -> None:
        """A plain line of information (the run directory, a resume)."""
        self._print(text, markup=False)

    def warning(self, text: str) -> None:
        self._print(f"[yellow]warning:[/yellow] {escape(text)}")

    def samples(self, lines: list[str]) -> None:
        for line in lines:
            self._print(f"[dim]{escape(line)}[/dim]")

    @contextlib.contextmanager
    def live(self, train_cfg, total_steps: int | None) -> Iterator[Callable[[Any], None]]:
        """A progress bar on a terminal; yields update(progress), a no-op elsewhere. The bar
        follows whichever limit (steps, epochs, seconds) is closest, with an ETA."""
        if self.console is None or not self.console.is_terminal:
            yield lambda progress: None
            return
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        bar = Bar(TextColumn("[bold blue]train"), BarColumn(), TextColumn("{task.fields[where]}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                  TimeRemainingColumn(), console=self.console, transient=True,
                  # everything prints through self.console already; a redirect would send the
                  # console's own writes (cli.Stdout writes to sys.stdout) round in a loop
                  redirect_stdout=False, redirect_stderr=False)
        with bar:
            task = bar.add_task("train", total=1.0, where="", info="")

            def update(progress) -> None:
                info = ""
                if progress.interval_tokens:
                    nll, n = progress.interval_nll, progress.interval_tokens
                    info = f"train ppl {perplexity(nll, n):.2f}"
                if progress.train_time_s:
                    info += f" {progress.tokens_seen / progress.train_time_s:,.0f} tok/s"
                bar.update(task, completed=fraction_done(train_cfg, progress.step,
                                                         progress.elapsed_s, total_steps),
                           where=progress_where(train_cfg, progress.step, progress.elapsed_s,
                                                total_steps), info=info)

            yield update


def progress_where(train_cfg, step: int, elapsed_s: float, total_steps: int | None) -> str:
    """`step 1,250/2,500`, and the seconds when a time budget may stop the run first."""
    where = f"step {step:,}/{total_steps:,}" if total_steps else f"step {step:,}"
    if train_cfg.time_budget_s:
        where += f" {elapsed_s:,.0f}/{train_cfg.time_budget_s:,.0f} s"
    return where


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where a live figure can be drawn)."""
    import sys

    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython() if hasattr(shell, "get_ipython") else None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


class NotebookReporter(Reporter):
    """The trainer's display in Jupyter: the book's Animator, one figure of train and val
    perplexity against steps redrawn in place at every evaluation, and one progress line,
    instead of a terminal progress bar. Text (header, notes, samples) is printed."""

    def __init__(self) -> None:
        super().__init__(None)
        from IPython.display import display

        self._display = display
        self.steps: list[int] = []
        self.train: list[float] = []
        self.val: list[tuple[int, float]] = []
        self._figure = None  # display handles, made at the first evaluation
        self._line = None

    def _print(self, text: str, **kw) -> None:
        from rich.text import Text

        print(Text.from_markup(text).plain if kw.get("markup", True) else text)

    def eval_line(self, rec: dict[str, Any]) -> None:
        self.steps.append(rec["step"])
        self.train.append(rec["train_ppl"])
        best = min((rec[k] for k in ("val_ppl", "ema_val_ppl") if k in rec), default=None)
        if best is not None:
            self.val.append((rec["step"], best))
        image = self._draw()
        if self._figure is None:
            self._figure = self._display(image, display_id=True)
        else:
            self._figure.update(image)

    def _draw(self):
        """The figure as a PNG image (matplotlib's Figure, no pyplot state)."""
        import io

        from IPython.display import Image

        fig = figure(figsize=(5.5, 3.2), dpi=90)
        ax = fig.subplots()
        ax.plot(self.steps, self.train, linestyle="--", label="train ppl")
        if self.val:
            ax.plot(*zip(*self.val, strict=True), label="val ppl")
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return Image(data=buf.getvalue(), format="png")

    @contextlib.contextmanager
    def live(self, train_cfg, total_steps: int | None) -> Iterator[Callable[[Any], None]]:
        def update(progress) -> None:
            parts = [progress_where(train_cfg, progress.step, progress.elapsed_s, total_steps)]
            if progress.interval_tokens:
                ppl = perplexity(progress.interval_nll, progress.interval_tokens)
                parts.append(f"train ppl {ppl:.2f}")
            if progress.train_time_s:
                parts.append(f"{progress.tokens_per_s:,.0f} tok/s")
            frac = fraction_done(train_cfg, progress.step, progress.elapsed_s, total_steps)
            if 0 < frac < 1:
                parts.append(f"eta {progress.elapsed_s * (1 - frac) / frac:,.0f} s")
            line = " | ".join(parts)
            if self._line is None:
                self._line = self._display(line, display_id=True)
            else:
                self._line.update(line)

        yield update


# ---------------------------------------------------------------- tables for notebooks


def html_table(title: str, columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    """An HTML table for a notebook: numbers right-aligned, everything escaped."""
    import html

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:{'right' if _numeric(v) else 'left'}'>"
                         f"{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in rows)
    return (f"<table><caption>{html.escape(title)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def settings_text(settings: list[dict]) -> str:
    """What val chose, per member: 'window 500, theta 0.3, lambda 0.052; ...' (once when
    every member chose the same)."""
    def one(d: dict) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:.3g}" if isinstance(v, float) else
                         f"{k.replace('_', ' ')} {v}" for k, v in d.items())

    texts = [one(d) for d in settings]
    return texts[0] if len(set(texts)) == 1 else "; ".join(texts)
