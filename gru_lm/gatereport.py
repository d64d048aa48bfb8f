"""Look inside gated cells: what `gru-lm gates` shows and writes (strips, PNG, JSON, a
notebook's HTML) from the gates a model traces through a text.

Each family shows its own gates (RecurrentLM.gate_trace: the book's cells recompute theirs
from their weights, the Mogrifier traces its masks too); this module names no family.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gru_lm.data import char_ends
from gru_lm.errors import GruLmError
from gru_lm.recurrent import GateTrace
from gru_lm.sampling import encode_prefix
from gru_lm.utils import figure, figure_format, say_glyph_note, write_output


def top_units(trace: GateTrace, n: int) -> list[int]:
    """The units whose first gate moves most over the text (largest std over time)."""
    first = next(iter(trace.gates.values()))
    n = max(1, min(n, first.shape[1]))
    return first.std(dim=0, unbiased=False).argsort(descending=True)[:n].tolist()


def heat_strip(text: str, values: Tensor, label: str):
    """A rich Text: each character on a background whose warmth is the value in [0, 1]."""
    from rich.text import Text

    strip = Text(f"{label:>3} ")
    for ch, v in zip(text, values.tolist(), strict=True):
        v = min(1.0, max(0.0, v))
        r, g, b = int(255 * v), int(80 + 60 * (1 - v)), int(255 * (1 - v))
        strip.append("·" if ch == " " else ch, style=f"bold white on rgb({r},{g},{b})")
    return strip


def save_heatmap(text: str, trace: GateTrace, units: list[int], path,
                 title: str = "") -> None:
    """One panel per gate: a row per chosen unit and, on top, the mean over all units; the
    figure format follows the suffix of `path` (png, svg or pdf)."""
    fmt = figure_format(path)
    names = list(trace.gates)
    rows = len(units) + 1
    fig = figure(figsize=(max(6, 0.28 * len(text) + 3), 1.4 + 0.3 * rows * len(names)),
                 dpi=90)
    axes = fig.subplots(len(names), 1, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        values = trace.gates[name]
        data = torch.cat([values.mean(dim=1, keepdim=True), values[:, units]], dim=1).T
        im = ax.imshow(data.numpy(), aspect="auto", cmap="coolwarm", vmin=0, vmax=1)
        ax.axhline(0.5, color="black", linewidth=1.5)
        ax.set_xticks(range(len(text)), ["␣" if c == " " else c for c in text])
        ax.set_yticks(range(rows), ["mean of all"] + [f"unit {u}" for u in units],
                      fontsize=6)
        ax.set_title(trace.titles.get(name, name), fontsize=9, loc="left")
        bar = fig.colorbar(im, ax=ax, fraction=0.02)
        bar.set_label(f"{name} (0 to 1)", fontsize=7)
    fig.suptitle(title or "gate values per character", fontsize=10)
    fig.tight_layout()
    write_output(path, lambda f: fig.savefig(f, format=fmt))
    say_glyph_note(fig)


@dataclass
class GateReport:
    """What `gru-lm gates` shows: the text as the model read it, its gates, the chosen units."""

    text: str
    layer: int
    trace: GateTrace
    units: list[int]

    def strips(self) -> list:
        """One rich heat strip per gate (mean over units) and one for ΔH."""
        out = [heat_strip(self.text, v.mean(dim=1), name) for name, v in self.trace.gates.items()]
        dh = self.trace.delta_H / self.trace.delta_H.max().clamp_min(1e-12)
        return out + [heat_strip(self.text, dh, "ΔH")]

    def legend(self) -> str:
        means = ", ".join(f"mean {k} {v.mean():.2f}" for k, v in self.trace.gates.items())
        return f"colour: blue 0 → red 1 (ΔH scaled to its max); {means}. {self.trace.how}"

    def to_json(self) -> dict:
        g = self.trace.gates
        return {"text": self.text, "layer": self.layer, "kind": self.trace.kind,
                "units": self.units, "mean": {k: v.mean(dim=1).tolist() for k, v in g.items()},
                "per_unit": {k: v[:, self.units].tolist() for k, v in g.items()},
                "delta_H": self.trace.delta_H.tolist()}

    def write_json(self, path: Path) -> None:
        write_output(path, lambda f: f.write(json.dumps(self.to_json()) + "\n"), "w")

    def write_png(self, path: Path, title: str = "") -> None:
        save_heatmap(self.text, self.trace, self.units, path, title)

    def _repr_html_(self) -> str:
        """The text once a gate, each character shaded by the gate's mean over all units
        (blue 0, red 1); hovering shows the value, as the terminal view of `gru-lm gates`."""
        import html

        rows = []
        for name, values in self.trace.gates.items():
            cells = []
            for ch, v in zip(self.text, values.mean(dim=1).tolist(), strict=True):
                v = min(1.0, max(0.0, v))
                color = f"rgb({int(255 * v)},{int(80 + 60 * (1 - v))},{int(255 * (1 - v))})"
                shown = "·" if ch == " " else "↵" if ch == "\n" else html.escape(ch)
                cells.append(f"<span title='{name} = {v:.3f}' style='background:{color};"
                             f"color:white;padding:1px'>{shown}</span>")
            rows.append(f"<div style='font-family:monospace;margin:2px 0'>"
                        f"<b>{html.escape(self.trace.titles.get(name, name))}</b><br>"
                        f"{''.join(cells)}</div>")
        return "".join(rows) + f"<p>{html.escape(self.legend())}</p>"


MAX_CHARS = 10_000  # the gates of 10,000 characters: a few MB per gate and unit
MAX_FIGURE_CHARS = 1_000  # 0.28 inch a character: wider figures exhaust matplotlib


def check_units(units: int) -> None:
    if units < 1:
        raise GruLmError(f"--units {units} is invalid; give an integer >= 1")


def check_text(text: str, drawn: bool) -> None:
    """Refuse a text whose gates (or, `drawn`, its figure) would not fit, before the model
    is loaded."""
    limit, what = (MAX_FIGURE_CHARS, "gates with --png") if drawn else (MAX_CHARS, "gates")
    if len(text) > limit:
        raise GruLmError(f"the text has {len(text):,} characters; {what} shows at most "
                         f"{limit:,}: give a shorter text" + (" or drop --png" if drawn else ""))


def gate_report(model, vocab, data, text: str, layer: int, units: int) -> GateReport:
    """Run `text` (preprocessed as the corpus was: `data`, the run's data section) through
    `model` and pick the busiest units."""
    check_units(units)
    ids, _ = encode_prefix(text, vocab, data, what="the text", skip_hint=False)
    trace = model.gate_trace(ids, layer)
    if data.preset == "bytes":  # one column a character: the gates once its last byte is read
        keep = char_ends(ids)
        trace = dataclasses.replace(trace, gates={k: v[keep] for k, v in trace.gates.items()},
                                    H=trace.H[keep], delta_H=trace.delta_H[keep])
    return GateReport(vocab.decode(ids), layer, trace, top_units(trace, units))
