"""Interpolated Kneser–Ney n-gram model over token ids: the classical baseline to beat.

For a context h (the previous n-1 tokens) and a token w, from the lowest order up:

    P_n(w | h) = (max(c_n(h w) - D_n, 0) + D_n * T_n(h) * P_{n-1}(w | h')) / c_n(h)

where h' is h without its first token, c_n(h) the total count of h as a context and T_n(h)
the number of distinct tokens seen after it; P_0 is uniform over the vocabulary. The
highest order counts occurrences; lower orders count distinct left neighbours (continuation
counts), the Kneser–Ney idea: a token that follows many different contexts is a better guess
after an unseen one. A context never seen falls through to the next lower order. The
discount per order is D_n = n1 / (n1 + 2 n2) from the counts of counts (Ney et al. 1994).
Each P_n sums to 1 over the vocabulary, so the model is a proper distribution.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

MAX_TRAIN_TOKENS = 1_000_000  # counting is pure Python: bigger corpora use their first 1M


class KneserNey:
    def __init__(self, tokens: Sequence[int], vocab_size: int, order: int = 5):
        if order < 1:
            raise ValueError("order must be >= 1")
        head = tokens[:MAX_TRAIN_TOKENS]
        toks = head.tolist() if hasattr(head, "tolist") else [int(t) for t in head]
        self.order, self.vocab_size = order, vocab_size
        # counts[n][h][w] for n = 1..order, h a tuple of n - 1 ids.
        self.counts: list[dict[tuple, Counter]] = [{} for _ in range(order + 1)]
        for n in range(1, order + 1):
            if n == order:  # occurrences
                grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
                for g, c in grams.items():
                    self.counts[n].setdefault(g[:-1], Counter())[g[-1]] = c
            else:  # distinct left neighbours of each n-gram
                longer = {tuple(toks[i:i + n + 1]) for i in range(len(toks) - n)}
                for g in longer:
                    self.counts[n].setdefault(g[1:-1], Counter())[g[-1]] += 1
        self.totals = [{h: sum(c.values()) for h, c in level.items()} for level in self.counts]
        self.discounts = [0.0] + [self._discount(self.counts[n]) for n in range(1, order + 1)]

    @staticmethod
    def _discount(level: dict[tuple, Counter]) -> float:
        of = Counter(c for counter in level.values() for c in counter.values())
        n1, n2 = of.get(1, 0), of.get(2, 0)
        return min(0.95, max(0.05, n1 / (n1 + 2 * n2))) if n1 + n2 else 0.75

    def prob(self, context: Sequence[int], w: int) -> float:
        """P(w | context), using at most the last order - 1 tokens of the context."""
        p = 1.0 / self.vocab_size
        context = tuple(context[len(context) - (self.order - 1):]) if self.order > 1 else ()
        for n in range(1, self.order + 1):
            if n - 1 > len(context):
                break
            h = context[len(context) - (n - 1):] if n > 1 else ()
            seen = self.counts[n].get(h)
            if not seen:
                continue
            D = self.discounts[n]
            p = (max(seen.get(w, 0) - D, 0.0) + D * len(seen) * p) / self.totals[n][h]
        return p

    def distribution(self, context: Sequence[int]) -> list[float]:
        return [self.prob(context, w) for w in range(self.vocab_size)]

    def log_probs(self, tokens: Sequence[int]) -> list[float]:
        """log P(tokens[i] | tokens before it) for i = 1.., the tokens a neural model's
        evaluation scores, in the same order."""
        toks = [int(t) for t in tokens]
        k = self.order - 1
        return [math.log(self.prob(toks[max(0, i - k):i], toks[i])) for i in range(1, len(toks))]

    def nll(self, tokens: Sequence[int]) -> tuple[float, int]:
        """Total NLL (nats) of tokens[1:], each given the tokens before it."""
        return -math.fsum(self.log_probs(tokens)), max(0, len(tokens) - 1)
