"""Corpus -> tokens -> vocabulary -> splits -> batched windows (d2l's two samplers)."""

from __future__ import annotations

import collections
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gru_lm.download import Collection, DatasetSpec, fetch, get_dataset
from gru_lm.errors import DataError
from gru_lm.script import OTHER, convert, covering_script
from gru_lm.tokenstore import Stats, open_store, token_pieces
from gru_lm.utils import missing_reason

if TYPE_CHECKING:
    import torch

    from gru_lm.config import DataConfig

UNK = "<unk>"
_NON_LETTERS = re.compile(r"[^A-Za-z]+")


def preprocess(text: str, preset: str = "d2l", lowercase: bool = False,
               script: str = "as-is") -> list[str]:
    """Turn raw text into a list of character tokens (`script`: Chinese characters converted,
    raw and bytes presets)."""
    if preset == "d2l":
        # As the book: per line, non-letters -> one space, strip, lowercase, no separator.
        lines = (_NON_LETTERS.sub(" ", line).strip().lower() for line in text.split("\n"))
        return list("".join(lines))
    if preset == "raw":
        text = convert(unicodedata.normalize("NFC", text), script)
        return list(text.lower() if lowercase else text)
    if preset == "bytes":  # one token a UTF-8 byte, written as the latin-1 character of it
        return list(convert(text, script).encode("utf-8").decode("latin-1"))
    raise DataError(f"unknown preprocessing preset '{preset}'; choose d2l, raw or bytes")


def describe_preset(non_letters: int, non_ascii: int, spaces: int, capitals: int) -> str:
    """What the d2l preset did to a text, from its counts (said once per run, so a user
    whose text is not English prose sees it and can switch to the raw preset)."""
    what = "digits, punctuation, line breaks"
    if non_ascii:
        what += f", {non_ascii:,} non-ASCII characters such as accented letters"
    return (f"the d2l preset turned {non_letters:,} non-letters ({what}) into {spaces:,} "
            f"spaces, dropping {non_letters - spaces:,}, and lowercased "
            f"{capitals:,} capitals; data.preset=raw keeps the text as it is")


class Vocab:
    """Token <-> index map: <unk> at 0, reserved tokens, then by frequency (ties A-Z)."""

    has_unk = True  # id 0 is <unk>

    def __init__(self, tokens: list[str] | None = None, min_freq: int = 0,
                 reserved_tokens: list[str] | None = None,
                 counts: dict[str, int] | None = None):
        counter = collections.Counter(tokens or []) if counts is None else counts
        self.token_freqs = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        specials = [UNK] + [t for t in (reserved_tokens or []) if t != UNK]
        self.idx_to_token = list(dict.fromkeys(
            specials + [t for t, f in self.token_freqs if f >= min_freq and t not in specials]
        ))
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}

    def __len__(self) -> int:
        return len(self.idx_to_token)

    @classmethod
    def from_counts(cls, counts: dict[str, int], min_freq: int = 0,
                    reserved_tokens: list[str] | None = None) -> Vocab:
        """The vocabulary of a text whose token counts are `counts`."""
        return cls(min_freq=min_freq, reserved_tokens=reserved_tokens, counts=counts)

    @property
    def unk(self) -> int:
        return 0

    def encode(self, tokens: list[str] | str) -> list[int]:
        return [self.token_to_idx.get(t, 0) for t in tokens]

    def decode(self, indices) -> str:
        return "".join(self.idx_to_token[int(i)] for i in indices)

    def unk_counts(self) -> tuple[int, int]:
        """How many distinct tokens of the text the vocabulary was built from map to <unk>
        (rarer than data.min_freq), and how many of the text's tokens that makes."""
        dropped = [f for t, f in self.token_freqs if t not in self.token_to_idx]
        return len(dropped), sum(dropped)

    def token_freq(self, token: str) -> int:
        """How often `token` occurs in the text the vocabulary was built from."""
        return dict(self.token_freqs).get(token, 0)

    def unknown(self, tokens: list[str] | str) -> list[str]:
        """The distinct tokens of `tokens` not in the vocabulary, in order of appearance."""
        return list(dict.fromkeys(t for t in tokens if t not in self.token_to_idx))

    def to_dict(self) -> dict:
        return {"idx_to_token": list(self.idx_to_token)}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        tokens = d.get("idx_to_token") if isinstance(d, dict) else None
        if (not isinstance(tokens, list) or not tokens or tokens[0] != UNK
                or not all(isinstance(t, str) for t in tokens) or len(set(tokens)) != len(tokens)):
            raise DataError("vocabulary is malformed: expected {'idx_to_token': ['<unk>', ...]} "
                            "with unique string tokens")
        v = cls()
        v.idx_to_token = list(tokens)
        v.token_to_idx = {t: i for i, t in enumerate(tokens)}
        return v


class ByteVocab(Vocab):
    """The bytes preset's vocabulary: the 256 byte values, id = byte, the same for every text
    (so any text, any prefix and any later corpus fit one model). Tokens are written as the
    latin-1 character of their byte; decode() turns ids back into UTF-8 text, showing an
    invalid sequence as U+FFFD and holding back a character cut at the end."""

    kind = "bytes"
    has_unk = False  # id 0 is the byte 0

    def __init__(self, counts: dict[str, int] | None = None):
        super().__init__(counts=counts or {})
        self.idx_to_token = [chr(b) for b in range(256)]
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}

    @classmethod
    def from_counts(cls, counts: dict[str, int], min_freq: int = 0,
                    reserved_tokens: list[str] | None = None) -> ByteVocab:
        return cls(counts)

    def decode(self, indices) -> str:
        import codecs

        data = bytes(int(i) for i in indices)
        return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind}


def vocab_from_dict(d: dict) -> Vocab:
    """The vocabulary a checkpoint or vocab.json describes."""
    if isinstance(d, dict) and d.get("kind") == ByteVocab.kind:
        if set(d) != {"kind"}:
            raise DataError("vocabulary is malformed: a byte vocabulary is {'kind': 'bytes'}")
        return ByteVocab()
    return Vocab.from_dict(d)


def char_ends(ids) -> list[int]:
    """The positions of the bytes that end a UTF-8 character (the next byte does not continue
    it): where a byte-level model has read a whole character."""
    import numpy as np

    a = np.asarray(ids, dtype=np.int64)
    continues = (a & 0xC0) == 0x80  # a continuation byte of the character before it
    return np.flatnonzero(~np.append(continues[1:], False)).tolist() if len(a) else []


@dataclass
class Corpus:
    """A tokenized corpus and its contiguous splits: 1-D tensors of token ids, views of the
    memory-mapped token store (uint8, or uint16 for a vocabulary of more than 256)."""

    vocab: Vocab
    raw_chars: int
    source: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    note: str = ""  # what the preprocessing changed (describe_preset)
    store: str = ""  # the token store's file
    store_reused: bool = False
    store_note: str = ""  # why an existing token store was prepared again
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)

    def fingerprint(self) -> str:
        """SHA-256 of the token ids of each split (as int64, read in chunks): changes with the
        file, the preprocessing, data.max_tokens or the split, so a resume can tell it is
        reading other data. Computed once: the nodes' check, the resume's check and the
        first checkpoint all ask for it."""
        import hashlib

        import torch

        if self._fingerprint is None:
            h = hashlib.sha256()
            for split in (self.train, self.val, self.test):
                h.update(len(split).to_bytes(8, "little"))
                for i in range(0, len(split), FINGERPRINT_CHUNK):
                    h.update(split[i:i + FINGERPRINT_CHUNK].to(torch.int64).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


FINGERPRINT_CHUNK = 1 << 20


def corpus_path(cfg: DataConfig, offline: bool | None = None, progress: bool = True) -> Path:
    """Resolve the configured corpus to a local, verified file."""
    if cfg.path is not None:
        if not cfg.path.is_file():
            raise DataError(f"data.path {cfg.path} is not a file; point it at a UTF-8 text file")
        return cfg.path
    spec: DatasetSpec | Collection
    if cfg.url is not None:
        name = Path(cfg.url.split("?")[0]).name or "corpus.txt"
        spec = DatasetSpec(name=name, url=cfg.url, sha1=cfg.sha1 or "", filename=name)
    elif cfg.dataset is not None:
        spec = get_dataset(cfg.dataset)
    else:
        raise DataError("no corpus configured: set data.dataset, data.path or data.url")
    return fetch(spec, cfg.cache_dir, offline=offline, progress=progress)


def read_text(path: Path) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read corpus {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # (a byte-order mark is not text)
    except UnicodeDecodeError as e:
        raise DataError(f"corpus {path} is not UTF-8 (byte {e.start}); convert it with "
                        "`iconv -t utf-8`") from None
    if not text.strip():
        raise DataError(f"corpus {path} is empty; give a file with text in it")
    return text


MAX_TEXT_BYTES = 1 << 30  # evaluate --text: 1 GiB, read from a file, a device or a pipe


def encode_file(path: Path, cfg: DataConfig, vocab: Vocab, what: str = "--text"
                ) -> tuple[torch.Tensor, int, str]:
    """A text file preprocessed as the run's corpus and encoded with its vocabulary, streamed
    (ids as uint8, uint16 or int32: no list of characters); how many of its tokens are
    outside the vocabulary (encoded as <unk>); and a note: what the d2l preset changed, as
    `train` and `data info` say it of a corpus, and, when the other Chinese script would
    have covered the unknown characters, that ("" when there is nothing to say)."""
    import numpy as np
    import torch

    if Path(path).is_dir():
        raise DataError(f"{what} {path} is a directory; give a text file")
    if not Path(path).exists():
        raise DataError(f"{what} {path} {missing_reason(path)}; give a text file")
    dtype = np.uint8 if len(vocab) <= 256 else np.uint16 if len(vocab) <= 65536 else np.int32
    lut = np.zeros(0x110000, dtype=dtype)  # code point -> id; unknown -> <unk> (0)
    known = np.zeros(0x110000, dtype=bool)
    for token, idx in vocab.token_to_idx.items():
        if len(token) == 1:
            lut[ord(token)], known[ord(token)] = idx, True
    parts, unknown, spaces, stats = [], 0, 0, Stats()
    strangers: set[int] = set()  # the distinct code points outside the vocabulary
    for piece in token_pieces(Path(path), cfg.preset, cfg.lowercase, stats,
                              limit=MAX_TEXT_BYTES, what=what, script=cfg.script):
        parts.append(lut[piece])
        outside = ~known[piece]
        unknown += int(outside.sum())
        if len(strangers) < 64:
            strangers.update(np.unique(piece[outside])[:64].tolist())
        spaces += int(np.count_nonzero(piece == 32))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype)
    note = "" if cfg.preset != "d2l" else (
        f"{what} {path}: {stats.raw_chars:,} characters became {len(ids):,} tokens; "
        + describe_preset(stats.non_letters, stats.non_ascii, spaces, stats.capitals))
    script, _ = covering_script([chr(c) for c in sorted(strangers)], vocab.token_to_idx,
                                share=0.5) if strangers and cfg.preset == "raw" else ("", "")
    if script:
        note = (f"{what} {path} has characters this run does not know in their "
                f"{OTHER[script]} form but does in their {script} one (the run reads its "
                f"corpus{'' if cfg.script == 'as-is' else ' in ' + cfg.script}): convert the "
                f"text to {script} characters for a fair score")
    return torch.from_numpy(ids), unknown, note


def load_corpus(cfg: DataConfig, vocab: Vocab | None = None, offline: bool | None = None,
                progress: bool = True) -> Corpus:
    """Load the configured corpus through its token store (prepared on first use), split it,
    and re-map its ids when `vocab` (a run's vocabulary) is given and differs."""
    import numpy as np
    import torch

    path = corpus_path(cfg, offline=offline, progress=progress)
    builder = ByteVocab.from_counts if cfg.preset == "bytes" else Vocab.from_counts
    store = open_store(path, cfg, cfg.cache_dir, builder)
    stored = store.ids
    if vocab is not None and vocab.idx_to_token != store.vocab.idx_to_token:
        remap = np.array([vocab.token_to_idx.get(t, 0) for t in store.vocab.idx_to_token],
                         dtype=np.uint8 if len(vocab) <= 256 else np.int32)
        stored = remap[stored]
    vocab = vocab or store.vocab
    ids = torch.from_numpy(stored)  # (num_tokens,)
    n = len(ids)
    n_train = int(n * cfg.train_fraction)
    n_val = int(n * cfg.val_fraction)
    n_test = int(n * cfg.test_fraction)
    s = store.stats
    note = "" if cfg.preset != "d2l" else describe_preset(
        s.non_letters, s.non_ascii, store.vocab.token_freq(" "), s.capitals)
    return Corpus(vocab=vocab, raw_chars=s.raw_chars, source=str(path),
                  train=ids[:n_train], val=ids[n_train:n_train + n_val],
                  test=ids[n_train + n_val:n_train + n_val + n_test],
                  note=note, store=str(store.path), store_reused=store.reused,
                  store_note=store.note)


class BatchLoader:
    """d2l's random sampling and sequential partitioning, with its own generator.

    Sequential partitioning (batch_size=2, num_steps=3, offset o):

        corpus[o:] -> stream 0: a b c | d e f | ...      X of batch 0 = [[a b c],
                      stream 1: m n o | p q r | ...                       [m n o]]
    Batch i+1 continues each stream where batch i stopped, so the state can be carried.
    Random sampling cuts non-overlapping windows at a random offset and shuffles them.

    With `part=(rank, world)` (distributed training) the loader cuts the batches of
    `world * batch_size` sequences that one process would use, and this rank takes rows
    `rank * batch_size ...` of each: its own contiguous streams, or its share of the windows.
    Batches are cut when asked for, so an epoch costs no copy of the corpus.
    """
    def __init__(self, tokens: torch.Tensor, batch_size: int, num_steps: int,
                 sampler: str = "sequential", seed: int = 0, split: str = "train",
                 part: tuple[int, int] = (0, 1)):
        import torch

        self.tokens = tokens
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.sampler = sampler
        self.rank, self.world = part
        self.generator = torch.Generator().manual_seed(seed)
        # The smallest offset must still leave one full batch.
        total = batch_size * self.world
        needed = total * num_steps + 1
        if len(tokens) < needed + (num_steps - 1):
            ranks = f" x {self.world} processes" if self.world > 1 else ""
            raise DataError(
                f"the {split} split has {len(tokens)} tokens, too few for one batch of "
                f"train.batch_size={batch_size}{ranks} x train.num_steps={num_steps} (needs "
                f"{needed + num_steps - 1}); lower batch_size or num_steps, or use more data"
            )

    @property
    def carries_state(self) -> bool:
        return self.sampler == "sequential"

    def num_batches(self) -> int:
        """Batches per epoch (for the largest offset, so it is the same every epoch)."""
        usable = len(self.tokens) - (self.num_steps - 1) - 1
        total = self.batch_size * self.world
        if self.sampler == "random":
            return (usable // self.num_steps) // total
        return (usable // total) // self.num_steps

    def epoch(self) -> Epoch:
        """The batches of one epoch (draws the epoch's offset and, random, its order)."""
        import torch

        g, T = self.generator, self.num_steps
        total = self.batch_size * self.world
        nb = self.num_batches()
        offset = int(torch.randint(0, T, (1,), generator=g))
        if self.sampler == "random":
            num_windows = (len(self.tokens) - offset - 1) // T
            starts = torch.randperm(num_windows, generator=g)[: nb * total] * T + offset
        else:  # stream b starts at offset + b * nb * T; batch i reads i * T further on
            starts = offset + torch.arange(total) * (nb * T)
        return Epoch(self, starts.view(-1 if self.sampler == "random" else 1, total), nb)


class Cursor:
    """Training's place in the batches, resumable: the epoch being read (its offset and order
    drawn from the loader's generator) and the generator's state when that epoch was drawn,
    which is what a checkpoint stores so a resume draws the same epoch again."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader
        self.batches: Epoch | None = None
        self.drawn_from: torch.Tensor | None = None  # the generator's state before the draw

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `i` of the current epoch (drawing the epoch first when none is open)."""
        if self.batches is None:
            self.drawn_from = self.loader.generator.get_state()
            self.batches = self.loader.epoch()
        return self.batches.batch(i)

    def epoch_ends(self, next_batch: int) -> bool:
        """Whether `next_batch` is past the current epoch (which is then closed)."""
        if self.batches is not None and next_batch < len(self.batches):
            return False
        self.batches = None
        return True

    def state(self) -> torch.Tensor:
        """What a checkpoint stores: the generator as it was before the open epoch."""
        if self.batches is not None and self.drawn_from is not None:
            return self.drawn_from
        return self.loader.generator.get_state()

    def restore(self, state: torch.Tensor, batch_in_epoch: int) -> None:
        self.loader.generator.set_state(state)
        self.batches = None
        if batch_in_epoch:  # mid-epoch: draw that epoch again
            self.batch(batch_in_epoch)


class Epoch:
    """One epoch's batches: batch(i) -> X, Y of shape (batch_size, num_steps), int64."""

    def __init__(self, loader: BatchLoader, starts: torch.Tensor, num_batches: int):
        self.loader, self.starts, self.num_batches = loader, starts, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        ld = self.loader
        B, T = ld.batch_size, ld.num_steps
        if ld.sampler == "random":
            row = self.starts[i]
        else:
            row = self.starts[0] + i * T
        first = row[ld.rank * B:(ld.rank + 1) * B]  # (batch_size,)
        idx = first.unsqueeze(1) + torch.arange(T)  # (batch_size, num_steps)
        return ld.tokens[idx].long(), ld.tokens[idx + 1].long()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every batch at once: X, Y of shape (num_batches, batch_size, num_steps)."""
        import torch

        pairs = [self.batch(i) for i in range(len(self))]
        return (torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs]))


def eval_batches(tokens: torch.Tensor, batch_size: int, num_steps: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Score every token of a split exactly once, in order, with state carried.

    The split is cut into `batch_size` contiguous streams of equal length L; the tail of the
    last stream is padded with target -100 (ignored by the loss). Batches are cut as they
    are read: X, Y of shape (streams, num_steps), int64.
    """
    import torch

    n = len(tokens) - 1
    if n < 1:
        return
    B = max(1, min(batch_size, n))
    L = -(-n // B)  # ceil
    base = torch.arange(B).unsqueeze(1) * L  # (streams, 1): where each stream starts
    for i in range(0, L, num_steps):
        pos = base + torch.arange(i, min(i + num_steps, L))  # (streams, window)
        inside = pos < n
        pos = pos.clamp(max=n - 1)
        X = torch.where(inside, tokens[pos].long(), 0)
        Y = torch.where(inside, tokens[pos + 1].long(), -100)
        yield X, Y
