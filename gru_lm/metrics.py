"""Metrics as pure functions over tokens: loss, perplexity, bits/char, reference baselines."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from gru_lm.data import Corpus, eval_batches

LN2 = math.log(2)
MAX_REFERENCE_TARGET = 1_000_000  # the n-gram reference is pure Python: it scores at most 1M


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp(total NLL / total tokens), never a mean of per-batch perplexities."""
    return math.exp(nll_sum / num_tokens) if num_tokens else float("nan")


def bits_per_char(nll_sum: float, num_tokens: int) -> float:
    return nll_sum / num_tokens / LN2 if num_tokens else float("nan")


def unigram_perplexity(train: torch.Tensor, target: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of `target` under add-one smoothed unigram frequencies of `train`."""
    counts = token_counts(train, vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    nll = float((-logp * token_counts(target, vocab_size)).sum())
    return math.exp(nll / len(target)) if len(target) else float("nan")


def token_counts(tokens: torch.Tensor, vocab_size: int, chunk: int = 1 << 20) -> torch.Tensor:
    """How often each id occurs in `tokens` (any integer dtype), read in chunks."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for i in range(0, len(tokens), chunk):
        counts += torch.bincount(tokens[i:i + chunk].long(), minlength=vocab_size)[:vocab_size]
    return counts


def reference_baselines(train: torch.Tensor, target: torch.Tensor, vocab_size: int,
                        ngram_order: int = 5, ngram=None) -> dict[str, float]:
    """Uniform, unigram and Kneser-Ney n-gram perplexity of `target`, counted on `train`
    (`ngram`: the KneserNey model of `train` when the caller has built it already)."""
    from gru_lm.ngram import KneserNey

    ngram = ngram or KneserNey(train, vocab_size, ngram_order)
    nll, n = ngram.nll(target.tolist())
    # <unk> never occurs in a corpus built with its own vocabulary, so uniform is over v - 1.
    return {"uniform_ppl": float(vocab_size - 1),
            "unigram_ppl": unigram_perplexity(train, target, vocab_size),
            "ngram_order": ngram_order, "ngram_ppl": perplexity(nll, n)}


def corpus_baselines(corpus: Corpus, ngram_order: int = 5,
                     val: torch.Tensor | None = None) -> dict[str, float]:
    """reference_baselines on the val split (`val`: the part of it that is evaluated), or on
    the train split when there is none."""
    val = corpus.val if val is None else val
    target = val if len(val) > 1 else corpus.train[:MAX_REFERENCE_TARGET]
    return reference_baselines(corpus.train, target, len(corpus.vocab), ngram_order)


def time_major_loss(logits: torch.Tensor, Y: torch.Tensor, reduction: str = "mean",
                    ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy over every token, read in (num_steps, batch_size) order.

    The models compute time-major and hand back a transposed view, so reading it time-major
    costs no copy of the logits (only of the small target tensor).
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits.transpose(0, 1).reshape(-1, V).float(), Y.t().reshape(-1),
                           reduction=reduction, ignore_index=ignore_index)


def evaluate(model, tokens: torch.Tensor, batch_size: int, num_steps: int,
             device: torch.device, autocast=nullcontext) -> tuple[float, int]:
    """Total NLL (nats) and token count over a split, every token scored once."""
    logp = token_log_probs(model, tokens, batch_size, num_steps, device, autocast)
    return -float(logp.sum()), len(logp)


@torch.no_grad()
def token_log_probs(model, tokens: torch.Tensor, batch_size: int, num_steps: int,
                    device: torch.device | str = "cpu", autocast=nullcontext) -> torch.Tensor:
    """log P(tokens[j + 1] | tokens[:j + 1]) for every j, float64, in text order. The split
    is read as eval_batches' parallel streams with the state carried; the scores stay on
    `device` until the end, so a GPU is synchronised once, not per batch."""
    was_training = model.training
    model.eval()
    parts, state = [], None
    try:
        for X, Y in eval_batches(tokens, batch_size, num_steps):
            X, Y = X.to(device), Y.to(device)
            if state is None:
                state = model.begin_state(X.shape[0], device)
            with autocast():
                logits, state = model(X, state)
            logp = logits.float().log_softmax(-1).gather(-1, Y.clamp(min=0).unsqueeze(-1))
            parts.append(logp.squeeze(-1).double())  # (streams, window)
    finally:
        model.train(was_training)
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    # Stream b holds text positions b * L ... b * L + L - 1; the padded tail is cut off.
    return torch.cat(parts, dim=1).reshape(-1)[:len(tokens) - 1].cpu()


def mixture_weight(logp_a: torch.Tensor, logp_b: torch.Tensor, iterations: int = 100) -> float:
    """The weight w of b in w * P_b + (1 - w) * P_a that maximises the likelihood of the
    tokens (EM for a two-component mixture: each step cannot lower the likelihood)."""
    pa, pb = logp_a.exp(), logp_b.exp()
    w = 0.5
    for _ in range(iterations):
        share = w * pb / (w * pb + (1 - w) * pa)
        w_new = float(share.mean())
        if abs(w_new - w) < 1e-7:
            return w_new
        w = w_new
    return w


def mixture_log_probs(logp_a: torch.Tensor, logp_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * P_b + (1 - w) * P_a), computed without underflow."""
    if w <= 0:
        return logp_a
    if w >= 1:
        return logp_b
    return torch.logaddexp(logp_b + math.log(w), logp_a + math.log1p(-w))
