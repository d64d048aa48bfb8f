"""What a person sees while training: the header, one line per evaluation, samples, a live bar.

Programs read the same numbers from metrics.jsonl and summary.json; nothing here is stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from gru_lm.metrics import perplexity


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

    def header(self, *, model: str, params: int, splits: tuple[int, int, int],
               batches_per_epoch: int, device: str, kernels: str,
               reference: dict[str, float], reference_split: str) -> None:
        train, val, test = splits
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

    def warning(self, text: str) -> None:
        self._print(f"[yellow]warning:[/yellow] {text}")

    def samples(self, lines: list[str]) -> None:
        for line in lines:
            self._print(f"[dim]{line}[/dim]")

    @contextlib.contextmanager
    def live(self, total_steps: int | None) -> Iterator[Callable[[Any], None]]:
        """A progress bar on a terminal; yields update(progress), a no-op elsewhere."""
        if self.console is None or not self.console.is_terminal:
            yield lambda progress: None
            return
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        bar = Bar(TextColumn("[bold blue]train"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                  console=self.console, transient=True)
        with bar:
            task = bar.add_task("train", total=total_steps, info="")

            def update(progress) -> None:
                info = ""
                if progress.interval_tokens:
                    nll, n = progress.interval_nll, progress.interval_tokens
                    info = f"loss ppl {perplexity(nll, n):.2f}"
                if progress.train_time_s:
                    info += f" {progress.tokens_seen / progress.train_time_s:,.0f} tok/s"
                bar.update(task, completed=progress.step, info=info)

            yield update
