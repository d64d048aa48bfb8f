"""The corpus tokenized once, streaming, into a file of uint8/uint16 ids that training maps.

nanoGPT's prepare.py + np.memmap pattern: the text is read in blocks of a few MiB, so neither
the whole text nor a Python list of its characters is ever held. Two passes: the first counts
the characters (the vocabulary is ordered by frequency, so it needs the whole count), the
second writes the ids. The store sits in `data.cache_dir/tokens/` as NAME-KEY.bin (the ids)
and NAME-KEY.json (vocabulary, counts, statistics); KEY hashes the source file's bytes and
every setting that changes the ids, so a changed file or setting gets a new store and an
unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gru_lm.errors import DataError
from gru_lm.script import convert
from gru_lm.utils import atomic_write_text, atomic_writer, file_digest

if TYPE_CHECKING:
    from gru_lm.config import DataConfig

VERSION = 1
BLOCK_BYTES = 4 << 20
MAX_VOCAB = 1 << 16  # ids are stored as uint16 at most


@dataclass
class Stats:
    """What the preprocessing saw and did (describe_preset's figures), counted while
    streaming."""

    raw_chars: int = 0
    non_letters: int = 0
    non_ascii: int = 0
    capitals: int = 0
    has_text: bool = False  # anything but whitespace

    def add(self, block: bytes) -> None:
        """Count one block of the raw UTF-8 text (counted on its bytes: a character is a
        byte that does not continue a multi-byte sequence)."""
        b = np.frombuffer(block, dtype=np.uint8)
        chars = len(b) - int(np.count_nonzero((b & 0xC0) == 0x80))
        folded = b | 32
        letters = int(np.count_nonzero((folded >= 97) & (folded <= 122) & (b < 128)))
        self.raw_chars += chars
        self.non_letters += chars - letters
        self.non_ascii += int(np.count_nonzero(b >= 0xC0))
        self.capitals += int(np.count_nonzero((b >= 65) & (b <= 90)))
        if not self.has_text:  # (decoded only while every block so far was whitespace)
            self.has_text = not block.decode("utf-8").isspace()


STATS_FIELDS = {"raw_chars": int, "non_letters": int, "non_ascii": int, "capitals": int,
                "has_text": bool}


def code_points(text: str) -> np.ndarray:
    """The code points of `text` as a numpy array (uint8 for ASCII, else uint32)."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


BOM = b"\xef\xbb\xbf"  # U+FEFF in UTF-8


def read_blocks(path: Path, block_bytes: int = BLOCK_BYTES, limit: int | None = None,
                what: str = "corpus") -> Iterator[bytes]:
    """The bytes of `path`, checked to be UTF-8, in pieces cut where neither NFC nor
    lowercasing depends on the cut (safe_cut; no character is cut). `limit`: refuse a file
    (or a device or pipe) of more bytes, read no further than that."""
    offset, rest, total = 0, b"", 0
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; an error must name the byte)
    except OSError as e:
        raise DataError(f"cannot read corpus {path}: {e.strerror}") from None
    first = True
    with f:
        while True:
            try:
                block = f.read(block_bytes)
            except OSError as e:
                raise DataError(f"cannot read {what} {path}: {e.strerror}") from None
            total += len(block)
            if first:  # a byte-order mark (Windows' Notepad writes one) is not text
                first = False
                if block.startswith(BOM):
                    block, offset = block[len(BOM):], len(BOM)
            if limit is not None and total > limit:
                raise DataError(f"{what} {path} is over {limit:,} bytes; give a shorter text "
                                "(its first part: head -c BYTES FILE > part.txt)")
            data = rest + block
            if not block:
                if data:
                    yield _checked(data, path, offset, what)
                return
            cut = safe_cut(data, force=len(data) >= max(4 * block_bytes, FORCE_BYTES))
            if cut == 0:
                rest = data
                continue
            piece, rest = data[:cut], data[cut:]
            yield _checked(piece, path, offset, what)
            offset += len(piece)


# Characters that let a final sigma see past them (Unicode's Case_Ignorable: marks, format
# characters, modifiers and the MidLetter punctuation).
_CASE_IGNORABLE = {"Mn", "Me", "Cf", "Lm", "Sk"}
_MID_LETTER = set("'.:^`\u00b7\u0387\u05f4\u2018\u2019\u2024\u2027\ufe13\ufe52\ufe55"
                  "\uff07\uff0e\uff1a")
TAIL_CHARS = 4096  # how far back from a block's end a cut is looked for
FORCE_BYTES = 16 << 20  # a piece longer than this is cut even where no cut is safe


def _neutral(c: str) -> bool:
    """A whole character (not a byte of a cut or invalid one), neither a sigma nor
    case-ignorable: lowercasing never looks across it."""
    return c != "\u03a3" and c not in _MID_LETTER and \
        unicodedata.category(c) not in _CASE_IGNORABLE and not "\udc80" <= c <= "\udcff"


def safe_cut(data: bytes, force: bool = False) -> int:
    """Where `data` (UTF-8) may be cut so that neither NFC nor lowercasing (final sigma) of the
    two pieces differs from that of the whole: after the last whitespace, else before a
    character that composes with nothing before it and has a neutral character on each side
    (linear on text without whitespace too). 0 when there is none in the last TAIL_CHARS
    characters, unless `force`: then at the last character boundary (so a pathological
    text of one uncuttable run is still read in linear time)."""
    cut = max(data.rfind(b"\n", -(1 << 16)), data.rfind(b" ", -(1 << 16)),
              data.rfind(b"\t", -(1 << 16)), data.rfind(b"\r", -(1 << 16))) + 1
    if cut:
        return cut
    start = max(0, len(data) - 4 * TAIL_CHARS)
    while start and (data[start] & 0xC0) == 0x80:  # to a character boundary
        start -= 1
    tail = data[start:].decode("utf-8", errors="surrogateescape")  # byte for byte
    for i in range(len(tail) - 1, 0, -1):
        a, b = tail[i - 1], tail[i]
        if (unicodedata.combining(b) == 0 and _neutral(a) and _neutral(b)
                and unicodedata.normalize("NFC", a + b) == unicodedata.normalize("NFC", a)
                + unicodedata.normalize("NFC", b)):
            return start + len(tail[:i].encode("utf-8", errors="surrogateescape"))
    if force and len(tail) > 1:
        return start + len(tail[:-1].encode("utf-8", errors="surrogateescape"))
    return 0


def _checked(data: bytes, path: Path, offset: int, what: str = "corpus") -> bytes:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {path} is not UTF-8 (byte {offset + e.start}); convert it "
                        "with `iconv -t utf-8`") from None
    return data


# The d2l preset on bytes: letters lowercased, line breaks kept, anything else (every byte of
# a multi-byte character too) a space. Runs of spaces then count as one, as the book's regex.
_D2L_TABLE = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 10 else 32
                   for c in range(256))
SPACE, NEWLINE, FIRST_LETTER = 32, 10, 97


class D2lStream:
    """The d2l preset (per line: non-letter runs -> one space, strip, lowercase; lines joined
    with nothing between them) on a text that arrives in pieces, vectorized with numpy.

    A piece is processed up to its last letter; what follows (non-letters only) is carried,
    shrunk to "\n" when it ends a line and to " " when it does not, which changes nothing.
    A space survives when a letter of its own line stands on each side of its run.
    """

    def __init__(self) -> None:
        self.carry = b""
        self.line_has_letters = False  # the current line has had a letter (so a piece that
        # begins mid-line has a letter just before it)

    def feed(self, data: bytes, final: bool = False) -> np.ndarray:
        """The tokens of `data` (and of the carried rest) as lowercase ASCII codes, uint8."""
        y = self.carry + data.translate(_D2L_TABLE)
        a = np.frombuffer(y, dtype=np.uint8)
        self.carry = b""
        letter = a >= FIRST_LETTER
        if not final:
            cut = _after_last(letter)
            rest = a[cut:]
            self.carry = b"\n" if (rest == NEWLINE).any() else (b" " if len(rest) else b"")
            a, letter = a[:cut], letter[:cut]
        if not len(a):
            return a
        last_newline = y.rfind(b"\n", 0, len(a))
        before = self.line_has_letters
        self.line_has_letters = bool(letter[last_newline + 1:].any()) or (
            last_newline < 0 and before)
        space = a == SPACE
        first = space.copy()
        first[1:] &= ~space[:-1]  # the first space of each run
        b = a[~space | first]  # runs collapsed: spaces now sit between non-spaces
        is_letter = b >= FIRST_LETTER
        prev_letter = np.empty_like(is_letter)
        prev_letter[0] = before
        prev_letter[1:] = is_letter[:-1]
        next_letter = np.empty_like(is_letter)
        next_letter[-1] = False  # a piece ends at a letter, or the text ends
        next_letter[:-1] = is_letter[1:]
        keep = is_letter | ((b == SPACE) & prev_letter & next_letter)
        return b[keep]


def _after_last(mask: np.ndarray) -> int:
    """The index just after the last True of `mask` (0 when none), looking back from the end
    in growing windows, so no index array as long as the block is made."""
    window = 4096
    while True:
        start = max(0, len(mask) - window)
        found = np.flatnonzero(mask[start:])
        if len(found):
            return start + int(found[-1]) + 1
        if start == 0:
            return 0
        window *= 4


def token_pieces(path: Path, preset: str, lowercase: bool, stats: Stats | None = None,
                 block_bytes: int = BLOCK_BYTES, limit: int | None = None,
                 what: str = "corpus", script: str = "as-is") -> Iterator[np.ndarray]:
    """The preprocessed text of `path` (gru_lm.data.preprocess) as code points, piece by
    piece: uint8 arrays for ASCII pieces, else uint32. `script`: Chinese characters
    converted (pieces are cut after whitespace, so no phrase is cut when lines are short)."""
    if preset not in ("d2l", "raw", "bytes"):
        raise DataError(f"unknown preprocessing preset '{preset}'; choose d2l, raw or bytes")
    d2l = D2lStream() if preset == "d2l" else None
    for block in read_blocks(path, block_bytes, limit, what):
        if stats is not None:
            stats.add(block)
        if preset == "bytes":  # the bytes are the tokens (and their latin-1 code points)
            if script != "as-is":
                block = convert(block.decode("utf-8"), script).encode("utf-8")
            yield np.frombuffer(block, dtype=np.uint8)
        elif d2l is not None:
            yield d2l.feed(block)
        else:
            text = convert(unicodedata.normalize("NFC", block.decode("utf-8")), script)
            yield code_points(text.lower() if lowercase else text)
    if d2l is not None:
        yield d2l.feed(b"", final=True)


def _limited(pieces: Iterator[np.ndarray], max_tokens: int | None) -> Iterator[np.ndarray]:
    """`pieces` cut after `max_tokens` tokens in all (the rest is still read, so that
    statistics cover the whole file)."""
    left = max_tokens
    for piece in pieces:
        if left is None:
            yield piece
        elif left > 0:
            yield piece[:left]
            left -= min(left, len(piece))


@dataclass
class TokenStore:
    """A prepared corpus: `ids` (a read-only-backed np.memmap) and what describes it."""

    ids: np.ndarray
    vocab: Any  # gru_lm.data.Vocab (data sits above this module and hands in its builder)
    stats: Stats
    path: Path  # the .bin file
    reused: bool
    note: str = ""  # why an existing store was prepared again


def store_paths(source: Path, cfg: DataConfig, cache_dir: Path) -> tuple[Path, Path, dict]:
    """(bin, json, key fields) of the store for `source` under `cfg`'s preprocessing."""
    fields = {"version": VERSION, "source_sha256": file_digest(source, "sha256"),
              "preset": cfg.preset, "lowercase": cfg.lowercase and cfg.preset == "raw",
              "min_freq": cfg.min_freq, "reserved_tokens": list(cfg.reserved_tokens),
              "max_tokens": cfg.max_tokens}
    if cfg.script != "as-is":  # (absent otherwise: the stores made before it keep their key)
        fields["script"] = cfg.script
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(source).stem)[:60] or "corpus"
    folder = Path(cache_dir) / "tokens"
    return folder / f"{stem}-{key}.bin", folder / f"{stem}-{key}.json", fields


def open_store(source: Path, cfg: DataConfig, cache_dir: Path, make_vocab,
               block_bytes: int = BLOCK_BYTES) -> TokenStore:
    """The token store of `source`, prepared now unless an identical one exists;
    `make_vocab(counts, min_freq, reserved_tokens)` builds the vocabulary (Vocab.from_counts).
    A store whose files do not hold what they should (edited, cut short, ids past the
    vocabulary) is prepared again, and `note` says why."""
    bin_path, meta_path, fields = store_paths(source, cfg, cache_dir)
    meta, problem = _read_meta(meta_path, bin_path, fields)
    vocab = None
    if meta is not None:
        vocab = make_vocab(dict(meta["counts"]), min_freq=cfg.min_freq,
                           reserved_tokens=cfg.reserved_tokens)
        if vocab.idx_to_token != meta["idx_to_token"]:
            meta, problem = None, "field 'idx_to_token' does not follow from 'counts'"
    reused = meta is not None
    if meta is None:
        meta = prepare(source, cfg, bin_path, meta_path, fields, make_vocab, block_bytes)
        vocab = make_vocab(dict(meta["counts"]), min_freq=cfg.min_freq,
                           reserved_tokens=cfg.reserved_tokens)
    n = meta["num_tokens"]
    dtype = np.dtype(meta["dtype"])
    # mode "c": copy-on-write pages, so torch.from_numpy gets a writable array that never
    # writes back; nothing is read from disk until it is used.
    ids = np.memmap(bin_path, dtype=dtype, mode="c", shape=(n,)) if n else np.zeros(0, dtype)
    note = f"token store {meta_path}: {problem}; prepared again" if problem else ""
    return TokenStore(ids=ids, vocab=vocab, stats=Stats(**meta["stats"]), path=bin_path,
                      reused=reused, note=note)


def _check_meta(meta: Any, fields: dict) -> str | None:
    """What is wrong with a store's description, or None: every field of its type."""
    if not isinstance(meta, dict):
        return "it is not a JSON object"
    expected = {"key", "source", "dtype", "num_tokens", "idx_to_token", "counts", "stats"}
    odd = sorted(set(meta) ^ expected)
    if odd:
        return f"field {odd[0][:40]!r} is {'unknown' if odd[0] in meta else 'missing'}"

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63

    tokens = meta["idx_to_token"]
    checks = {
        "key": meta["key"] == fields,
        "source": isinstance(meta["source"], str),
        "dtype": meta["dtype"] in ("uint8", "uint16"),
        "num_tokens": count(meta["num_tokens"]),
        "idx_to_token": isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
        and 0 < len(tokens) <= MAX_VOCAB and len(set(tokens)) == len(tokens),
        "counts": isinstance(meta["counts"], list) and all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and count(c[1])
            for c in meta["counts"]),
        "stats": isinstance(meta["stats"], dict) and set(meta["stats"]) == set(STATS_FIELDS)
        and all(isinstance(v, bool) if STATS_FIELDS[k] is bool else count(v)
                for k, v in meta["stats"].items()),
    }
    bad = next((k for k, ok in checks.items() if not ok), None)
    return None if bad is None else f"field {bad!r} is malformed"


def _read_meta(meta_path: Path, bin_path: Path, fields: dict) -> tuple[dict | None, str]:
    """The store's description when the store is complete and made for `fields`, else None
    and what is wrong ("" when there is no store yet)."""
    if not meta_path.exists():
        return None, ""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        return None, f"cannot be read ({type(e).__name__})"
    problem = _check_meta(meta, fields)
    if problem:
        return None, problem
    try:
        size = bin_path.stat().st_size
    except OSError:
        return None, f"{bin_path.name} is missing"
    if size != np.dtype(meta["dtype"]).itemsize * meta["num_tokens"]:
        return None, f"{bin_path.name} holds {size:,} bytes, not the ids of field 'num_tokens'"
    if meta["num_tokens"] and _largest_id(bin_path, meta) >= len(meta["idx_to_token"]):
        return None, f"{bin_path.name} holds ids past the vocabulary"
    return meta, ""


def _largest_id(bin_path: Path, meta: dict) -> int:
    """The largest id in the store, read in chunks (about 0.1 s a GB)."""
    ids = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r",
                    shape=(meta["num_tokens"],))
    chunk = 1 << 24
    return max(int(ids[i:i + chunk].max()) for i in range(0, len(ids), chunk))


def prepare(source: Path, cfg: DataConfig, bin_path: Path, meta_path: Path, fields: dict,
            make_vocab, block_bytes: int = BLOCK_BYTES) -> dict:
    """Tokenize `source` into `bin_path` (ids) and `meta_path` (description), atomically."""
    stats = Stats()
    counts = np.zeros(0x110000, dtype=np.int64)
    num_tokens = 0
    for piece in _limited(token_pieces(source, cfg.preset, cfg.lowercase, stats, block_bytes,
                                       script=cfg.script), cfg.max_tokens):
        cps = piece
        num_tokens += len(cps)
        if cps.dtype == np.uint8:
            counts[:256] += np.bincount(cps, minlength=256)
        else:
            counts += np.bincount(cps, minlength=len(counts))
    if not stats.has_text:
        raise DataError(f"corpus {source} is empty; give a file with text in it")
    if num_tokens < 2:
        fix = ("the d2l preset keeps only the letters a-z: set data.preset=raw for any other "
               "script" if cfg.preset == "d2l" else "give a longer text")
        raise DataError(f"corpus {source} has {num_tokens} token(s) after the '{cfg.preset}' "
                        f"preprocessing; it needs at least 2 ({fix})")
    seen = np.nonzero(counts)[0]
    token_counts = {chr(int(c)): int(counts[c]) for c in seen}
    vocab = make_vocab(token_counts, min_freq=cfg.min_freq,
                              reserved_tokens=cfg.reserved_tokens)
    if not any(t in token_counts for t in vocab.idx_to_token):
        raise DataError(f"data.min_freq={cfg.min_freq:,} leaves no character of {source} in the "
                        f"vocabulary (the most frequent occurs {max(token_counts.values()):,} "
                        "times); lower data.min_freq")
    if len(vocab) > MAX_VOCAB:
        raise DataError(f"corpus {source} has {len(vocab):,} distinct characters, more than "
                        f"the {MAX_VOCAB:,} a token store holds; raise data.min_freq")
    dtype = np.uint8 if len(vocab) <= 256 else np.uint16
    lut = np.zeros(0x110000, dtype=dtype)  # code point -> id; unknown -> <unk> (0)
    for token, idx in vocab.token_to_idx.items():
        if len(token) == 1:
            lut[ord(token)] = idx
    try:
        with atomic_writer(bin_path, "wb") as f:
            for piece in _limited(token_pieces(source, cfg.preset, cfg.lowercase,
                                               block_bytes=block_bytes, script=cfg.script),
                                  cfg.max_tokens):
                f.write(lut[piece].tobytes())
        meta = {"key": fields, "source": str(source), "dtype": np.dtype(dtype).name,
                "num_tokens": num_tokens, "idx_to_token": vocab.idx_to_token,
                "counts": sorted(token_counts.items()), "stats": stats.__dict__}
        atomic_write_text(meta_path, json.dumps(meta, ensure_ascii=False))
    except OSError as e:
        raise DataError(f"cannot write the token store {bin_path}: {e.strerror or e}; set "
                        "data.cache_dir to a writable folder with free space") from None
    return meta
