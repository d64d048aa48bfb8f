"""Held-out scores of one run or an ensemble of runs: static, with a continuous cache, with
dynamic evaluation, and each of those mixed with the Kneser-Ney n-gram model.

Every figure reads the text as one stream (metrics.read_streams): each token is scored once,
with all the text before it in the split as context. Whatever has a setting (the cache's
window, theta and lambda; dynamic evaluation's lr and decay; the n-gram weight) chooses it
on the val split; the target is then scored once with it. An ensemble averages its members'
next-character probabilities, each member scored (and adapted) on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gru_lm.errors import DataError, GruLmError


@dataclass
class Member:
    """One trained run as loaded from its checkpoint."""

    path: Path
    cfg: Any  # Config
    vocab: Any  # Vocab
    model: torch.nn.Module
    fingerprint: str | None  # of the corpus it was trained on (None: an old checkpoint)


def load_member(path: Path) -> Member:
    from gru_lm.checkpoint import load_checkpoint, restore_model

    ck = load_checkpoint(path)
    cfg, vocab, model = restore_model(ck, path)
    model.eval()
    fp = ck.get("data_fingerprint")
    return Member(Path(path), cfg, vocab, model, fp if isinstance(fp, str) else None)


def check_members(members: list[Member]) -> None:
    """An ensemble or a comparison needs one vocabulary and one corpus: refuse the first
    member that differs."""
    first = members[0]
    need = ("an ensemble or a comparison needs runs trained on the same data (one corpus, "
            "preprocessing and split)")
    for m in members[1:]:
        if m.vocab.idx_to_token != first.vocab.idx_to_token:
            how = (f"{len(m.vocab)} tokens against {len(first.vocab)}"
                   if len(m.vocab) != len(first.vocab) else
                   f"the same {len(m.vocab)} tokens, in another order" if
                   set(m.vocab.idx_to_token) == set(first.vocab.idx_to_token) else
                   f"other tokens, {len(m.vocab)} of them")
            raise GruLmError(f"{m.path}: it was trained on other data than {first.path} (its "
                             f"vocabulary has {how}); {need}")
        if (m.cfg.data.model_dump(mode="json") != first.cfg.data.model_dump(mode="json")
                or (m.fingerprint and first.fingerprint and m.fingerprint != first.fingerprint)):
            raise GruLmError(f"{m.path}: it was trained on other data than {first.path} "
                             f"(another corpus, preprocessing or split); {need}")


def check_fingerprint(members: list[Member], corpus) -> None:
    """Refuse to score a corpus that is not the text the runs were trained on."""
    recorded = [m for m in members if m.fingerprint]
    if not recorded:
        return
    now = corpus.fingerprint()
    for m in recorded:
        if m.fingerprint != now:
            raise DataError(
                f"{m.path}: the corpus ({corpus.source}) is not the text this run was trained "
                "on: the file, its token store or the split changed; restore the original "
                "file, or score another text with --text FILE")


@dataclass
class Scored:
    """Per-token log-probabilities (float32, text order) of val and of the target, and the
    settings val chose (one entry a member; empty when there is nothing to choose)."""

    val: torch.Tensor | None
    target: torch.Tensor
    settings: list[dict] = field(default_factory=list)


@dataclass
class Row:
    name: str
    ppl: float
    bpc: float
    val_ppl: float | None
    settings: list[dict]


def perplexity_of(logp: torch.Tensor | None) -> float | None:
    """Perplexity of per-token log-probabilities (None for none)."""
    if logp is None or not len(logp):
        return None
    return math.exp(-float(logp.double().sum()) / len(logp))


def ensemble(parts: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the members' probabilities, token by token."""
    if len(parts) == 1:
        return parts[0]
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(len(parts))


def member_variants(m: Member, val: torch.Tensor | None, target: torch.Tensor,
                    train: torch.Tensor | None, *, cache: bool, dynamic: bool
                    ) -> dict[str, Scored]:
    """One member's scores: static, and with the cache and dynamic evaluation as asked."""
    from gru_lm.cache import cache_scores, choose, with_cache
    from gru_lm.metrics import token_log_probs

    t = m.cfg.train
    same = val is not None and target is val  # --split val: no second pass

    def static(ids):
        return token_log_probs(m.model, ids, *t.reading)

    val_static = static(val) if val is not None else None
    out = {"static": Scored(val_static, val_static if same else static(target))}
    chosen = None
    if cache:
        from gru_lm.cache import THETAS, WINDOWS

        logp_v, grid_v = cache_scores(m.model, val, *t.reading)
        chosen = choose(logp_v, grid_v, WINDOWS, THETAS)
        a, b = WINDOWS.index(chosen.window), THETAS.index(chosen.theta)
        if same:
            logp_t, grid_t = logp_v, grid_v[a, b]
        else:
            logp_t, grid = cache_scores(m.model, target, *t.reading, (chosen.window,),
                                        (chosen.theta,))
            grid_t = grid[0, 0]
        out["cache"] = Scored(with_cache(logp_v, grid_v[a, b], chosen.lam),
                              with_cache(logp_t, grid_t, chosen.lam),
                              [{"window": chosen.window, "theta": chosen.theta,
                                "lambda": chosen.lam}])
    if dynamic:
        from gru_lm.dynamic import dynamic_log_probs, gradient_ms, tune
        from gru_lm.metrics import mixture_weight

        ms = gradient_ms(m.model, train, t.num_steps)
        best, val_dyn, trials = tune(m.model, val, ms)
        d = {"lr": best.lr, "decay": best.decay, "segment": best.segment}
        target_dyn = val_dyn if same else dynamic_log_probs(m.model, target, ms, best)[0]
        out["dynamic"] = Scored(val_dyn, target_dyn, [d])
        if chosen is not None:  # both: the adapting model's features fill the cache
            val_d, val_c = dynamic_log_probs(m.model, val, ms, best, cache=chosen)
            known = ~torch.isnan(val_c)
            lam = mixture_weight(val_d[known], val_c[known]) if known.any() else 0.0
            tgt_d, tgt_c = (val_d, val_c) if same else dynamic_log_probs(
                m.model, target, ms, best, cache=chosen)
            out["dynamic + cache"] = Scored(
                with_cache(val_d, val_c, lam), with_cache(tgt_d, tgt_c, lam),
                [{**d, "window": chosen.window, "theta": chosen.theta, "lambda": lam}])
    return out


def score(members: list[Member], val: torch.Tensor | None, target: torch.Tensor,
          train: torch.Tensor | None, *, cache: bool = False, dynamic: bool = False,
          ngram=None) -> list[Row]:
    """The rows of `gru-lm evaluate`: each variant of the (ensembled) members, then each of
    them mixed with `ngram` (a KneserNey model) when given, its weight chosen on val."""
    from gru_lm.metrics import LN2, evaluate, mixture_log_probs, mixture_weight, perplexity

    if len(members) == 1 and not (cache or dynamic or ngram is not None):
        m = members[0]  # only sums are needed: memory does not grow with the text
        ppl = perplexity(*evaluate(m.model, target, *m.cfg.train.reading))
        val_ppl = None if val is None else ppl if val is target else \
            perplexity(*evaluate(m.model, val, *m.cfg.train.reading))
        return [Row("static", ppl, math.log(ppl) / LN2, val_ppl, [])]
    per_member = [member_variants(m, val, target, train, cache=cache, dynamic=dynamic)
                  for m in members]
    variants: dict[str, Scored] = {}
    for name in per_member[0]:
        parts = [pm[name] for pm in per_member]
        variants[name] = Scored(
            ensemble([p.val for p in parts]) if val is not None else None,
            ensemble([p.target for p in parts]), [s for p in parts for s in p.settings])
    if ngram is not None:
        counted_val = torch.from_numpy(ngram.log_probs(val)).float()
        counted = counted_val if target is val else \
            torch.from_numpy(ngram.log_probs(target)).float()
        for name, sc in list(variants.items()):
            w = mixture_weight(sc.val, counted_val)
            variants[f"{name} + {ngram.order}-gram"] = Scored(
                mixture_log_probs(sc.val, counted_val, w),
                mixture_log_probs(sc.target, counted, w), [{"ngram_weight": w}])
    rows = []
    for name, sc in variants.items():
        ppl = perplexity_of(sc.target)
        rows.append(Row(name, ppl, math.log(ppl) / LN2, perplexity_of(sc.val), sc.settings))
    return rows
