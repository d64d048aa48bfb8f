"""Uncertainty of a comparison: t intervals over seeds and a block bootstrap over the text.

Two sources of noise separate two models' test perplexities: the seeds (initialisation,
dropout masks, batch order) and the test text itself (another stretch of the same book would
give other figures). The first is measured by paired seeds, a t interval over the per-seed
differences; the second by resampling blocks of the test text with replacement, both models
scored on the same resampled blocks (a paired bootstrap).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

# t_{0.975, df} for df = 1..30 (two-sided 95%).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964
BOOTSTRAP_SAMPLES = 4000
BLOCK_TOKENS = 100  # tokens a block of the text; at most MAX_BLOCKS blocks
MAX_BLOCKS = 1000


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion around the normal quantile, within 1e-4)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int = 0  # values (seeds) it is computed from; 0 for a bootstrap

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_interval(xs: list[float]) -> Interval | None:
    """mean ± t_{0.975, n-1} s / sqrt(n); None for fewer than 2 values."""
    if len(xs) < 2:
        return None
    m = statistics.fmean(xs)
    h = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Interval(m, m - h, m + h, len(xs))


def percent_change(nll_a: float, nll_b: float) -> float:
    """How much higher A's perplexity is than B's, in percent, from mean NLLs (negative: A
    is lower, i.e. better)."""
    return 100 * math.expm1(nll_a - nll_b)


def block_bootstrap(nll_a: np.ndarray, nll_b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = 0, block: int = BLOCK_TOKENS) -> Interval:
    """Percent change of A's perplexity against B's on the same tokens (per-token NLLs, text
    order), with a 95% percentile interval from resampling blocks of the text."""
    a, b = np.asarray(nll_a, np.float64), np.asarray(nll_b, np.float64)
    if len(a) != len(b) or not len(a):
        raise ValueError("both models must score the same, non-empty text")
    num = min(MAX_BLOCKS, max(1, -(-len(a) // block)))
    edges = np.linspace(0, len(a), num + 1).round().astype(np.int64)
    sums = np.add.reduceat(a - b, edges[:-1])  # per block: sum of NLL differences
    sizes = np.diff(edges)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num, size=(samples, num))
    means = sums[picks].sum(1) / sizes[picks].sum(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return Interval(percent_change(float(a.mean()), float(b.mean())),
                    100 * math.expm1(lo), 100 * math.expm1(hi))


def paired_seeds(ppl_a: list[float], ppl_b: list[float]) -> Interval | None:
    """t interval of the per-seed percent change of A's test perplexity against B's (seed i
    of A paired with seed i of B: the same batches and masks' seed)."""
    return t_interval([100 * (x / y - 1) for x, y in zip(ppl_a, ppl_b, strict=True)])


def verdict(a: str, b: str, seeds: Interval | None, text: Interval) -> str:
    """One sentence on A against B, where A has the lower test perplexity (the intervals are
    of A's percent change against B): better only when both 95% intervals, over paired seeds
    and over blocks of the test text, lie below zero."""
    if seeds is None:
        return (f"no difference that these seeds can show between {a} and {b}: one seed each "
                f"({a}'s test ppl {text.mean:+.1f}% against {b}'s); train 2 or more, e.g. "
                "--seeds 3")
    if seeds.high < 0 and text.high < 0:
        return (f"{a} is better than {b} by {-seeds.mean:.1f}% in test ppl (95% CI "
                f"{-seeds.high:.1f}–{-seeds.low:.1f}% over {seeds.n} paired seeds; "
                f"{-text.high:.1f}–{-text.low:.1f}% over blocks of the test text)")
    return (f"no difference that these seeds can show between {a} and {b} ({a}'s test ppl "
            f"{seeds.mean:+.1f}%, 95% CI {seeds.low:+.1f}% to {seeds.high:+.1f}% over paired "
            f"seeds, {text.low:+.1f}% to {text.high:+.1f}% over blocks of the test text)")
