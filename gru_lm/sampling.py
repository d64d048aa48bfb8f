"""Continue a prefix: greedy (as the book) or sampled with temperature / top-k / top-p."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gru_lm.config import DataConfig, short
from gru_lm.data import Vocab, preprocess
from gru_lm.errors import GruLmError
from gru_lm.poems import PoemForm, PoemWriter
from gru_lm.script import OTHER as OTHER_SCRIPT
from gru_lm.utils import missing_reason

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
    # (compared in float32, as computed: 1e-6 itself is 9.99999997e-07 there)
    if temperature is not None and not (math.isfinite(_float32(temperature))
                                        and _float32(temperature) >= _float32(MIN_TEMPERATURE)):
        raise GruLmError(f"--temperature {temperature} is invalid; give a number from "
                         f"{MIN_TEMPERATURE:g} to 3.4e38 (or --greedy for greedy decoding)")
    if top_k is not None and top_k < 1:
        raise GruLmError(f"--top-k {top_k} is invalid; give an integer >= 1")
    if top_p is not None and not (math.isfinite(top_p) and 0 < _float32(top_p) <= 1):
        raise GruLmError(f"--top-p {top_p} is invalid; give a number in (0, 1] "
                         "(at least 1.5e-45, the smallest float32)")
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise GruLmError(f"--num-samples {num_samples} is out of range; give 1..{MAX_SAMPLES}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise GruLmError(f"--seed {seed} is out of range; give 0..{MAX_SEED}")


# Measured on configs/lstm.yaml's best checkpoint, 20 samples of 300 characters after "time
# traveller": greedy repeats itself (95% of its 20-character windows are repeats); at 0.6
# 98.3% of the words are the book's and 1.4% of the windows repeat; at 1.0 only 82% are words.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_SEED = 0


DEFAULT_CHARS = 50  # characters a continuation adds unless told otherwise


@dataclass(frozen=True)
class Sampling:
    """How to continue a prefix: temperature None is greedy (argmax, as the book)."""

    temperature: float | None
    seed: int | None
    note: str = ""  # the defaults that were taken, and how to change them
    skipped: int = 0  # prefix characters the corpus lacks, dropped (unknown="skip")
    num_chars: int = DEFAULT_CHARS
    poem: PoemForm | None = None  # a form the continuation takes (--form, --acrostic)


def sampling_settings(greedy: bool, temperature: float | None, top_k: int | None,
                      top_p: float | None, num_samples: int, seed: int | None) -> Sampling:
    """Sampled by default, at DEFAULT_TEMPERATURE and with DEFAULT_SEED, so the first sample a
    person sees reads well and repeats; --greedy is the book's argmax and takes no sampling
    option (N greedy samples would be N copies)."""
    if greedy:
        given = [flag for flag, v in (("--temperature", temperature), ("--top-k", top_k),
                                      ("--top-p", top_p), ("--seed", seed)) if v is not None]
        if num_samples > 1:
            given.append("--num-samples")
        if given:
            raise GruLmError(f"--greedy takes the most likely character every time, so "
                             f"{given[0]} means nothing with it; drop one of the two")
        return Sampling(None, None)
    taken = []
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
        taken.append(f"temperature {DEFAULT_TEMPERATURE} (--temperature T)")
    if seed is None:
        seed = DEFAULT_SEED
        taken.append(f"seed {DEFAULT_SEED} (--seed N for other samples)")
    note = f"sampled at {', '.join(taken)}; --greedy for the book's argmax" if taken else ""
    return Sampling(temperature, seed, note)


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
                raise GruLmError(f"--prefix-file {path} {missing_reason(path)}; give a text "
                                 "file or - for stdin")
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_PREFIX_CHARS + 1)
    except UnicodeDecodeError as e:
        raise GruLmError(f"--prefix-file {where}: not UTF-8 text (byte {e.start} of a "
                         "block); save it as UTF-8") from None
    if len(text) > MAX_PREFIX_CHARS:
        raise GruLmError(f"the prefix from {where} is over {MAX_PREFIX_CHARS:,} characters; "
                         "give its last part (it only primes the state)")
    return text.removeprefix("\ufeff").removesuffix("\n").removesuffix("\r")


def encode_prefix(prefix: str, vocab: Vocab, data: DataConfig, skip_unknown: bool = False,
                  what: str = "the prefix", skip_hint: bool = True) -> tuple[list[int], int]:
    """Preprocess a prefix like the run's corpus (`data`, its data section: preset, lowercase,
    script) and encode it: the ids, and how many characters outside the vocabulary were
    dropped (`skip_unknown`; else they are an error)."""
    check_prefix(prefix)
    tokens = preprocess(prefix, data.preset, data.lowercase, data.script)
    unknown = vocab.unknown(tokens)
    skipped = 0
    if unknown and skip_unknown:
        kept = [t for t in tokens if t in vocab.token_to_idx]
        skipped, tokens = len(tokens) - len(kept), kept
    elif unknown:
        raise GruLmError(unknown_message(what, unknown, vocab, data) +
                         ("; leave them out, or --unknown skip drops them" if skip_hint else
                          "; leave them out"))
    if not tokens:
        raise GruLmError(f"{what} {short(prefix)} is empty after the '{data.preset}' "
                         f"preprocessing{' and dropping unknown characters' if skipped else ''}"
                         "; give characters the corpus has")
    return vocab.encode(tokens), skipped


SHOWN_UNKNOWN = 8  # characters an error shows of those the vocabulary lacks
LISTED_VOCAB = 100  # a vocabulary this small is listed in full in the error


def unknown_message(what: str, unknown: list[str], vocab: Vocab, data: DataConfig) -> str:
    """One line: how many characters of `what` the vocabulary lacks, the first few, and what
    to write instead: the other script, when converting covers them (a simplified prefix on
    a model of traditional 全唐诗), or the vocabulary itself, when it is small."""
    from gru_lm.script import covering_script

    shown = "".join(unknown[:SHOWN_UNKNOWN]) + ("…" if len(unknown) > SHOWN_UNKNOWN else "")
    many = f"{len(unknown)} characters" if len(unknown) > 1 else "a character"
    size = f" ({len(vocab):,} tokens)" if len(vocab) > LISTED_VOCAB else ""
    line = f"{what} has {many} outside the vocabulary{size}: {short(shown)}"
    script, written = covering_script(unknown[:SHOWN_UNKNOWN], vocab.token_to_idx)
    if script:
        trained = ("its corpus as it is" if data.script == "as-is"
                   else f"data.script={data.script}")
        line += (f"; the run reads {script} characters ({trained}): write {short(written)}, "
                 f"or train with data.script={OTHER_SCRIPT[script]}")
    elif len(vocab) <= LISTED_VOCAB:
        line += f"; use only {short(''.join(vocab.idx_to_token[1:]), 200)}"
    return line


POEM_START = "\n"  # a poem asked for without a prefix starts a line, as poems do in the corpus


def poem_start(vocab: Vocab) -> list[int]:
    """What a poem without a prefix follows: a line break (in the chinese-poetry corpora,
    the end of the poem before)."""
    if POEM_START not in vocab.token_to_idx:
        raise GruLmError("this run's vocabulary has no line break to start a poem after; give "
                         "a prefix to continue, e.g. the poem's first characters")
    return [vocab.token_to_idx[POEM_START]]


def poem_writer(form: PoemForm | None, vocab: Vocab, data: DataConfig, num_samples: int
                ) -> PoemWriter | None:
    """A form bound to a run: its heads read like a prefix (the run's script), each one a
    token of the vocabulary (else one line naming the missing ones)."""
    if form is None:
        return None
    heads = "".join(preprocess(form.heads, data.preset, data.lowercase, data.script))
    missing = vocab.unknown(list(heads))
    if missing:
        raise GruLmError(unknown_message("--acrostic", missing, vocab, data) +
                         "; choose characters the run's corpus has")
    what = "--form" if form.name else "--acrostic"
    return PoemWriter(dataclasses.replace(form, heads=heads), vocab, num_samples, what,
                      data.preset)


def poem_context(prefix: str | None, vocab: Vocab, data: DataConfig, poem: PoemWriter,
                 skip_unknown: bool = False) -> tuple[list[int], int]:
    """The ids a poem is written after, and the prefix characters dropped: a line break
    without a prefix; else the prefix, whose last line begins the poem (a line break is
    added after it when that line is a whole poem already)."""
    if prefix is None or not prefix.strip():
        return poem_start(vocab), 0
    ids, skipped = encode_prefix(prefix, vocab, data, skip_unknown)
    if poem.begin(vocab.decode(ids).rpartition(POEM_START)[2]):
        ids = ids + poem_start(vocab)
    return ids, skipped


def _pick(logits: Tensor, temperature: float | None, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None, allowed: Tensor | None = None) -> Tensor:
    logits = logits.float().clone()
    if allowed is not None:  # a form's constraint: the distribution renormalised over these
        logits = logits.masked_fill(~allowed.to(logits.device), -math.inf)
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
             seed: int | None = None, device: torch.device | str = "cpu",
             poem: PoemWriter | None = None) -> list[list[int]]:
    """Warm the state up on the prefix, then emit `num_chars` tokens per sample (`poem`: as
    many as its form takes, each drawn among the tokens the form allows there)."""
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
        steps = num_chars if poem is None else poem.form.max_chars
        out = torch.empty(num_samples, steps, dtype=torch.long, device=device)
        ends = [steps] * num_samples  # where each sample's poem is complete
        for i in range(steps):
            allowed = None if poem is None else poem.allowed()  # (num_samples, vocab_size)
            nxt = _pick(logits[:, -1], temperature, top_k, top_p, generator, allowed)
            out[:, i] = nxt  # (num_samples,)
            if poem is not None:
                poem.advance(nxt.tolist())
                ends = [min(e, i + 1) if d else e for e, d in zip(ends, poem.done, strict=True)]
                if all(poem.done):
                    break
            logits, state = model(nxt.unsqueeze(1), state)
        return [row[:end] for row, end in zip(out.tolist(), ends, strict=True)]
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- prefixes that fit the text


# The book's prefixes, for The Time Machine; any other text gets prefixes from itself.
TIME_MACHINE_PREFIXES = ("time traveller", "traveller")
PREFIX_CHARS = 4  # a text without spaces between words (Chinese, Japanese): 4 characters


def run_prefixes(cfg, corpus) -> list[str]:
    """The prefixes a run samples from: train.sample_prefixes when set; else the book's two on
    The Time Machine, and on any other text (any preset, any language) the first words of
    its training split and of the training split's middle, so a Chinese text is never asked
    to continue "time traveller"."""
    if cfg.train.sample_prefixes is not None:
        return list(cfg.train.sample_prefixes)
    d = cfg.data
    if d.path is None and d.url is None and d.dataset == "timemachine":
        return list(TIME_MACHINE_PREFIXES)
    out: list[str] = []
    for start in (0, len(corpus.train) // 2):
        text = corpus.vocab.decode(corpus.train[start:start + 400].tolist())
        prefix = first_words(text, mid_text=start > 0)
        if prefix and prefix not in out and _fits(prefix, corpus.vocab, d):
            out.append(prefix)
    return out


def first_words(text: str, mid_text: bool = False) -> str:
    """The first two words of `text` (its first PREFIX_CHARS characters when it does not
    separate words by spaces); `mid_text`: the text starts inside a word or a line, so begin
    at the next line, or else the next space."""
    text = text.replace("\ufffd", " ")  # (bytes cut inside a character)
    if mid_text:
        cut = text.find("\n")
        cut = cut if 0 <= cut < len(text) // 2 else text.find(" ")
        text = text[cut + 1:] if cut >= 0 else text
    text = text.strip()
    words = text.split()
    if len(words) > 2 and all(len(w) <= 20 for w in words[:2]):
        return " ".join(words[:2])
    line = text.splitlines()[0].strip() if text else ""
    return line[:PREFIX_CHARS]


def _fits(prefix: str, vocab: Vocab, data) -> bool:
    try:
        encode_prefix(prefix, vocab, data)
    except GruLmError:  # (an <unk>'s name decoded into the text, say)
        return False
    return True
