"""Continue a prefix: greedy (as the book) or sampled with temperature / top-k / top-p."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from gru_lm.config import short
from gru_lm.data import Vocab, preprocess
from gru_lm.errors import GruLmError

MAX_CHARS = 10_000
MAX_SAMPLES = 1_000
MAX_PREFIX_CHARS = 10_000_000
PREFIX_WINDOW = 4096  # prefix tokens read per forward call
# Below this, logits / temperature overflow float32 and the softmax is NaN; sampling that
# cold is greedy decoding anyway.
MIN_TEMPERATURE = 1e-6


def check_prefix(prefix: str) -> None:
    if not prefix or not prefix.strip():
        raise GruLmError("the prefix is empty; give some text to continue, e.g. "
                         "\"time traveller\"")


def _float32(x: float) -> float:
    """The value the model computes with: 1e-50 is 0 and 1e39 is inf in float32."""
    return float(torch.tensor(x, dtype=torch.float32))


def check_sampling_args(num_chars: int, temperature: float | None, top_k: int | None,
                        top_p: float | None, num_samples: int, seed: int | None = None) -> None:
    """Validate generation arguments before any model is loaded."""
    from gru_lm.config import MAX_SEED

    if not 1 <= num_chars <= MAX_CHARS:
        raise GruLmError(f"--num-chars {num_chars} is out of range; give 1..{MAX_CHARS}")
    if temperature is not None and not (math.isfinite(_float32(temperature))
                                        and _float32(temperature) >= MIN_TEMPERATURE):
        raise GruLmError(f"--temperature {temperature} is invalid; give a number from "
                         f"{MIN_TEMPERATURE:g} to 3.4e38 (omit it for greedy decoding)")
    if top_k is not None and top_k < 1:
        raise GruLmError(f"--top-k {top_k} is invalid; give an integer >= 1")
    if top_p is not None and not (math.isfinite(top_p) and 0 < _float32(top_p) <= 1):
        raise GruLmError(f"--top-p {top_p} is invalid; give a number in (0, 1] "
                         "(at least 1.5e-45, the smallest float32)")
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise GruLmError(f"--num-samples {num_samples} is out of range; give 1..{MAX_SAMPLES}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise GruLmError(f"--seed {seed} is out of range; give 0..{MAX_SEED}")


def sampling_temperature(temperature: float | None, top_k: int | None, top_p: float | None,
                         num_samples: int, seed: int | None) -> float | None:
    """None (greedy, as the book) unless an option asks for sampling: --temperature, --top-k,
    --top-p, --seed or more than one sample, each of which means nothing to greedy decoding
    (N greedy samples are N copies). Sampling without --temperature uses 1.0."""
    if temperature is not None:
        return temperature
    wants_sampling = (top_k is not None or top_p is not None or seed is not None
                      or num_samples > 1)
    return 1.0 if wants_sampling else None


def read_prefix_file(path: Path | str, stdin=None) -> str:
    """The text of --prefix-file (`-` reads stdin; pipes such as `<(cmd)` work too), with
    one trailing newline dropped."""
    import sys

    try:
        if str(path) == "-":
            where, text = "stdin", (stdin or sys.stdin).read(MAX_PREFIX_CHARS + 1)
        else:
            path = Path(path)
            where = str(path)
            if path.is_dir():
                raise GruLmError(f"--prefix-file {path} is a directory; give a text file")
            if not path.exists():
                raise GruLmError(f"--prefix-file {path} does not exist; give a text file or - "
                                 "for stdin")
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_PREFIX_CHARS + 1)
    except UnicodeDecodeError as e:
        raise GruLmError(f"--prefix-file {where}: not UTF-8 text (byte {e.start} of a "
                         "block); save it as UTF-8") from None
    if len(text) > MAX_PREFIX_CHARS:
        raise GruLmError(f"the prefix from {where} is over {MAX_PREFIX_CHARS:,} characters; "
                         "give its last part (it only primes the state)")
    return text.removesuffix("\n").removesuffix("\r")


def encode_prefix(prefix: str, vocab: Vocab, preset: str, lowercase: bool) -> list[int]:
    """Preprocess a prefix like the run's corpus and encode it; unknown characters are errors."""
    check_prefix(prefix)
    tokens = preprocess(prefix, preset, lowercase)
    if not tokens:
        raise GruLmError(f"the prefix {short(prefix)} is empty after the '{preset}' preprocessing; "
                         "give letters")
    unknown = vocab.unknown(tokens)
    if unknown:
        raise GruLmError(f"the prefix has characters outside the vocabulary: "
                         f"{short(''.join(unknown))}; use only "
                         f"{short(''.join(vocab.idx_to_token[1:]), 200)}")
    return vocab.encode(tokens)


def _pick(logits: Tensor, temperature: float | None, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> Tensor:
    logits = logits.float().clone()
    logits[:, 0] = -math.inf  # never emit <unk>
    if temperature is None and top_k is None and top_p is None:
        return logits.argmax(dim=-1)
    logits = logits / (temperature or 1.0)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:  # (the top token is always kept: never an empty set)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, prefix_ids: list[int], num_chars: int, *, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, num_samples: int = 1,
             seed: int | None = None, device: torch.device | str = "cpu") -> list[list[int]]:
    """Warm the state up on the prefix, then emit `num_chars` tokens per sample."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    try:
        # The prefix is read once, in windows (a prefix of millions of characters needs no
        # more memory than a short one), and its final state copied to every sample.
        prefix = torch.tensor(prefix_ids, device=device)
        state = model.begin_state(1, device)
        for i in range(0, len(prefix), PREFIX_WINDOW):
            logits, state = model(prefix[i:i + PREFIX_WINDOW].unsqueeze(0), state)
        logits = logits[:, -1:].expand(num_samples, 1, -1)  # (num_samples, 1, vocab_size)
        state = tuple(s.repeat(1, num_samples, 1) for s in state) if isinstance(state, tuple) \
            else state.repeat(1, num_samples, 1)  # (num_layers, num_samples, num_hiddens)
        out = torch.empty(num_samples, num_chars, dtype=torch.long, device=device)
        for i in range(num_chars):
            nxt = _pick(logits[:, -1], temperature, top_k, top_p, generator)  # (num_samples,)
            out[:, i] = nxt
            logits, state = model(nxt.unsqueeze(1), state)
        return out.tolist()
    finally:
        model.train(was_training)
