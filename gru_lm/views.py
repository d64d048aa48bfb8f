"""How each command's result looks in a terminal: the tables and lines the commands print
(on stdout; notes about what was chosen for the user on stderr). The commands (cli.py,
clidata.py) parse, call the API and hand its typed result to one of these.
(gru_lm.display is imported where it is used: it brings torch, and `gru-lm --help` stays
fast.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table

from gru_lm.terminal import console, err_console, print_table, stdout


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def show_corpus(info, top: int) -> None:
    """api.CorpusInfo as a table (`gru-lm data info`)."""
    table = Table(title=f"corpus: {info.source}")
    table.add_column("what")
    table.add_column("value")
    table.add_row("source", info.origin)
    table.add_row("raw characters", f"{info.raw_chars:,}")
    table.add_row(f"tokens ({info.preset} preset)", f"{info.num_tokens:,}")
    if info.script != "as-is":
        table.add_row("script", f"{info.script} (data.script: converted by OpenCC)")
    if info.note:
        table.add_row("preprocessing", info.note)
    table.add_row("vocabulary size", f"{info.vocab_size:,}")
    if info.preset != "bytes":
        table.add_row("rare characters", _rare(info))
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


def _rare(info) -> str:
    """How data.min_freq handles rare characters, and what share of the text it costs."""
    if not info.min_freq:
        return ("data.min_freq 0: every character has a token of its own (set data.min_freq "
                "N to map characters seen fewer than N times to <unk>)")
    return (f"data.min_freq {info.min_freq}: {info.unk_types:,} character(s) seen fewer than "
            f"{info.min_freq} times map to <unk>, {info.unk_share:.2%} of the text")


def show_models(found, num_hiddens: int, vocab_size: int) -> None:
    """api.ModelInfo rows as a table (`gru-lm models`)."""
    table = Table(title=f"models ({num_hiddens} hiddens, 1 layer, vocab {vocab_size})")
    for col in ("name", "description", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for m in found:
        table.add_row(m.name, m.description, f"{m.parameters:,}")
    print_table(table)


def show_recipes(rows) -> None:
    """api.RecipeInfo rows as a table (`gru-lm config list`)."""
    table = Table(title="recipes shipped with gru-lm (--config NAME)")
    for col in ("name", "model", "data", "what it is"):
        table.add_column(col, overflow="fold", no_wrap=col in ("name", "model"))
    for r in rows:
        table.add_row(r.name, r.model, r.dataset, r.summary)
    print_table(table)


def show_runs(rows, runs_dir: Path) -> None:
    """api.RunInfo rows as a table (`gru-lm runs`)."""
    from gru_lm.display import rate

    if not rows:
        console.print(f"no runs under {runs_dir}/; train one with `gru-lm train --config "
                      "configs/gru.yaml`", highlight=False)
        return
    table = Table(title=f"runs in {runs_dir}/ (newest first)")
    # Widths in terminal cells (a Chinese character takes two): a model name is never cut (it
    # names the code), a run name too long for its column folds onto further lines, and the
    # figures stay whole.
    widths = {"model": max(cell_len(r.model or "?") for r in rows),
              "best val ppl": max(len(_f(r.best_val_ppl, ".3f")) + 1 for r in rows),
              "test ppl": max(len(_f(r.test_ppl, ".3f")) + 1 for r in rows)}
    for col in ("name", "model", "steps", "best val ppl", "test ppl", "tok/s", "status", "age"):
        table.add_column(col, justify="left" if col in ("name", "model", "status") else "right",
                         overflow="fold",
                         no_wrap=col not in ("name", "best val ppl", "test ppl"),
                         min_width=widths.get(col))

    now = time.time()
    for r in rows:
        mark = "" if r.one_stream else "*"
        table.add_row(r.name, r.model or "?", _f(r.steps, ","),
                      _f(r.best_val_ppl, ".3f") + mark, _f(r.test_ppl, ".3f") + mark,
                      rate(r.tokens_per_s), r.status,
                      "-" if r.modified is None else _age(now - r.modified))
    print_table(table)
    if not all(r.one_stream for r in rows):
        console.print("* scored by an older gru-lm as parallel streams from a zero state, about "
                      "1.5% too high; `gru-lm evaluate --run DIR --split val` (or test) scores "
                      "it as one stream", highlight=False)


def show_continuations(r) -> None:
    """api.Continuations (`gru-lm predict`): each continuation after its prefix on stdout,
    what was chosen or dropped on stderr."""
    if r.newest:
        said_newest(r.checkpoint)
    d = r.decoding
    beams = (f"beam search, width {d.beam}: the {d.beam} likeliest continuations found, best "
             "first, each after its mean log-loss (nats per character; e^loss is its "
             "perplexity)" if r.log_losses is not None else "")
    for note in (f"dropped {r.skipped:,} character(s) of the prefix that the corpus does "
                 "not have (--unknown skip)" if r.skipped else "", d.note, beams):
        if note:
            err_console.print(note, highlight=False, style="dim", soft_wrap=True)
    prompt = r.prompt
    if len(prompt) > ECHO_PREFIX:  # a chapter used as a prime is not echoed whole, per sample
        err_console.print(f"(the prefix has {len(prompt):,} characters; each sample shows its "
                          f"last {ECHO_PREFIX:,})", highlight=False, style="dim")
        prompt = "…" + prompt[-ECHO_PREFIX:]
    if d.poem is not None:
        show_poems(prompt, r.outputs)
        return
    losses = r.log_losses or [None] * len(r.outputs)
    for text, loss in zip(r.outputs, losses, strict=True):
        before = "" if loss is None else f"{loss:.4f}\t"  # (a beam's mean log-loss)
        if console.is_terminal:
            console.print(f"[dim]{before}[/dim][bold cyan]{escape(prompt)}[/bold cyan]"
                          f"{escape(text)}", highlight=False, markup=True)
        else:
            stdout.write(before + prompt + text + "\n")


def show_export(r) -> None:
    """api.Exported (`gru-lm export`): the folder and each file with its size."""
    if r.newest:
        said_newest(r.checkpoint)
    console.print(f"wrote {r.folder} ({r.format}, from {r.checkpoint}):", highlight=False,
                  soft_wrap=True)
    for f in r.files:
        console.print(f"  {f.name}  {f.stat().st_size:,} bytes", highlight=False)


def show_poems(prompt: str, poems: list[str]) -> None:
    """Poems in a form after their prefix: the poem's line (begun by the prefix's last line)
    a couplet a line, a blank line between samples."""
    for i, text in enumerate(poems):
        before, sep, line = (prompt + text).rpartition("\n")
        shown = before + sep + line.replace("。", "。\n").rstrip("\n")
        if console.is_terminal:
            console.print(("\n" if i else "") + escape(shown), highlight=False, markup=True)
        else:
            stdout.write(("\n" if i else "") + shown + "\n")


def show_gates(g, layer: int, png: Path | None, json_out: Path | None) -> None:
    """api.Gates (`gru-lm gates`): a strip a gate, the legend, and the files asked for."""
    if g.newest:
        said_newest(g.checkpoint)
    report, trained, path = g.report, g.run, g.checkpoint
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


def show_summary(summary: dict) -> None:
    parts = [f"[bold green]done[/bold green] {summary['run']}: {summary['steps']} steps",
             f"stop: {summary['stop_reason']}"]
    for key, label in (("best_val_ppl", "best val ppl"), ("best_test_ppl", "test ppl"),
                       ("final_train_ppl", "train ppl")):
        if key in summary:
            parts.append(f"{label} {summary[key]:.3f}")
    parts.append(f"{summary['tokens_per_s']:,.0f} tok/s")
    console.print(" | ".join(parts), highlight=False)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def said_newest(path: Path) -> None:
    """Say on stderr (stdout stays clean for pipes) that the newest run was taken: after a
    smoke test the newest run may not be the one meant."""
    err_console.print(f"using {path} (the newest run; choose with --run, see `gru-lm runs`)",
                      highlight=False, style="dim", soft_wrap=True)


ECHO_PREFIX = 1_000  # characters of the prefix printed before each continuation


def show_evaluation(r, members: int, target: str) -> None:
    from gru_lm.display import references_text

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
    if members > 1:
        how = "weights fitted on val" if r.weighted else "their probabilities averaged"
        console.print(f"ensemble of {members} runs ({how}): "
                      f"{', '.join(r.checkpoints)}", highlight=False, soft_wrap=True)
    if len(r.rows) > 1 or members > 1:
        _score_rows(r, target)
    if r.unknown:
        console.print(f"[yellow]note:[/yellow] {r.unknown} token(s) outside the vocabulary "
                      "were scored as <unk>", highlight=False)


def _score_rows(r, target: str) -> None:
    """One row a way of scoring (evaluation.Evaluation's rows): its ppl on the target,
    bits/char, val ppl, what val chose; then the one val prefers."""

    from gru_lm.display import settings_text

    table = Table(box=None, pad_edge=False)
    for col in ("scored", f"{target} ppl", f"bits/{r.unit}", "val ppl", "chosen on val"):
        table.add_column(col, justify="left" if col in ("scored", "chosen on val") else "right")
    for row in r.rows:
        table.add_row(row.name, f"{row.ppl:.3f}", f"{row.bpc:.3f}",
                      "-" if row.val_ppl is None else f"{row.val_ppl:.3f}",
                      settings_text(row.settings))
    print_table(table)
    if r.best is not None:
        console.print(f"best on val: {r.best.name}, {target} ppl {r.best.ppl:.3f}",
                      highlight=False)
    if r.tuned_on_target:
        console.print("note: val chose every setting and is also the split scored, so these "
                      "figures are optimistic; report --split test", highlight=False)


def show_comparison(result, wide: bool = False) -> None:
    """report.Comparison as a table that fits 80 columns: model, seeds, val and test ppl (mean ±
    the 95% CI's half width over seeds), tok/s; --wide adds the rest. Then a verdict on every
    pair."""
    from gru_lm.display import rate, references_text

    def ci(mean, iv):
        return _f(mean, ".3f") + (f" ± {(iv['high'] - iv['low']) / 2:.3f}" if iv else "")

    target = result.target_val_ppl
    columns = ["model", "seeds", "val ppl", "test ppl", "tok/s"]
    if wide:
        columns += ["params", "train ppl", "bits/char", "wall s",
                    f"s to val ppl {_f(target, '.2f')}", "stopped by"]
    table = Table(title="comparison (mean ± 95% CI over seeds)")
    for col in columns:
        # a name too long for the terminal folds onto a second line; it is never cut
        table.add_column(col, justify="left" if col in ("model", "stopped by") else "right",
                         no_wrap=col not in ("model", "stopped by"), overflow="fold")
    for r in result.rows:
        name = "  ensemble" if r.kind == "ensemble" else r.model  # of the row above
        cells = [name, str(r.seeds), ci(r.val_ppl_mean, r.val_ppl_ci95),
                 ci(r.test_ppl_mean, r.test_ppl_ci95), rate(r.tokens_per_s_mean)]
        if wide:
            cells += [_f(r.params, ","), _f(r.train_ppl_mean, ".3f"), _f(r.val_bpc_mean, ".3f"),
                      _f(r.wall_s_mean, ".1f"), _f(r.time_to_target_s_mean, ".1f"),
                      ", ".join(r.stopped_by)]
        table.add_row(*cells)
    print_table(table, width=200 if wide else None)
    refs = result.references
    if "ngram_ppl" in refs:
        console.print(f"references on the val split: {references_text(refs)}",
                      highlight=False)
    for r in result.rows:
        if r.differs:
            console.print(f"note: {r.model} is {r.differs}", highlight=False, soft_wrap=True)
        if r.member_weights:
            console.print("weights fitted on val: " + ", ".join(
                f"{k} {w:.3f}" for k, w in r.member_weights.items()), highlight=False,
                soft_wrap=True)
    for line in result.verdicts:
        console.print(f"verdict: {line}", highlight=False, soft_wrap=True)
    console.print(f"wrote {result.out}/results.csv, results.json, verdicts.csv, curves.png, "
                  "samples.md", highlight=False)
