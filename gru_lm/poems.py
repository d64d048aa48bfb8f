"""Poems in their forms, by constrained decoding: 五绝, 七绝, 五律, 七律 (4 or 8 lines of 5 or 7
characters, ，after the odd lines and 。after the even ones) and 藏头诗 (line k starts with the
k-th character of the acrostic). At every position the model's distribution is renormalised
over the tokens the form allows there: the given head, any Chinese character, or the line's
punctuation mark; nothing else changes (temperature, top-k, top-p and the seed apply as
usual). An acrostic without a form has one line a character, each of 5 or 7 characters as
the model prefers at the end of the first line's fifth."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch
from torch import Tensor

from gru_lm.data import Vocab
from gru_lm.errors import GruLmError

# name -> (characters a line, lines)
FORMS = {"五绝": (5, 4), "七绝": (7, 4), "五律": (5, 8), "七律": (7, 8)}
# the full names and the traditional (and Japanese) spellings are accepted too
SPELLINGS = {**{f"{n[0]}言{kind}": n for n in FORMS
                for kind in (("绝句", "絕句", "絶句") if n[1] == "绝" else ("律诗", "律詩"))},
             "五絕": "五绝", "七絕": "七绝", "五絶": "五绝", "七絶": "七绝"}
COMMA, STOP = "，", "。"
WIDTHS = (5, 7)  # the line lengths an acrostic without a form chooses between
MAX_HEADS = 32


def is_hanzi(token: str) -> bool:
    """A Chinese character (a CJK unified or compatibility ideograph, any extension, or 〇)."""
    return len(token) == 1 and (token == "\u3007" or unicodedata.name(token, "").startswith(
        ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")))


@dataclass(frozen=True)
class PoemForm:
    """What the poem must look like: `width` characters a line (None: 5 or 7, the model's
    choice on the first line), `lines` lines, and the `heads` that start them ("" : none)."""

    width: int | None
    lines: int
    heads: str = ""
    name: str = ""  # the form's name, for messages ("" : an acrostic alone)

    @property
    def max_chars(self) -> int:
        """The longest poem the form allows, punctuation included."""
        return self.lines * ((self.width or max(WIDTHS)) + 1)

    def mark(self, line: int) -> str:
        """The punctuation that ends line `line` (from 0): ，, and 。 every second line and
        at the end."""
        return STOP if line % 2 == 1 or line == self.lines - 1 else COMMA


def poem_form(acrostic: str | None, form: str | None) -> PoemForm | None:
    """--acrostic and --form checked before any run is looked for (None: no form)."""
    if acrostic is None and form is None:
        return None
    if form is not None:
        name = "".join(form.split())
        name = SPELLINGS.get(name, name)
        if name not in FORMS:
            raise GruLmError(f"--form {form!r} is not a form gru-lm knows; give one of "
                             f"{', '.join(FORMS)} (or 五言绝句, 七言律诗, ...)")
        width, lines = FORMS[name]
    else:
        name, width = "", None
    heads = "" if acrostic is None else "".join(acrostic.split())
    if acrostic is not None:
        if not heads:
            raise GruLmError("--acrostic is empty; give the characters that start the lines, "
                             "e.g. --acrostic 春夏秋冬")
        odd = [c for c in heads if not is_hanzi(c)]
        if odd:
            raise GruLmError(f"--acrostic {acrostic!r}: {''.join(odd[:8])!r} is not a Chinese "
                             "character; each line starts with one, e.g. --acrostic 春夏秋冬")
        if len(heads) > MAX_HEADS:
            raise GruLmError(f"--acrostic has {len(heads)} characters; give at most "
                             f"{MAX_HEADS} (one a line)")
        if form is not None and len(heads) != FORMS[name][1]:
            many = f"{len(heads)} characters" if len(heads) > 1 else "one character"
            raise GruLmError(f"--acrostic {heads} has {many} but a {form.strip()} has "
                             f"{FORMS[name][1]} lines; give {FORMS[name][1]}, or leave --form "
                             "out for one line a character")
    return PoemForm(width, len(heads) if form is None else FORMS[name][1], heads, name)


class PoemWriter:
    """A form bound to a run's vocabulary: which tokens each sample may write next, and the
    samples' progress through their lines (one state a sample: a line may have 5 or 7)."""

    def __init__(self, form: PoemForm, vocab: Vocab, num_samples: int, what: str = "--form",
                 preset: str = "raw"):
        self.form, self.vocab = form, vocab
        V = len(vocab)
        if preset == "bytes":
            raise GruLmError(f"{what} writes one Chinese character a token, but this run reads "
                             f"its text with data.preset={preset}; use a run trained with "
                             "data.preset=raw, e.g. configs/tang.yaml")
        self.hanzi = torch.tensor([is_hanzi(t) for t in vocab.idx_to_token])  # (V,)
        missing = [m for m in (COMMA, STOP) if m not in vocab.token_to_idx]
        if not self.hanzi.any() or missing:
            lack = "no Chinese characters" if not self.hanzi.any() else \
                f"no {' or '.join(missing)}"
            raise GruLmError(f"{what} writes Chinese poems, but this run's vocabulary "
                             f"({V:,} tokens) has {lack}; use a run trained on Chinese poems, "
                             "e.g. configs/tang.yaml")
        self.marks = {m: vocab.token_to_idx[m] for m in (COMMA, STOP)}
        self.heads = [vocab.token_to_idx[c] for c in form.heads]  # (checked by the caller)
        self.line = [0] * num_samples
        self.pos = [0] * num_samples  # characters written on the current line
        self.width = [form.width] * num_samples

    @property
    def done(self) -> list[bool]:
        return [k >= self.form.lines for k in self.line]

    def allowed(self) -> Tensor:
        """(num_samples, vocab_size) bool: what each sample may write now (a finished one:
        anything, it is cut off)."""
        rows = []
        for k, j, w in zip(self.line, self.pos, self.width, strict=True):
            row = torch.zeros(len(self.vocab), dtype=torch.bool)
            if k >= self.form.lines:
                row[:] = True
            elif j == 0 and self.heads:
                row[self.heads[k]] = True
            elif w is None:  # the first line of an acrostic alone: 5 or 7, the model's pick
                if j < max(WIDTHS):
                    row |= self.hanzi
                if j in WIDTHS:
                    row[self.marks[self.form.mark(k)]] = True
            elif j < w:
                row |= self.hanzi
            else:
                row[self.marks[self.form.mark(k)]] = True
            rows.append(row)
        return torch.stack(rows)

    def begin(self, text: str) -> bool:
        """Start every sample after `text`, the poem's beginning (a prefix's last line): its
        characters count toward the form; one that the form does not allow there is an
        error saying what the form wanted. True when `text` is a whole poem of the form:
        then the samples start a new one (after a line break, which the caller adds)."""
        for c in text:
            k, j, w = self.line[0], self.pos[0], self.width[0]
            if k >= self.form.lines:
                raise GruLmError(f"the prefix's last line is longer than a {self._name}; end "
                                 "it with a line break to write the poem after it")
            idx = self.vocab.token_to_idx.get(c)
            if idx is None or not bool(self.allowed()[0, idx]):
                raise GruLmError(f"the prefix does not begin a {self._name}: line {k + 1}, "
                                 f"character {j + 1} must be {self._wanted(k, j, w)}, not "
                                 f"{c!r}; fix it, or end the prefix with a line break to write "
                                 "the poem after it")
            self.advance([idx] * len(self.line))
        whole = bool(text) and all(self.done)
        if whole:
            n = len(self.line)
            self.line, self.pos, self.width = [0] * n, [0] * n, [self.form.width] * n
        return whole

    @property
    def _name(self) -> str:
        f = self.form
        return f.name or f"藏头诗 of {f.lines} lines"

    def _wanted(self, k: int, j: int, w: int | None) -> str:
        """What the form allows at line k, character j (from 0), in words."""
        mark = self.form.mark(k)
        if j == 0 and self.form.heads:
            return f"{self.form.heads[k]} (the acrostic's character {k + 1})"
        if w is None:
            return ("a Chinese character" if j < min(WIDTHS) else
                    f"a Chinese character or {mark}" if j == min(WIDTHS) else
                    "a Chinese character" if j < max(WIDTHS) else mark)
        return "a Chinese character" if j < w else f"{mark} (a line has {w} characters)"

    def advance(self, tokens: list[int]) -> None:
        """Each sample wrote tokens[i]."""
        for i, t in enumerate(tokens):
            if self.line[i] >= self.form.lines:
                continue
            if t in self.marks.values() and self.pos[i] > 0:
                if self.width[i] is None:
                    self.width[i] = self.pos[i]
                self.line[i] += 1
                self.pos[i] = 0
            else:
                self.pos[i] += 1
