"""Metrics as pure functions over tokens: loss, perplexity, bits/char, reference baselines."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from gru_lm.data import Corpus, eval_batches
from gru_lm.ngram import KneserNey

LN2 = math.log(2)
MAX_REFERENCE_TARGET = 1_000_000  # without a val split, the references score train's first 1M


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp(total NLL / total tokens), never a mean of per-batch perplexities."""
    return math.exp(nll_sum / num_tokens) if num_tokens else float("nan")


def bits_per_char(nll_sum: float, num_tokens: int) -> float:
    return nll_sum / num_tokens / LN2 if num_tokens else float("nan")


def unigram_perplexity(train: torch.Tensor, target: torch.Tensor, vocab_size: int,
                       counts: torch.Tensor | None = None) -> float:
    """Perplexity of `target` under add-one smoothed unigram frequencies of `train`
    (`counts`: token_counts(train) when the caller has them)."""
    counts = (token_counts(train, vocab_size) if counts is None else counts).double() + 1
    logp = (counts / counts.sum()).log()
    nll = float((-logp * token_counts(target, vocab_size)).sum())
    return math.exp(nll / len(target)) if len(target) else float("nan")


def token_counts(tokens: torch.Tensor, vocab_size: int, chunk: int = 1 << 20) -> torch.Tensor:
    """How often each id occurs in `tokens` (any integer dtype), read in chunks."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for i in range(0, len(tokens), chunk):
        counts += torch.bincount(tokens[i:i + chunk].long(), minlength=vocab_size)[:vocab_size]
    return counts


def uniform_outcomes(counts: torch.Tensor, has_unk: bool) -> int:
    """How many tokens a model really chooses among, from the training text's token counts:
    the whole vocabulary, less <unk> when the text never holds it (a corpus read with its
    own vocabulary and no data.min_freq: the d2l preset's 27 characters). The bytes preset
    has no <unk>: 256."""
    vocab_size = len(counts)
    return vocab_size - 1 if has_unk and vocab_size > 1 and not counts[0] else vocab_size


def reference_baselines(train: torch.Tensor, target: torch.Tensor, vocab_size: int,
                        ngram_order: int = 5, ngram=None, has_unk: bool = True
                        ) -> dict[str, float]:
    """Uniform, unigram and Kneser-Ney n-gram perplexity of `target`, counted on `train`
    (`ngram`: the KneserNey model of `train` when the caller has built it already;
    `has_unk`: whether id 0 is <unk>, as in every vocabulary but the bytes preset's)."""
    ngram = ngram or KneserNey(train, vocab_size, ngram_order)
    nll, n = ngram.nll(target)
    counts = token_counts(train, vocab_size)
    return {"uniform_ppl": float(uniform_outcomes(counts, has_unk)),
            "unigram_ppl": unigram_perplexity(train, target, vocab_size, counts),
            "ngram_order": ngram_order, "ngram_ppl": perplexity(nll, n)}


def corpus_baselines(corpus: Corpus, ngram_order: int = 5,
                     val: torch.Tensor | None = None) -> dict[str, float]:
    """reference_baselines on the val split (`val`: the part of it that is evaluated), or on
    the train split when there is none."""
    val = corpus.val if val is None else val
    target = val if len(val) > 1 else corpus.train[:MAX_REFERENCE_TARGET]
    return reference_baselines(corpus.train, target, len(corpus.vocab), ngram_order,
                               has_unk=corpus.vocab.has_unk)


EVAL_WARMUP = 100  # tokens each parallel stream reads before it scores (see read_streams)


def stream_count(n: int, streams: int, warmup: int = EVAL_WARMUP) -> int:
    """How many parallel streams score n positions: at most `streams`, and few enough that
    every stream but the first starts at least `warmup` tokens into the split."""
    return max(1, min(streams, n, n // warmup if warmup else n))


@dataclass
class Window:
    """One window of a split read as parallel streams: the targets (streams, num_steps),
    -100 where nothing is scored (padding, stream 0's empty warm-up), the logits (streams,
    num_steps, vocab_size) and, when asked for, the features (streams, num_steps,
    num_hiddens). `warmup`: the text before each stream, read but not scored."""

    Y: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor | None
    warmup: bool


@contextmanager
def evaluating(model):
    """The model in eval mode (dropout off) for the block, then back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def read_streams(model, tokens: torch.Tensor, streams: int, num_steps: int,
                 warmup: int = EVAL_WARMUP, *, device: torch.device | str = "cpu",
                 autocast=nullcontext, features: bool = False) -> Iterator[Window]:
    """Read a split as parallel streams that each score their stretch of text as one stream
    over the whole split would: every token scored once, in order, with the state carried.

    Stream b starts at position b * L. Before scoring, every stream but the first reads the
    `warmup` tokens just before its start (its targets are not scored), so its first
    characters have context instead of a zero state; stream 0 starts the split, from a zero
    state, as one stream would. The streams are limited by stream_count, so that each stream
    is at least `warmup` long. Measured on configs/lstm.yaml (val, 499 streams), the gap to
    one stream is +22% without a warm-up, +0.35% with 5 tokens, +0.06% with 10 and under
    0.001% from 25; the default of 100 (train.eval_warmup) leaves a margin for models with
    a longer memory.
    """
    n = len(tokens) - 1
    if n < 1:
        return
    B = stream_count(n, streams, warmup)
    L = -(-n // B)  # ceil: every stream's length, the last one padded
    W = warmup if B > 1 else 0
    begins = torch.arange(B).unsqueeze(1) * L - W  # (streams, 1)
    with evaluating(model):
        state = model.begin_state(B, device)
        for i in range(0, W, num_steps):
            pos = begins + torch.arange(i, min(i + num_steps, W))  # (streams, window)
            # stream 0 has no text before it (it reads token 0, unscored), and the last
            # streams of a short split may lie past its end (all padding)
            real = (pos >= 0) & (pos < n)
            pos = pos.clamp(0, n - 1)
            X = tokens[pos].long().to(device)
            Y = torch.where(real, tokens[pos + 1].long(), -100).to(device)
            logits, state, feats = _run(model, X, state, autocast, features)
            yield Window(Y, logits, feats, warmup=True)
        if W:
            for s in state if isinstance(state, tuple) else (state,):
                s[:, 0] = 0  # (num_layers, streams, ...): stream 0 starts from zero
        for X, Y in eval_batches(tokens, B, num_steps):
            X, Y = X.to(device), Y.to(device)
            logits, state, feats = _run(model, X, state, autocast, features)
            yield Window(Y, logits, feats, warmup=False)


def _run(model, X, state, autocast, features: bool):
    """(logits, state, features or None) of one window."""
    with autocast():
        if features:
            return model.forward_features(X, state)
        return (*model(X, state), None)


def target_log_probs(logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """log P(Y) under logits (..., vocab_size), float32; 0 where Y is -100 (not scored)."""
    logp = logits.float().log_softmax(-1).gather(-1, Y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(Y < 0, 0.0)


def evaluate(model, tokens: torch.Tensor, streams: int, num_steps: int,
             warmup: int = EVAL_WARMUP, *, device: torch.device | str = "cpu",
             autocast=nullcontext) -> tuple[float, int]:
    """Total NLL (nats) and token count over a split, every token scored once with the text
    before it as context (read_streams). Only the sum is kept: memory does not grow with the
    split, and it stays on `device` until the end (a GPU is synchronised once)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for w in read_streams(model, tokens, streams, num_steps, warmup, device=device,
                          autocast=autocast):
        if not w.warmup:
            total += target_log_probs(w.logits, w.Y).double().sum()
    return -float(total), max(0, len(tokens) - 1)


def token_log_probs(model, tokens: torch.Tensor, streams: int, num_steps: int,
                    warmup: int = EVAL_WARMUP, *, device: torch.device | str = "cpu",
                    autocast=nullcontext) -> torch.Tensor:
    """log P(tokens[j + 1] | tokens[:j + 1]) for every j, float32, in text order (for the
    mixtures, which need every token's score: 4 bytes a token)."""
    parts = [target_log_probs(w.logits, w.Y).cpu()
             for w in read_streams(model, tokens, streams, num_steps, warmup, device=device,
                                   autocast=autocast) if not w.warmup]
    if not parts:
        return torch.zeros(0)
    # Stream b holds text positions b * L ... b * L + L - 1; the padded tail is cut off.
    return torch.cat(parts, dim=1).reshape(-1)[:len(tokens) - 1]


def mixture_weight(logp_a: torch.Tensor, logp_b: torch.Tensor, iterations: int = 100) -> float:
    """The weight w of b in w * P_b + (1 - w) * P_a that maximises the likelihood of the
    tokens (mixture_weights of the two)."""
    return mixture_weights([logp_a, logp_b], iterations)[1]


def mixture_weights(parts: list[torch.Tensor], iterations: int = 2000) -> list[float]:
    """The weights w_k (summing to 1) of the mixture sum_k w_k P_k that maximise the
    likelihood of the tokens, P_k given as per-token log-probabilities: EM, from equal
    weights (each step cannot lower the likelihood; the new w_k is the mean share of
    component k in the tokens' mixed probability). Components that predict alike (seeds of
    one model) slow EM down: up to `iterations` steps, until no weight moves by 1e-8."""
    logp = torch.stack(parts).double()  # (K, N)
    w = torch.full((len(parts), 1), 1 / len(parts), dtype=torch.float64)
    for _ in range(iterations):
        joint = logp + w.log()
        new = (joint - joint.logsumexp(0)).exp().mean(1, keepdim=True)
        done = float((new - w).abs().max()) < 1e-8
        w = new
        if done:
            break
    return [float(x) for x in w.flatten()]


def mixture_log_probs(logp_a: torch.Tensor, logp_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * P_b + (1 - w) * P_a), computed without underflow."""
    if w <= 0:
        return logp_a
    if w >= 1:
        return logp_b
    return torch.logaddexp(logp_b + math.log(w), logp_a + math.log1p(-w))
