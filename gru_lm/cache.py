"""A continuous cache (Grave et al. 2016, "Improving neural language models with a continuous
cache"): the model's next-character distribution, interpolated with the characters that
followed hidden states like the current one in the recent text.

With h_t the last layer's output after reading character t and y_i the character that
followed h_i, over the last `window` positions:

    p_cache(w | h_t) = sum_i [y_i = w] exp(theta h_t . h_i) / sum_i exp(theta h_t . h_i)
    p(w) = (1 - lambda) p_model(w) + lambda p_cache(w)

A pair (h_i, y_i) enters the cache only after y_i has been scored, so every character is
scored before the cache knows it. window and theta are chosen on the val split, lambda by
EM on it (metrics.mixture_weight), and the test split is scored once with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gru_lm.metrics import mixture_log_probs, mixture_weight, read_streams, target_log_probs

# What scored best on The Time Machine's val split lies inside these grids (configs/lstm.yaml:
# window 10000, theta 0.5; see README). A window longer than the text holds all of it.
WINDOWS = (1000, 3000, 10000)
THETAS = (0.2, 0.3, 0.5, 0.7, 1.0)
MAX_CACHE_FLOATS = 1 << 26  # 256 MB of cached features over all parallel streams


@dataclass(frozen=True)
class CacheSettings:
    window: int
    theta: float
    lam: float = 0.0


class ContinuousCache:
    """The recent (feature, next character) pairs of each parallel stream, and the cache's
    probability of each new target under every (window, theta) of a grid."""

    def __init__(self, windows: tuple[int, ...], thetas: tuple[float, ...]):
        self.windows, self.thetas = tuple(windows), tuple(thetas)
        self.size = max(self.windows)
        self.keys: torch.Tensor | None = None  # (streams, size, num_hiddens)
        self.vals: torch.Tensor | None = None  # (streams, size): next characters, -100 empty

    def read(self, features: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """log p_cache(Y) of one window (streams, num_steps) for every (window, theta):
        (windows, thetas, streams, num_steps), NaN where the cache holds nothing yet. Then
        the window's pairs enter the cache (targets -100 stay out)."""
        B, T, H = features.shape
        feats = features.float()
        old_keys, old_vals = self.keys, self.vals
        if old_keys is None or old_vals is None:
            old_keys = feats.new_zeros(B, self.size, H)
            old_vals = torch.full((B, self.size), -100, dtype=torch.long, device=Y.device)
        keys = torch.cat([old_keys, feats], dim=1)  # (streams, size + T, num_hiddens)
        vals = torch.cat([old_vals, Y], dim=1)  # (streams, size + T)
        scores = feats @ keys.transpose(1, 2)  # (streams, T, size + T)
        j = torch.arange(self.size + T, device=Y.device)
        t = torch.arange(T, device=Y.device).unsqueeze(1) + self.size  # query t's own index
        filled = (vals >= 0).unsqueeze(1)  # (streams, 1, size + T)
        match = vals.unsqueeze(1) == Y.unsqueeze(2)  # (streams, T, size + T)
        out = scores.new_full((len(self.windows), len(self.thetas), B, T), math.nan)
        for a, window in enumerate(self.windows):
            valid = filled & ((j < t) & (j >= t - window))  # strictly before t, in the window
            for b, theta in enumerate(self.thetas):
                s = (theta * scores).masked_fill(~valid, -math.inf)
                hit = torch.logsumexp(s.masked_fill(~match, -math.inf), dim=-1)
                out[a, b] = hit - torch.logsumexp(s, dim=-1)  # NaN (-inf - -inf) when empty
        self.keys, self.vals = keys[:, -self.size:], vals[:, -self.size:]
        return out


def with_cache(logp_model: torch.Tensor, logp_cache: torch.Tensor, lam: float) -> torch.Tensor:
    """log((1 - lambda) p_model + lambda p_cache); the model alone where the cache is empty."""
    empty = torch.isnan(logp_cache)
    mixed = mixture_log_probs(logp_model, logp_cache.masked_fill(empty, 0.0), lam)
    return torch.where(empty, logp_model, mixed)


def choose(logp_model: torch.Tensor, grid: torch.Tensor, windows, thetas) -> CacheSettings:
    """The (window, theta) whose cache, mixed with lambda fitted by EM, gives the highest
    likelihood of these tokens (val); grid: (windows, thetas, tokens) log p_cache."""
    best, best_nll = None, math.inf
    for a, window in enumerate(windows):
        for b, theta in enumerate(thetas):
            logc = grid[a, b]
            empty = torch.isnan(logc)
            lam = mixture_weight(logp_model[~empty], logc[~empty]) if (~empty).any() else 0.0
            nll = -float(with_cache(logp_model, logc, lam).double().sum())
            if nll < best_nll:
                best, best_nll = CacheSettings(window, theta, lam), nll
    if best is None:
        raise ValueError("no (window, theta) gave a finite likelihood: the scores hold NaN")
    return best


def cache_scores(model, tokens: torch.Tensor, streams: int, num_steps: int, warmup: int,
                 windows=WINDOWS, thetas=THETAS, *, device: torch.device | str = "cpu",
                 autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log P of tokens[1:] (float32, text order) and the cache's, for every
    (window, theta): (windows, thetas, tokens), NaN where the cache is empty. Read as the
    warmed-up parallel streams of metrics.read_streams, each warming up over at least the
    largest window, so each stream's cache holds the text before it as one stream's would
    (`warmup`: the least warm-up, train.eval_warmup)."""
    from contextlib import nullcontext

    cache = ContinuousCache(windows, thetas)
    streams = min(streams, max(1, MAX_CACHE_FLOATS // (cache.size * model.num_hiddens)))
    model_parts, cache_parts = [], []
    for w in read_streams(model, tokens, streams, num_steps, max(warmup, cache.size),
                          device=device, autocast=autocast or nullcontext, features=True):
        assert w.features is not None  # (asked for)
        grid = cache.read(w.features, w.Y)  # (windows, thetas, streams, window)
        if not w.warmup:
            model_parts.append(target_log_probs(w.logits, w.Y).cpu())
            cache_parts.append(grid.cpu())
    n = max(0, len(tokens) - 1)
    if not model_parts:
        return torch.zeros(0), torch.zeros(len(windows), len(thetas), 0)
    logp = torch.cat(model_parts, dim=1).reshape(-1)[:n]  # streams one after the other
    grid = torch.cat(cache_parts, dim=-1)
    return logp, grid.reshape(len(windows), len(thetas), -1)[..., :n]
