"""Continue a prefix as a Decoding says: greedy (as the book), sampled with temperature /
top-k / top-p, or by beam search; repeated N-grams blocked on request."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gru_lm.config import DataConfig
from gru_lm.data import Vocab, preprocess
from gru_lm.decoding import Decoding
from gru_lm.errors import GruLmError
from gru_lm.poems import PoemForm, PoemWriter
from gru_lm.script import OTHER as OTHER_SCRIPT
from gru_lm.script import covering_script
from gru_lm.utils import missing_reason
from gru_lm.yamlconf import short

MAX_PREFIX_CHARS = 10_000_000
PREFIX_WINDOW = 4096  # prefix tokens read per forward call


def check_prefix(prefix: str) -> None:
    if not prefix or not prefix.strip():
        raise GruLmError("the prefix is empty; give some text to continue, e.g. "
                         "\"time traveller\"")


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


def _pick(logits: Tensor, d: Decoding, generator: torch.Generator | None,
          allowed: Tensor | None = None) -> Tensor:
    logits = logits.float().clone()
    if allowed is not None:  # a form's constraint, blocked repeats: renormalised over these
        logits = logits.masked_fill(~allowed.to(logits.device), -math.inf)
    logits[:, 0] = -math.inf  # never emit <unk>
    if d.temperature is None:
        return logits.argmax(dim=-1)
    logits = logits / d.temperature
    if d.top_k is not None and d.top_k < logits.shape[-1]:
        kth = torch.topk(logits, d.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if d.top_p is not None and d.top_p < 1:  # (the top token is always kept: never empty)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= d.top_p  # the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


class PersistentMap:
    """An immutable hash map whose `set` returns a new map that shares all but one path with
    the old one (a hash array mapped trie, like Clojure's maps): beam search hands every beam
    its parent's blocked N-grams without copying them, and adding one copies a few 32-slot
    nodes however many the map holds."""

    __slots__ = ("root",)

    def __init__(self, root: list | dict | None = None):
        self.root = root

    def get(self, key, default=None):
        node, h, depth = self.root, hash(key), 0
        while isinstance(node, list):  # an inner node: 32 children, by 5 bits of the hash
            node = node[(h >> (_BITS * depth)) & _MASK]
            depth += 1
        return default if node is None else node.get(key, default)

    def set(self, key, value) -> PersistentMap:
        return PersistentMap(_put(self.root, key, hash(key), value, 0))


_BITS, _MASK = 5, 31  # 32 children a node
_LEAF = 8  # keys a leaf holds before it splits
_MAX_DEPTH = 12  # 60 bits of the hash; a leaf that deep holds whatever collides there


def _put(node, key, h: int, value, depth: int):
    """`node` with key -> value, copying only the path down to the key's leaf."""
    if isinstance(node, list):
        i = (h >> (_BITS * depth)) & _MASK
        node = list(node)
        node[i] = _put(node[i], key, h, value, depth + 1)
        return node
    leaf = dict(node) if node else {}
    leaf[key] = value
    if len(leaf) <= _LEAF or depth >= _MAX_DEPTH:
        return leaf
    split: list = [None] * (_MASK + 1)
    for k, v in leaf.items():
        i = (hash(k) >> (_BITS * depth)) & _MASK
        split[i] = {**(split[i] or {}), k: v}
    return split


class NoRepeat:
    """Blocks every token that would complete an N-gram already written: the N-grams of
    each row's tail of the prefix (its last N-1 tokens) and continuation so far. A row whose
    every token is blocked is left free (a character must follow). The work of a step does
    not grow with the text: a row keeps its last N-1 tokens and a PersistentMap from each
    N-1 tokens written to the tokens that followed them, which beams share with their
    parents instead of copying."""

    def __init__(self, n: int, prefix_ids: list[int], rows: int, vocab_size: int):
        self.n, self.vocab_size = n, vocab_size
        # (the prefix's tail alone holds no whole N-gram: only N-grams that end in the
        # continuation are counted, those across the seam included)
        self.tails: list[tuple[int, ...]] = [tuple(prefix_ids[-(n - 1):])] * rows
        self.seen: list[PersistentMap] = [PersistentMap()] * rows

    def allowed(self) -> Tensor:
        out = torch.ones(len(self.tails), self.vocab_size, dtype=torch.bool)
        for r, (tail, seen) in enumerate(zip(self.tails, self.seen, strict=True)):
            blocked = seen.get(tail) if len(tail) == self.n - 1 else None
            if blocked and len(blocked) < self.vocab_size - 1:  # (<unk> is never emitted)
                out[r, list(blocked)] = False
        return out

    def advance(self, tokens: list[int], parents: list[int] | None = None) -> None:
        """Each row writes its token (`parents`: row r continues row parents[r] first, as
        beams do)."""
        if parents is not None:
            self.tails = [self.tails[p] for p in parents]
            self.seen = [self.seen[p] for p in parents]
        for r, t in enumerate(tokens):
            tail, seen = self.tails[r], self.seen[r]
            if len(tail) == self.n - 1:
                self.seen[r] = seen.set(tail, seen.get(tail, frozenset()) | {t})
            self.tails[r] = (*tail, t)[-(self.n - 1):]


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a & b


@torch.no_grad()
def _read_prefix(model, prefix_ids: list[int], device) -> tuple[Tensor, object]:
    """The state after the prefix and the logits of the token after it, (1, vocab_size). The
    prefix is read in windows (a prefix of millions of characters needs no more memory than
    a short one)."""
    prefix = torch.tensor(prefix_ids, device=device)
    state = model.begin_state(1, device)
    for i in range(0, len(prefix), PREFIX_WINDOW):
        logits, state = model(prefix[i:i + PREFIX_WINDOW].unsqueeze(0), state)
    return logits[:, -1], state


def _select(state, rows: Tensor):
    """The state of the given rows (batch is dim 1), in that order: copies of the prefix's
    final state for every sample, or the parents' of the beams kept."""
    return tuple(s.index_select(1, rows) for s in state) if isinstance(state, tuple) \
        else state.index_select(1, rows)


class TimedOut(GruLmError):
    """A continuation ran past its deadline (the server's request timeout)."""


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimedOut("the continuation took longer than the time allowed; ask for fewer "
                       "characters or samples")


def generate(model, prefix_ids: list[int], decoding: Decoding, *,
             device: torch.device | str = "cpu", poem: PoemWriter | None = None,
             deadline: float | None = None) -> list[list[int]]:
    """Warm the state up on the prefix, then emit decoding.num_chars tokens per sample
    (`poem`: as many as its form takes, each drawn among the tokens the form allows there).
    A beam search (decoding.beam) gives its beams, best first (beam_search has their
    scores). `deadline`: a time.monotonic() past which it stops with TimedOut."""
    if decoding.beam is not None:
        return [b.ids for b in beam_search(model, prefix_ids, decoding, device=device,
                                           deadline=deadline)]
    outs: list[list[int]] = [[] for _ in range(decoding.num_samples)]
    for step in draw(model, prefix_ids, decoding, device=device, poem=poem,
                     deadline=deadline):
        for out, t in zip(outs, step, strict=True):
            if t is not None:
                out.append(t)
    return outs


def draw(model, prefix_ids: list[int], decoding: Decoding, *,
         device: torch.device | str = "cpu", poem: PoemWriter | None = None,
         deadline: float | None = None) -> Iterator[list[int | None]]:
    """generate, a step at a time: each step's token for every sample (None: that sample's
    poem is complete), as they are drawn (the server streams them)."""
    was_training = model.training
    model.eval()
    n = decoding.num_samples
    generator = torch.Generator().manual_seed(decoding.seed) \
        if decoding.seed is not None and decoding.sampled else None
    try:
        with torch.no_grad():
            last, state = _read_prefix(model, prefix_ids, device)
            logits = last.expand(n, -1)  # (num_samples, vocab_size)
            state = _select(state, torch.zeros(n, dtype=torch.long, device=device))
        steps = decoding.num_chars if poem is None else poem.form.max_chars
        blocker = None if decoding.no_repeat is None else \
            NoRepeat(decoding.no_repeat, prefix_ids, n, logits.shape[-1])
        done = [False] * n
        for _ in range(steps):
            _check_deadline(deadline)
            allowed = _both(None if poem is None else poem.allowed(),  # (n, vocab_size)
                            None if blocker is None else blocker.allowed())
            nxt = _pick(logits, decoding, generator, allowed)
            tokens = nxt.tolist()
            yield [None if d else t for d, t in zip(done, tokens, strict=True)]
            if blocker is not None:
                blocker.advance(tokens)
            if poem is not None:
                poem.advance(tokens)
                done = list(poem.done)
                if all(done):
                    break
            with torch.no_grad():
                step_logits, state = model(nxt.unsqueeze(1), state)
            logits = step_logits[:, -1]
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Beam:
    """A continuation found by beam search: its tokens, and their log-probability under the
    model (natural log, temperature 1, summed over the tokens)."""

    ids: list[int]
    log_prob: float

    @property
    def log_loss(self) -> float:
        """The mean per-token log-loss (nats); exp() of it is the continuation's perplexity."""
        return -self.log_prob / max(len(self.ids), 1)


@torch.no_grad()
def beam_search(model, prefix_ids: list[int], decoding: Decoding, *,
                device: torch.device | str = "cpu", deadline: float | None = None
                ) -> list[Beam]:
    """The decoding.beam most likely continuations of decoding.num_chars tokens (as far as a
    beam of that width finds them), best first, all distinct: at each step every kept beam
    is extended by every token, and the best `beam` of those are kept (<unk> never; an
    N-gram written twice never, with decoding.no_repeat). Width 1 is greedy decoding."""
    assert decoding.beam is not None
    was_training = model.training
    model.eval()
    try:
        last, state = _read_prefix(model, prefix_ids, device)
        V = last.shape[-1]
        if decoding.beam > V - 1:
            raise GruLmError(f"--beam {decoding.beam} is more than this run's vocabulary "
                             f"offers ({V - 1:,} characters); give at most {V - 1}")
        scores = torch.zeros(1, device=device)  # (beams,) log-probabilities so far
        # Each step's (parents, tokens), (beams,) each: the beams are read back from the last
        # step at the end, so a step's work does not grow with the text written.
        steps: list[tuple[Tensor, Tensor]] = []
        blocker = None if decoding.no_repeat is None else \
            NoRepeat(decoding.no_repeat, prefix_ids, 1, V)
        logits = last
        for _ in range(decoding.num_chars):
            _check_deadline(deadline)
            logp = logits.float().log_softmax(-1)  # (beams, V)
            logp[:, 0] = -math.inf  # never <unk>
            if blocker is not None:
                logp = logp.masked_fill(~blocker.allowed().to(logp.device), -math.inf)
            total = (scores.unsqueeze(1) + logp).flatten()  # (beams * V,)
            keep = min(decoding.beam, int(torch.isfinite(total).sum()))
            top, flat = torch.topk(total, keep)
            parents, tokens = flat // V, flat % V
            scores = top
            steps.append((parents, tokens))
            if blocker is not None:
                blocker.advance(tokens.tolist(), parents.tolist())
            step_logits, state = model(tokens.unsqueeze(1), _select(state, parents))
            logits = step_logits[:, -1]
        rows, columns = torch.arange(len(scores), device=device), []
        for parents, tokens in reversed(steps):
            columns.append(tokens[rows])
            rows = parents[rows]
        seqs = torch.stack(columns[::-1], dim=1)  # (beams, num_chars)
        return [Beam(ids, float(s)) for ids, s in zip(seqs.tolist(), scores.tolist(),
                                                      strict=True)]
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
