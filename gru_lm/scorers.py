"""The ways `gru-lm evaluate` scores a text, as a registry (as models.py holds the models).

A scorer turns one trained model and a text into the log-probability of every token, read
as one stream. Whatever it may choose (a cache's window, dynamic evaluation's learning
rate, a softmax temperature) it chooses on the val split; the target is then scored once
with that choice, and every token is scored before anything learns from it. A scorer is
one class:

    @register
    class MyScorer(Scorer):
        name = "mine"                      # its row in the table, its API keyword
        help = "Also score ... (... chosen on val)."  # the --mine option's help

        def score(self, m, texts, chosen) -> Scored: ...

`gru-lm evaluate --mine` and `gru_lm.evaluate(run, mine=True)` then exist with no other
edit. A *combination* (combines = ("dynamic", "cache")) has no option of its own: it runs
when every scorer it combines is asked for, reading what they chose from `chosen`.

A *mixer* is a post-pass over every scorer's result (the Kneser-Ney n-gram mixture);
ensembles average the members' probabilities before the mixers run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # (torch is imported where it is used: `gru-lm --help` lists these options)
    import torch

    from gru_lm.members import Member
    from gru_lm.ngram import KneserNey


@dataclass
class Texts:
    """What a scorer reads: val (where it chooses), the target (scored once with what val
    chose; `val` itself with --split val) and the training split (dynamic evaluation's
    gradient statistics)."""

    val: torch.Tensor | None  # None: the run has no val split (static scoring only)
    target: torch.Tensor
    train: torch.Tensor | None = None

    @property
    def tune_on(self) -> torch.Tensor:
        """The val split, where a scorer chooses its settings."""
        if self.val is None:
            raise ValueError("a scorer with settings needs a val split")
        return self.val

    @property
    def same(self) -> bool:
        """Val is the target: nothing is scored twice."""
        return self.target is self.val


@dataclass
class Scored:
    """Per-token log-probabilities (float32, text order) of val and of the target, and the
    settings val chose (one entry a member; empty when there is nothing to choose)."""

    val: torch.Tensor | None
    target: torch.Tensor
    settings: list[dict] = field(default_factory=list)


class Scorer:
    """One way to score a text with one model; see the module's docstring."""

    name: ClassVar[str]
    help: ClassVar[str] = ""
    combines: ClassVar[tuple[str, ...]] = ()  # a combination of these scorers: no option

    def score(self, m: Member, texts: Texts, chosen: dict[str, Any]) -> Scored:
        """Choose on texts.val, score texts.target; record in `chosen` what a combination
        may reuse."""
        raise NotImplementedError


class Mixer:
    """A post-pass: each scorer's (ensembled) result mixed with another model."""

    name: ClassVar[str]
    help: ClassVar[str] = ""

    def mix(self, variants: dict[str, Scored], texts: Texts, ngram: KneserNey
            ) -> dict[str, Scored]:
        raise NotImplementedError


SCORERS: dict[str, type[Scorer]] = {}
MIXERS: dict[str, type[Mixer]] = {}
STATIC = "static"
# evaluate's own options and arguments, which no scorer may be named (tests/test_house.py
# checks this against the CLI command and gru_lm.evaluate)
RESERVED = frozenset({"run", "runs", "checkpoint", "split", "text", "ngram-order",
                      "ngram_order", "weighted", "offline", "runs-dir", "runs_dir", "methods"})


def register(cls):
    """Add a Scorer or Mixer class to its registry under its name."""
    table: dict[str, Any] = MIXERS if issubclass(cls, Mixer) else SCORERS
    if cls.name in SCORERS or cls.name in MIXERS:
        raise ValueError(f"a scorer named {cls.name!r} is registered already")
    if cls.name in RESERVED:
        raise ValueError(f"{cls.name!r} is an option of evaluate already; name the scorer "
                         "otherwise")
    table[cls.name] = cls
    return cls


def options() -> dict[str, str]:
    """Every method a user may ask for (scorers and mixers, not combinations): name -> help."""
    scorers = {n: c.help for n, c in SCORERS.items() if n != STATIC and not c.combines}
    return {**scorers, **{n: c.help for n, c in MIXERS.items()}}


def chosen_scorers(asked: set[str]) -> list[Scorer]:
    """static, the asked scorers, and every combination of asked scorers, in registry order."""
    return [cls() for name, cls in SCORERS.items()
            if name == STATIC or name in asked or (cls.combines and set(cls.combines) <= asked)]


def ensemble(parts: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """log of the members' probabilities averaged token by token, with `weights` (summing
    to 1) or equally."""
    import torch

    if len(parts) == 1:
        return parts[0]
    if weights is None:
        return torch.logsumexp(torch.stack(parts), dim=0) - math.log(len(parts))
    logw = torch.tensor(weights, dtype=torch.float64).log().unsqueeze(1)
    return torch.logsumexp(torch.stack(parts).double() + logw, dim=0).float()


# ---------------------------------------------------------------- the scorers


@register
class Static(Scorer):
    """The model as trained, state carried through the text."""

    name = STATIC

    def score(self, m: Member, texts: Texts, chosen: dict[str, Any]) -> Scored:
        from gru_lm.metrics import token_log_probs

        val = None if texts.val is None else token_log_probs(m.model, texts.val,
                                                             *m.cfg.train.reading)
        return Scored(val, val if val is not None and texts.same else
                      token_log_probs(m.model, texts.target, *m.cfg.train.reading))


@register
class Cache(Scorer):
    """A continuous cache (gru_lm/cache.py)."""

    name = "cache"
    help = "Also score with a continuous cache (window, theta and lambda chosen on val)."

    def score(self, m: Member, texts: Texts, chosen: dict[str, Any]) -> Scored:
        from gru_lm.cache import THETAS, WINDOWS, cache_scores, choose, with_cache

        logp_v, grid_v = cache_scores(m.model, texts.tune_on, *m.cfg.train.reading)
        best = choose(logp_v, grid_v, WINDOWS, THETAS)
        a, b = WINDOWS.index(best.window), THETAS.index(best.theta)
        if texts.same:
            logp_t, grid_t = logp_v, grid_v[a, b]
        else:
            logp_t, grid = cache_scores(m.model, texts.target, *m.cfg.train.reading,
                                        windows=(best.window,), thetas=(best.theta,))
            grid_t = grid[0, 0]
        chosen[self.name] = best
        return Scored(with_cache(logp_v, grid_v[a, b], best.lam),
                      with_cache(logp_t, grid_t, best.lam),
                      [{"window": best.window, "theta": best.theta, "lambda": best.lam}])


@register
class Dynamic(Scorer):
    """Dynamic evaluation (gru_lm/dynamic.py)."""

    name = "dynamic"
    help = "Also score with dynamic evaluation (settings chosen on val)."

    def score(self, m: Member, texts: Texts, chosen: dict[str, Any]) -> Scored:
        from gru_lm.dynamic import dynamic_log_probs, gradient_ms, tune

        if texts.train is None:
            raise ValueError("dynamic evaluation needs the training split")
        ms = gradient_ms(m.model, texts.train, m.cfg.train.num_steps)
        best, val_dyn, _ = tune(m.model, texts.tune_on, ms)
        chosen[self.name] = (ms, best)
        target = val_dyn if texts.same else dynamic_log_probs(m.model, texts.target, ms,
                                                              best)[0]
        return Scored(val_dyn, target,
                      [{"lr": best.lr, "decay": best.decay, "segment": best.segment}])


@register
class DynamicCache(Scorer):
    """Both: the adapting model's features fill the cache (the cache's window and theta and
    dynamic evaluation's settings as each chose them alone; lambda refitted on val)."""

    name = "dynamic + cache"
    combines = ("dynamic", "cache")

    def score(self, m: Member, texts: Texts, chosen: dict[str, Any]) -> Scored:
        import torch

        from gru_lm.cache import with_cache
        from gru_lm.dynamic import dynamic_log_probs
        from gru_lm.metrics import mixture_weight

        ms, best = chosen["dynamic"]
        cache = chosen["cache"]
        val_d, val_c = dynamic_log_probs(m.model, texts.tune_on, ms, best, cache=cache)
        assert val_c is not None  # (a cache was given)
        known = ~torch.isnan(val_c)
        lam = mixture_weight(val_d[known], val_c[known]) if known.any() else 0.0
        tgt_d, tgt_c = (val_d, val_c) if texts.same else dynamic_log_probs(
            m.model, texts.target, ms, best, cache=cache)
        assert tgt_c is not None
        return Scored(with_cache(val_d, val_c, lam), with_cache(tgt_d, tgt_c, lam),
                      [{"lr": best.lr, "decay": best.decay, "segment": best.segment,
                        "window": cache.window, "theta": cache.theta, "lambda": lam}])


# Softmax temperatures tried on val: 0.70 to 1.40 in steps of 0.025 (DeepMind's lamb calls
# the setting eval_softmax_temperature). Every one is scored in the same pass over the text.
TEMPERATURES = tuple(round(0.7 + 0.025 * i, 3) for i in range(29))


def tempered_log_probs(model, tokens: torch.Tensor, temperatures: tuple[float, ...],
                       streams: int, num_steps: int, warmup: int) -> torch.Tensor:
    """log P(tokens[j + 1] | tokens[:j + 1]) with the logits divided by each temperature:
    (temperatures, tokens - 1), float32, text order, read as one stream (read_streams)."""
    import torch

    from gru_lm.metrics import read_streams, target_log_probs

    parts = []
    for w in read_streams(model, tokens, streams, num_steps, warmup):
        if not w.warmup:  # (temperatures, streams, window), one temperature at a time: a
            # vocabulary of thousands makes every temperature's logits hundreds of MB
            logits = w.logits.float()
            parts.append(torch.stack([target_log_probs(logits / t, w.Y)
                                      for t in temperatures]))
    if not parts:
        return torch.zeros(len(temperatures), 0)
    return torch.cat(parts, dim=2).reshape(len(temperatures), -1)[:, :len(tokens) - 1]


@register
class Temperature(Scorer):
    """The output distribution sharpened or flattened: softmax(logits / T), T chosen on val.
    A model trained with dropout and weight averaging is often a little under- or
    over-confident; one number learnt on val corrects it."""

    name = "temperature"
    help = "Also score with the softmax temperature chosen on val (logits / T)."

    def score(self, m: Member, texts: Texts, chosen: dict[str, Any]) -> Scored:
        grid = tempered_log_probs(m.model, texts.tune_on, TEMPERATURES, *m.cfg.train.reading)
        i = int(grid.double().sum(1).argmax())
        t = TEMPERATURES[i]
        target = grid[i] if texts.same else tempered_log_probs(
            m.model, texts.target, (t,), *m.cfg.train.reading)[0]
        return Scored(grid[i], target, [{"temperature": t}])


@register
class DynamicTemperature(Scorer):
    """Both: the adapting model's distribution at the softmax temperature chosen on val
    (dynamic evaluation's settings as it chose them alone; the model adapts on its own,
    untempered loss, and T only changes how its output is read)."""

    name = "dynamic + temperature"
    combines = ("dynamic", "temperature")

    def score(self, m: Member, texts: Texts, chosen: dict[str, Any]) -> Scored:
        from gru_lm.dynamic import dynamic_log_probs

        ms, best = chosen["dynamic"]
        grid, _ = dynamic_log_probs(m.model, texts.tune_on, ms, best, temperatures=TEMPERATURES)
        i = int(grid.double().sum(1).argmax())
        t = TEMPERATURES[i]
        target = grid[i] if texts.same else dynamic_log_probs(
            m.model, texts.target, ms, best, temperatures=(t,))[0][0]
        return Scored(grid[i], target, [{"lr": best.lr, "decay": best.decay,
                                         "segment": best.segment, "temperature": t}])


@register
class DynamicCacheTemperature(Scorer):
    """All three: the adapting model's distribution at a softmax temperature, mixed with the
    cache its features fill (dynamic evaluation's and the cache's settings as each chose
    them alone; T and the cache's lambda chosen together on val, lambda refitted at every T
    of the grid (or 0, where no cache scores val better), all read in one pass): the grid
    holds both pairs, dynamic + cache at T = 1 and dynamic + temperature at lambda 0."""

    name = "dynamic + cache + temperature"
    combines = ("dynamic", "cache", "temperature")

    def score(self, m: Member, texts: Texts, chosen: dict[str, Any]) -> Scored:
        import torch

        from gru_lm.cache import with_cache
        from gru_lm.dynamic import dynamic_log_probs
        from gru_lm.metrics import mixture_weight

        ms, best = chosen["dynamic"]
        cache = chosen["cache"]
        grid, val_c = dynamic_log_probs(m.model, texts.tune_on, ms, best, cache=cache,
                                        temperatures=TEMPERATURES)
        assert val_c is not None  # (a cache was given)
        known = ~torch.isnan(val_c)

        def mixed(i: int) -> tuple[float, torch.Tensor]:  # EM's lambda, or none if better
            lam = mixture_weight(grid[i][known], val_c[known]) if known.any() else 0.0
            fitted = with_cache(grid[i], val_c, lam)
            if fitted.double().sum() < grid[i].double().sum():
                return 0.0, grid[i]
            return lam, fitted

        fits = [mixed(i) for i in range(len(TEMPERATURES))]
        i = max(range(len(fits)), key=lambda k: fits[k][1].double().sum().item())
        lam, val = fits[i]
        t = TEMPERATURES[i]
        if texts.same:
            target = val
        else:
            tgt_grid, tgt_c = dynamic_log_probs(m.model, texts.target, ms, best, cache=cache,
                                                temperatures=(t,))
            assert tgt_c is not None
            target = with_cache(tgt_grid[0], tgt_c, lam)
        return Scored(val, target, [{"lr": best.lr, "decay": best.decay,
                                     "segment": best.segment, "window": cache.window,
                                     "theta": cache.theta, "lambda": lam, "temperature": t}])


@register
class NgramMix(Mixer):
    """Each scorer's result interpolated with the Kneser-Ney n-gram model counted on the
    training split, its weight fitted on val by EM."""

    name = "mix-ngram"
    help = ("Also score each of the above interpolated with the Kneser-Ney n-gram model "
            "(weight chosen on val).")

    def mix(self, variants: dict[str, Scored], texts: Texts, ngram: KneserNey
            ) -> dict[str, Scored]:
        import torch

        from gru_lm.metrics import mixture_log_probs, mixture_weight

        counted_val = torch.from_numpy(ngram.log_probs(texts.tune_on)).float()
        counted = counted_val if texts.same else \
            torch.from_numpy(ngram.log_probs(texts.target)).float()
        out = {}
        for name, sc in variants.items():
            assert sc.val is not None  # (every scorer that mixes read val)
            w = mixture_weight(sc.val, counted_val)
            out[f"{name} + {ngram.order}-gram"] = Scored(
                mixture_log_probs(sc.val, counted_val, w),
                mixture_log_probs(sc.target, counted, w), [{"ngram_weight": w}])
        return out


@register
class ContextMix(Mixer):
    """Each scorer's result mixed with the Kneser-Ney estimate of every order 1..N and a
    match model (gru_lm/mixing.py), by weight sets that the match's length selects and that
    learn as the text is read: over val (where the learning rate is chosen), then on over
    the target, every token scored before the weights learn from it."""

    name = "mix-context"
    help = ("Also score each of the above mixed with every order of the n-gram model and a "
            "match model, by weights learned as the text is read (context mixing; its "
            "learning rate chosen on val).")

    def mix(self, variants: dict[str, Scored], texts: Texts, ngram: KneserNey
            ) -> dict[str, Scored]:
        import numpy as np
        import torch

        from gru_lm.mixing import (
            ETAS,
            MAX_HISTORY,
            find_matches,
            initial_weights,
            match_probs,
            mix,
        )

        val = texts.tune_on.numpy().astype(np.int64)
        train = np.zeros(0, np.int64) if texts.train is None else texts.train

        def predictors(text: np.ndarray, history, counts):
            """(positions, N + 1): every order's probability, then the match model's."""
            matches = find_matches(history, text)
            matched, counts = match_probs(matches, text[1:], ngram.vocab_size, counts)
            return np.vstack([ngram.probs_by_order(text), matched[None]]).T, \
                matches.sets, counts

        p_val, sets_val, counts = predictors(val, train, None)
        if not texts.same:
            target = texts.target.numpy().astype(np.int64)
            tail = train[max(0, len(train) - MAX_HISTORY):]  # (what a match may reach)
            history = np.concatenate([np.asarray(tail, np.int64), val])
            p_tgt, sets_tgt, _ = predictors(target, history, counts)
        out = {}
        for name, sc in variants.items():
            assert sc.val is not None  # (every scorer that mixes read val)
            full_val = np.hstack([np.exp(sc.val.double().numpy())[:, None], p_val])
            w0 = initial_weights(full_val.shape[1])
            tried = {eta: mix(full_val, sets_val, eta, w0) for eta in ETAS}
            eta = max(ETAS, key=lambda e: tried[e][0].sum())
            val_lp, w = tried[eta]
            if texts.same:
                tgt_lp = val_lp
            else:
                full_tgt = np.hstack([np.exp(sc.target.double().numpy())[:, None], p_tgt])
                tgt_lp = mix(full_tgt, sets_tgt, eta, w)[0]
            out[f"{name} + context mix"] = Scored(
                torch.from_numpy(val_lp).float(), torch.from_numpy(tgt_lp).float(),
                [{"mix_eta": eta, "mix_inputs": full_val.shape[1]}])
        return out
