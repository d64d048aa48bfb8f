"""Context mixing, as the strongest compressors mix (paq8, cmix), over per-token probabilities.

Several predictors of the next token (a trained model's scores, the Kneser-Ney estimate of
every order 1..N, and a match model: the longest recent repeat of the current context
predicts what followed it) are mixed linearly. The weights are not one global vector: a small
context (how long the current match is) selects one of a few weight sets, and each set is
learned as the text is read, every token scored with the weights learned before it.

Linear mixing needs only each predictor's probability of the token that came: a mixture of
proper distributions is one, and the gradient of its log-loss in the weights is p_i(x) / p(x);
the weights stay on the simplex by exponentiated-gradient steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_MATCH = 6  # tokens of context that start a match (hashed, then checked)
MAX_MATCH = 64  # longest match length counted
MAX_HISTORY = 4_000_000  # tokens of the training text a match may point into (the last ones)
LENGTH_EDGES = (8, 16, 32)  # match lengths that open the next weight set
NUM_SETS = len(LENGTH_EDGES) + 2  # no match, then one set per length bucket
ETAS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # learning rates tried on val
FLOOR = 1e-30  # a probability no predictor goes below (float32 scores can round to 0)


@dataclass
class Matches:
    """For each position j of a text (predicting text[j + 1] from text[:j + 1], with the
    history before it): the token the current match predicts (-1: none) and its length."""

    predicted: np.ndarray  # (len(text) - 1,) int64
    length: np.ndarray  # (len(text) - 1,) int64, 0 where there is no match

    @property
    def sets(self) -> np.ndarray:
        """The weight set each position uses: 0 without a match, else 1 + its length bucket."""
        return np.where(self.predicted < 0, 0,
                        1 + np.searchsorted(LENGTH_EDGES, self.length, side="right"))


def _window_hashes(seq: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of seq[p - n + 1 .. p] at every p >= n - 1 (index p - n + 1)."""
    h = np.zeros(len(seq) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(1_000_003) + seq[k:len(seq) - n + 1 + k].astype(np.uint64)
    return h


def find_matches(history: np.ndarray, text: np.ndarray, min_len: int = MIN_MATCH) -> Matches:
    """The match model's state along `text`: at each position the most recent earlier
    occurrence (in the history, then the text read so far) of its last `min_len` tokens is
    found; while the token it predicted keeps coming, the match goes on and grows. Only
    tokens up to the position are used."""
    history = np.asarray(history[len(history) - MAX_HISTORY:] if len(history) > MAX_HISTORY
                         else history, np.int64)
    text = np.asarray(text, np.int64)
    seq = np.concatenate([history, text])
    H, n = len(history), len(seq)
    out_pred = np.full(max(0, len(text) - 1), -1, np.int64)
    out_len = np.zeros(max(0, len(text) - 1), np.int64)
    if n < min_len + 1 or len(text) < 2:
        return Matches(out_pred, out_len)
    h = _window_hashes(seq, min_len)  # h[i]: the window ending at p = i + min_len - 1
    order = np.lexsort((np.arange(len(h)), h))  # by hash, then by position
    prev = np.full(len(h), -1, np.int64)  # the latest earlier window with the same hash
    same = h[order[1:]] == h[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    ptr = length = 0  # ptr: where the token the match predicts next sits (0: no match)
    for p in range(max(H, min_len - 1), n - 1):
        j = p - H
        if ptr and seq[ptr] == seq[p]:  # the last prediction came true: the match goes on
            ptr, length = ptr + 1, min(length + 1, MAX_MATCH)
        else:
            ptr = length = 0
        if not ptr:
            q = prev[p - min_len + 1]
            if q >= 0:
                q += min_len - 1  # where the earlier window ends
                k = 0  # how far back it agrees (the hash is checked here too)
                while k < MAX_MATCH and q - k >= 0 and seq[q - k] == seq[p - k]:
                    k += 1
                if k >= min_len:
                    ptr, length = q + 1, k
        if ptr and j >= 0:
            out_pred[j], out_len[j] = seq[ptr], length
    return Matches(out_pred, out_len)


def match_probs(matches: Matches, targets: np.ndarray, vocab_size: int,
                counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The match model's probability of each target: c for the predicted token, the rest
    shared evenly; without a match, 1 / vocab_size. c is learned per length bucket as the
    text is read ((hits + 0.5) / (tries + 1), `counts` carried in and returned: hits and
    tries per set)."""
    counts = np.zeros((NUM_SETS, 2)) if counts is None else counts.copy()
    sets = matches.sets
    out = np.full(len(targets), 1.0 / vocab_size)
    for j, (pred, s) in enumerate(zip(matches.predicted.tolist(), sets.tolist(),
                                      strict=True)):
        if pred < 0:
            continue
        c = (counts[s, 0] + 0.5) / (counts[s, 1] + 1.0)
        hit = pred == targets[j]
        out[j] = c if hit else (1.0 - c) / max(1, vocab_size - 1)
        counts[s] += (hit, 1)
    return out, counts


def mix(probs: np.ndarray, sets: np.ndarray, eta: float, weights: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray]:
    """log of the mixture at every position (probs: (positions, predictors), each row the
    predictors' probabilities of the token that came; sets: the weight set of each
    position), each scored with its set's weights before they learn from it; returns the
    log-probabilities and the weights after the text (weights: (sets, predictors))."""
    w = weights.copy()
    out = np.empty(len(probs))
    for j, (row, s) in enumerate(zip(np.maximum(probs, FLOOR), sets.tolist(), strict=True)):
        ws = w[s]
        p = float(ws @ row)
        out[j] = np.log(p)
        ws *= np.exp(eta * (row / p - 1.0))  # (the -1 keeps the numbers near 1)
        ws /= ws.sum()
    return out, w


def initial_weights(num_predictors: int, first: float = 0.5) -> np.ndarray:
    """Every set starts trusting the first predictor (the trained model) with `first`, the
    others evenly."""
    w = np.full(num_predictors, (1.0 - first) / max(1, num_predictors - 1))
    w[0] = first
    return np.tile(w, (NUM_SETS, 1))
