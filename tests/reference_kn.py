"""The reference the array-based Kneser-Ney model (gru_lm/ngram.py) is tested against."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


class ReferenceKneserNey:
    """gru-lm's first, pure-Python Kneser-Ney model: dictionaries of counters, one token at
    a time. Kept here to check the array version against (with one fix: a context shorter
    than order - 1 tokens is used whole; the first version sliced it with a negative start
    and kept only its last tokens)."""

    def __init__(self, tokens: Sequence[int], vocab_size: int, order: int = 5):
        if order < 1:
            raise ValueError("order must be >= 1")
        toks = [int(t) for t in tokens]
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
        context = tuple(context[max(0, len(context) - (self.order - 1)):]) if self.order > 1 \
            else ()
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
