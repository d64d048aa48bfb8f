"""Held-out scores of one run or an ensemble of runs: the one entry point of `gru-lm
evaluate`, `gru_lm.evaluate` and `Run.evaluate`, and the results they return.

Every figure reads the text as one stream (metrics.read_streams): each token is scored once,
with all the text before it in the split as context. The ways of scoring are the registry
of gru_lm/scorers.py (static, cache, dynamic, dynamic + cache, temperature; the n-gram
mixture as a post-pass); whatever has a setting chooses it on the val split, and the target
is then scored once with it. An ensemble averages its members' next-character
probabilities, each member scored (and adapted) on its own: equally, or (weighted) with
member weights fitted on val by EM, as the n-gram mixture's weight is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gru_lm import metrics
from gru_lm.config import MAX_NGRAM_ORDER
from gru_lm.data import char_ends, encode_file
from gru_lm.display import html_table, settings_text
from gru_lm.errors import DataError, GruLmError
from gru_lm.members import Member, check_distinct, load_member, scoring_corpus
from gru_lm.metrics import LN2, bits_per_char, mixture_weights, perplexity, reference_baselines
from gru_lm.ngram import KneserNey
from gru_lm.scorers import MIXERS, SCORERS, Scored, Texts, chosen_scorers, ensemble, options

if TYPE_CHECKING:
    from gru_lm.config import Config
    from gru_lm.data import Corpus, Vocab

SPLITS = ("val", "test", "train")


@dataclass
class Row:
    """One way of scoring: its perplexity and bits on the target, on val, what val chose."""

    name: str
    ppl: float
    bpc: float
    val_ppl: float | None
    settings: list[dict]


@dataclass
class Evaluation:
    """What `gru-lm evaluate` prints: the static score, the references, and every way of
    scoring that was asked for (rows), each with its val perplexity and what val chose."""

    what: str
    tokens: int
    unit: str  # "char" or "byte": what bits and perplexity are per
    loss: float
    ppl: float
    bpc: float
    per_char: dict | None  # bytes preset: the perplexity per character
    unknown: int
    references: dict | None
    rows: list[Row]
    checkpoints: list[str]
    tuned_on_target: bool
    note: str = ""  # what the preset changed in a --text file (what it dropped)
    weighted: bool = False  # the ensemble's member weights were fitted on val

    @property
    def best(self) -> Row | None:
        """The row val prefers (None when no row has a val figure)."""
        scored = [r for r in self.rows if r.val_ppl is not None]
        return min(scored, key=lambda r: r.val_ppl or math.inf) if len(scored) > 1 else None

    def _repr_html_(self) -> str:
        rows = [(r.name, r.ppl, r.bpc, r.val_ppl, settings_text(r.settings))
                for r in self.rows]
        return html_table(f"{self.what}: {self.tokens:,} tokens, one stream",
                          ["scored", "ppl", f"bits/{self.unit}", "val ppl", "chosen on val"],
                          rows)


def perplexity_of(logp: torch.Tensor | None) -> float | None:
    """Perplexity of per-token log-probabilities (None for none)."""
    if logp is None or not len(logp):
        return None
    return math.exp(-float(logp.double().sum()) / len(logp))


def check_methods(methods: Iterable[str]) -> set[str]:
    """The asked methods, each a registered one ("mix_ngram" and "mix-ngram" alike)."""
    known = {n.replace("-", "_"): n for n in options()}
    asked = set()
    for m in methods:
        if m.replace("-", "_") not in known:
            raise GruLmError(f"unknown way of scoring {m!r}; the methods are "
                             f"{', '.join(sorted(known))}")
        asked.add(known[m.replace("-", "_")])
    return asked


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise GruLmError(f"split {split!r} is not one of 'val', 'test', 'train'")


def check_ngram_order(order: int | None) -> None:
    if order is not None and not 1 <= order <= MAX_NGRAM_ORDER:
        raise GruLmError(f"--ngram-order {order} is out of range; give 1..{MAX_NGRAM_ORDER}")


def evaluate(checkpoints: list[Path], split: str = "test", *, text: Path | None = None,
             methods: Iterable[str] = (), ngram_order: int | None = None,
             offline: bool | None = None, weighted: bool = False) -> Evaluation:
    """Score a split or a text file with `checkpoints` (several: their ensemble), beside the
    references counted on the training split; every token once, as one stream. `methods`
    name the scorers and mixers (gru_lm/scorers.py) to add to the static score; each
    chooses its settings on the val split. `weighted`: the ensemble's member weights are
    fitted on val (EM) instead of equal."""
    if not checkpoints:
        raise GruLmError("give at least one run or checkpoint to evaluate")
    check_split(split)
    check_ngram_order(ngram_order)
    asked = check_methods(methods)
    check_distinct(checkpoints)
    if weighted and len(checkpoints) < 2:
        raise GruLmError("--weighted fits the weights of an ensemble's members; give two or "
                         "more runs (--run A --run B)")
    members = [load_member(p) for p in checkpoints]
    cfg, vocab = members[0].cfg, members[0].vocab
    corpus = _corpus(members, offline, text is not None and not asked and not weighted)
    ids, what, unknown, note = _target(cfg, vocab, corpus, split, text)
    val = None
    if corpus is not None and len(corpus.val) > 1:
        val = ids if split == "val" and text is None else corpus.val[:cfg.train.eval_max_tokens]
    if (asked or weighted) and val is None:  # (the corpus is loaded whenever one is asked)
        flag = "--" + (sorted(asked)[0] if asked else "weighted")
        raise GruLmError(f"{flag} chooses its settings on the val split, and this run has "
                         f"none (data.val_fraction = 0); evaluate without {flag}")
    order = ngram_order or cfg.train.ngram_order
    ngram = None if corpus is None else KneserNey(corpus.train, len(vocab), order)
    rows = score(members, Texts(val, ids, None if corpus is None else corpus.train), asked,
                 ngram, weighted)
    return _result(members, checkpoints, rows, ids, what, unknown, note, corpus, ngram,
                   tuned_on_target=val is ids, weighted=weighted)


def _corpus(members: list[Member], offline: bool | None, optional: bool) -> Corpus | None:
    """The members' corpus, checked; None where it cannot be read and only a --text is
    scored statically (the references are then skipped)."""
    try:
        return scoring_corpus(members, offline)
    except DataError:
        if not optional:
            raise
        return None


def _target(cfg: Config, vocab: Vocab, corpus: Corpus | None, split: str,
            text: Path | None) -> tuple[torch.Tensor, str, int, str]:
    """The tokens to score, what they are, how many were unknown, and the preset's note."""
    if text is not None:
        ids, unknown, note = encode_file(text, cfg.data, vocab)
        if len(ids) < 2:
            raise GruLmError(f"--text {text}: fewer than 2 tokens after preprocessing")
        return ids, str(text), unknown, note
    assert corpus is not None
    ids = getattr(corpus, split)
    if len(ids) < 2:
        raise GruLmError(f"the run's data has no {split} split (data.{split}_fraction = 0); "
                         "evaluate with --text FILE or another --split")
    what, cap = f"{split} split", cfg.train.eval_max_tokens
    if cap is not None and len(ids) > cap:
        ids = ids[:cap]
        what += f" (its first {cap:,} tokens: train.eval_max_tokens)"
    return ids, what, 0, ""


def score(members: list[Member], texts: Texts, methods: Iterable[str] = (),
          ngram: KneserNey | None = None, weighted: bool = False) -> list[Row]:
    """The rows of `gru-lm evaluate`: each scorer asked for (and static) of the (ensembled)
    members, then each of them through each mixer asked for."""
    asked = set(methods)
    if len(members) == 1 and not asked:
        m = members[0]  # only sums are needed: memory does not grow with the text
        ppl = perplexity(*metrics.evaluate(m.model, texts.target, *m.cfg.train.reading))
        val_ppl = None if texts.val is None else ppl if texts.same else \
            perplexity(*metrics.evaluate(m.model, texts.val, *m.cfg.train.reading))
        return [Row("static", ppl, math.log(ppl) / LN2, val_ppl, [])]
    variants = _ensembled([member_scores(m, texts, asked) for m in members], texts, weighted)
    scored = dict(variants)  # each mixer mixes the scorers' rows, not another mixer's
    for name, mixer in MIXERS.items():
        if name in asked:
            assert ngram is not None
            variants.update(mixer().mix(scored, texts, ngram))
    rows = []
    for name, sc in variants.items():
        ppl = perplexity_of(sc.target) or math.nan
        rows.append(Row(name, ppl, math.log(ppl) / LN2, perplexity_of(sc.val), sc.settings))
    return rows


def member_scores(m: Member, texts: Texts, asked: Iterable[str]) -> dict[str, Scored]:
    """One member's static score and the asked scorers' (and their combinations'), each
    chosen on texts.val."""
    chosen: dict[str, Any] = {}
    return {s.name: s.score(m, texts, chosen) for s in chosen_scorers(set(asked))}


def _ensembled(per_member: list[dict[str, Scored]], texts: Texts, weighted: bool = False
               ) -> dict[str, Scored]:
    """Each variant's members averaged in probability (one member: itself), equally or with
    weights fitted on val (one set a variant; its settings end with them)."""
    out = {}
    for name in per_member[0]:
        parts = [pm[name] for pm in per_member]
        vals = [p.val for p in parts if p.val is not None]
        settings = [s for p in parts for s in p.settings]
        weights = None
        if weighted and len(parts) > 1:
            weights = mixture_weights(vals)
            settings.append({"member_weights": " ".join(f"{w:.3f}" for w in weights)})
        out[name] = Scored(ensemble(vals, weights) if texts.val is not None else None,
                           ensemble([p.target for p in parts], weights), settings)
    return out


def _result(members: list[Member], checkpoints: list[Path], rows: list[Row],
            ids: torch.Tensor, what: str, unknown: int, note: str, corpus: Corpus | None,
            ngram: KneserNey | None, tuned_on_target: bool, weighted: bool) -> Evaluation:
    cfg, vocab = members[0].cfg, members[0].vocab
    static, n = rows[0], len(ids) - 1
    per_char = None  # (bytes: what a character-level model's perplexity is set beside)
    if cfg.data.preset == "bytes":  # the same text's perplexity per character, to set beside
        chars = len(char_ends(ids[1:].numpy()))
        per_char = {"chars": chars, "ppl": math.exp(math.log(static.ppl) * n / chars)}
    references = None if corpus is None or ngram is None else reference_baselines(
        corpus.train, ids, len(vocab), ngram.order, ngram, has_unk=vocab.has_unk)
    return Evaluation(what=what, tokens=n, unit="byte" if cfg.data.preset == "bytes" else "char",
                      loss=math.log(static.ppl), ppl=static.ppl,
                      bpc=bits_per_char(math.log(static.ppl) * n, n), per_char=per_char,
                      unknown=unknown, references=references, rows=rows,
                      checkpoints=[str(p) for p in checkpoints],
                      tuned_on_target=tuned_on_target, note=note, weighted=weighted)


__all__ = ["SCORERS", "Evaluation", "Row", "evaluate", "member_scores", "perplexity_of",
           "score"]
