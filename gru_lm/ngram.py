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

Counting and scoring are array operations (numpy). Every k-gram of the training text gets a
code, its rank among the distinct k-grams: the code of the k-gram at position i is the rank
of (code of the (k-1)-gram at i) * V + (its last token), so one np.unique per order numbers
them all, and a sorted array of those keys finds a query's k-grams by binary search.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

# Token ids: a torch tensor (a store's uint8/uint16/int64 view), an array or a list.
Tokens: TypeAlias = "Sequence[int] | np.ndarray | torch.Tensor"

MAX_TRAIN_TOKENS = 10_000_000  # bigger corpora count their first 10M training tokens
CHUNK = 1 << 18  # targets scored per block, so memory does not grow with the text
BUILD_CHUNK = 1 << 18  # tokens numbered at a time while counting


def _as_array(tokens) -> np.ndarray:
    if hasattr(tokens, "numpy"):  # a torch tensor (uint8/uint16/int64 views of a store)
        tokens = tokens.numpy()
    return np.asarray(tokens).astype(np.int64, copy=False)


class _Level:
    """One order n: c_n(h w) for every n-gram code, and per context code its total c_n(h)
    and number of distinct followers T_n(h)."""

    def __init__(self, keys: np.ndarray, counts: np.ndarray, num_contexts: int, V: int):
        self.keys = keys  # sorted (context code * V + token) of every distinct n-gram
        self.counts = counts.astype(np.int32)  # c_n(h w), aligned with keys (0: not counted)
        context = keys // V
        nz = counts > 0
        self.totals = np.bincount(context, weights=counts, minlength=num_contexts)
        self.types = np.bincount(context[nz], minlength=num_contexts).astype(np.int32)
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        self.discount = min(0.95, max(0.05, n1 / (n1 + 2 * n2))) if n1 + n2 else 0.75

    def code(self, prefix: np.ndarray, last: np.ndarray, V: int) -> np.ndarray:
        """Codes of the n-grams (prefix code, last token); -1 for one never counted."""
        key = (prefix * V + last).astype(self.keys.dtype)  # fits: prefix < the contexts
        if not len(self.keys):
            return np.full(len(key), -1, np.int64)
        idx = np.searchsorted(self.keys, key).clip(max=len(self.keys) - 1)
        return np.where((prefix >= 0) & (self.keys[idx] == key), idx, -1)


def _number(prev: np.ndarray, toks: np.ndarray, n: int, num_prev: int, V: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """The distinct n-grams of a text as sorted keys (code of the (n-1)-gram prefix * V +
    last token) and each position's n-gram code (its key's rank), from the prefixes' codes
    `prev`. Read in chunks, so memory stays a few bytes a token (int32 codes; int64 keys
    only when they need it)."""
    m = max(0, len(toks) - n + 1)  # n-grams in the text
    dtype = np.int32 if num_prev * V < 2**31 else np.int64

    def key(a: int, b: int) -> np.ndarray:
        return prev[a:b].astype(dtype) * V + toks[n - 1 + a:n - 1 + b].astype(dtype)

    code = np.empty(m, np.int32)  # first each chunk's own ranks, then the global ones
    uniques = []
    for a in range(0, m, BUILD_CHUNK):
        u, inverse = np.unique(key(a, min(m, a + BUILD_CHUNK)), return_inverse=True)
        code[a:a + BUILD_CHUNK] = inverse
        uniques.append(u)
    keys = np.unique(np.concatenate(uniques)) if uniques else np.zeros(0, dtype)
    for i, u in enumerate(uniques):  # sorted queries: a fast binary search
        chunk = code[i * BUILD_CHUNK:(i + 1) * BUILD_CHUNK]
        chunk[:] = np.searchsorted(keys, u)[chunk]
    return keys, code


def _bincount(codes: np.ndarray, size: int) -> np.ndarray:
    """np.bincount in chunks (it copies its input to int64 first)."""
    out = np.zeros(size, np.int64)
    for a in range(0, len(codes), BUILD_CHUNK):
        out += np.bincount(codes[a:a + BUILD_CHUNK], minlength=size)
    return out


class KneserNey:
    def __init__(self, tokens: Tokens, vocab_size: int, order: int = 5,
                 max_tokens: int = MAX_TRAIN_TOKENS):
        if order < 1:
            raise ValueError("order must be >= 1")
        head = tokens[:max_tokens]  # a store's uint8/uint16 ids stay as they are
        toks = head.numpy() if hasattr(head, "numpy") else np.asarray(head)
        self.order, self.vocab_size = order, vocab_size
        V, N = vocab_size, len(toks)
        keys: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        contexts = [1]  # how many distinct (n-1)-grams, the contexts of order n
        prev = np.zeros(N + 1, np.int32)  # the code of the empty gram at every position
        for n in range(1, order + 1):
            k, code = _number(prev, toks, n, contexts[-1], V)
            if n > 1:  # order n - 1 counts distinct left neighbours: one per n-gram here
                suffix = np.zeros(len(k), np.int32)  # the (n-1)-gram each n-gram ends with
                for a in range(0, len(code), BUILD_CHUNK):
                    suffix[code[a:a + BUILD_CHUNK]] = prev[a + 1:a + 1 + BUILD_CHUNK]
                counts[-1] = _bincount(suffix, len(keys[-1]))
            keys.append(k)
            counts.append(_bincount(code, len(k)))  # occurrences: the top order
            contexts.append(len(k))
            prev = code
        del prev
        self.levels = [_Level(k, c, contexts[n], V)
                       for n, (k, c) in enumerate(zip(keys, counts, strict=True))]
        self.discounts = [0.0] + [lv.discount for lv in self.levels]

    def _block(self, q: np.ndarray, first: int, orders: list[np.ndarray] | None = None
               ) -> np.ndarray:
        """P(q[j] | up to order - 1 tokens before it) for j = first.. len(q) - 1; `orders`:
        also each order's estimate n = 1..order (the interpolation as it stands after level
        n), appended to it."""
        V, M = self.vocab_size, len(q)
        p = np.full(M - first, 1.0 / V)
        prev = np.zeros(M + 1, np.int64)  # codes of the (n-1)-grams starting at each position
        for n, lv in enumerate(self.levels, start=1):
            m = max(0, M - n + 1)
            code = lv.code(prev[:m], q[n - 1:n - 1 + m], V)
            j = np.arange(max(first, n - 1), M)  # targets whose context has n - 1 tokens
            if len(j) and len(lv.keys):  # (an order with no n-gram has no context seen)
                s = j - n + 1  # where the n-gram ending in the target starts
                h = prev[s]
                hc = h.clip(min=0)
                seen = (h >= 0) & (lv.types[hc] > 0)
                g = code[s]
                c = np.where(g >= 0, lv.counts[g.clip(min=0)], 0)
                D = lv.discount
                old = p[j - first]
                new = (np.maximum(c - D, 0.0) + D * lv.types[hc] * old) / np.where(
                    seen, lv.totals[hc], 1.0)
                p[j - first] = np.where(seen, new, old)
            prev = code
            if orders is not None:
                orders.append(p.copy())
        return p

    def prob_blocks(self, tokens: Tokens, chunk: int = CHUNK) -> Iterator[np.ndarray]:
        """P(tokens[i] | the tokens before it) for i = 1.., in blocks of `chunk` (float64)."""
        q = _as_array(tokens)
        k = self.order - 1
        for a in range(1, len(q), chunk):
            start = max(0, a - k)
            yield self._block(q[start:min(len(q), a + chunk)], a - start)

    def probs_by_order(self, tokens: Tokens, chunk: int = CHUNK) -> np.ndarray:
        """P(tokens[i] | the tokens before it) for i = 1.. as estimated by each order n =
        1..order of the interpolation (row n - 1; the last row is prob_blocks'): the
        predictors a context mixer weighs. (order, len(tokens) - 1), float64."""
        q = _as_array(tokens)
        k = self.order - 1
        parts = []
        for a in range(1, len(q), chunk):
            start = max(0, a - k)
            rows: list[np.ndarray] = []
            self._block(q[start:min(len(q), a + chunk)], a - start, rows)
            parts.append(np.stack(rows))
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.order, 0))

    def prob(self, context: Sequence[int], w: int) -> float:
        """P(w | context), using at most the last order - 1 tokens of the context."""
        return float(self._block(np.array([*context, w], np.int64), len(context))[0])

    def distribution(self, context: Sequence[int]) -> list[float]:
        return [self.prob(context, w) for w in range(self.vocab_size)]

    def log_probs(self, tokens: Tokens) -> np.ndarray:
        """log P(tokens[i] | tokens before it) for i = 1.., the tokens a neural model's
        evaluation scores, in the same order (float64)."""
        blocks = [np.log(b) for b in self.prob_blocks(tokens)]
        return np.concatenate(blocks) if blocks else np.zeros(0)

    def nll(self, tokens: Tokens) -> tuple[float, int]:
        """Total NLL (nats) of tokens[1:], each given the tokens before it, in blocks."""
        total = math.fsum(float(np.log(b).sum()) for b in self.prob_blocks(tokens))
        return -total, max(0, len(tokens) - 1)
