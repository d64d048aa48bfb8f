"""How to continue a text, as one value: `Decoding` holds every choice (length, greedy or
sampled with temperature / top-k / top-p and a seed, beam search, blocked repeats, a poem's
form), checked once when it is made, with the defaults defined here and nowhere else. The
CLI, the API, the server, compare's samples and the trainer's samples all pass one along."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

from gru_lm.config import DEFAULT_TEMPERATURE, MAX_SEED
from gru_lm.errors import GruLmError

if TYPE_CHECKING:  # (poems imports torch; a Decoding is made before any model is loaded)
    from gru_lm.poems import PoemForm

DEFAULT_SEED = 0
DEFAULT_CHARS = 50  # characters a continuation adds unless told otherwise
MAX_CHARS = 10_000
MAX_SAMPLES = 1_000
MAX_BEAM = 1_000
MAX_NO_REPEAT = 1_000
# Below this, logits / temperature overflow float32 and the softmax is NaN; sampling that
# cold is greedy decoding anyway.
MIN_TEMPERATURE = 1e-6


class DecodingOptions(TypedDict, total=False):
    """The keyword arguments of every API function that continues a text (Run.predict,
    Run.samples, Run.continuations, gru_lm.continue_text): each a field of Decoding, or
    `greedy` (temperature None) and `acrostic` / `form` (a poem's form)."""

    temperature: float | None
    top_k: int | None
    top_p: float | None
    seed: int | None
    greedy: bool
    beam: int | None
    no_repeat: int | None
    acrostic: str | None
    form: str | None


def _float32(x: float) -> float:
    """The value the model computes with: 1e-50 is 0 and 1e39 is inf in float32."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


@dataclass(frozen=True)
class Decoding:
    """How a prefix is continued. temperature None is greedy (argmax, as the book) unless
    `beam` is set: then the `beam` most likely continuations of `num_chars` characters
    (num_samples is the beam width). `no_repeat` N: no N-gram occurs twice in a
    continuation. `poem`: a form the continuation takes (its length is the form's).
    Made directly, every field is checked; Decoding.of also fills in the defaults."""

    num_chars: int = DEFAULT_CHARS
    temperature: float | None = DEFAULT_TEMPERATURE
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = DEFAULT_SEED
    num_samples: int = 1
    beam: int | None = None
    no_repeat: int | None = None
    poem: PoemForm | None = None
    note: str = field(default="", compare=False)  # the defaults taken, and how to change them

    def __post_init__(self) -> None:
        _check(self)

    @property
    def greedy(self) -> bool:
        return self.temperature is None and self.beam is None

    @property
    def sampled(self) -> bool:
        return self.temperature is not None

    @property
    def count(self) -> int:
        """The continuations it gives: the beams, or the samples."""
        return self.beam if self.beam is not None else self.num_samples

    @classmethod
    def of(cls, num_chars: int | None = None, num_samples: int = 1, *,
           temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, greedy: bool = False,
           beam: int | None = None, no_repeat: int | None = None,
           acrostic: str | None = None, form: str | None = None) -> Decoding:
        """What a person asked for (None: not said), with the defaults filled in: sampled at
        DEFAULT_TEMPERATURE with DEFAULT_SEED, so the first sample a person sees reads well
        and repeats; --greedy is the book's argmax and takes no sampling option (N greedy
        samples would be N copies); --beam K takes none either."""
        from gru_lm.poems import poem_form

        poem = poem_form(acrostic, form)
        what = "--form" if form is not None else "--acrostic"
        if poem is not None and num_chars is not None:
            raise GruLmError(f"--num-chars {num_chars} means nothing with {what}: the form "
                             "sets the poem's length; drop one of the two")
        sampling = [flag for flag, v in (("--temperature", temperature), ("--top-k", top_k),
                                         ("--top-p", top_p), ("--seed", seed)) if v is not None]
        if num_samples != 1:
            sampling.append("--num-samples")
        length = num_chars if num_chars is not None else \
            poem.max_chars if poem is not None else DEFAULT_CHARS
        if beam is not None:
            if greedy:
                raise GruLmError(f"--beam {beam} and --greedy are two searches; --beam 1 is "
                                 "greedy, drop one of the two")
            if sampling:
                raise GruLmError(f"--beam {beam} finds the likeliest continuations, so "
                                 f"{sampling[0]} means nothing with it; drop one of the two "
                                 "(--beam K gives K of them)")
            if poem is not None:
                raise GruLmError(f"--beam with {what} is not supported: a form is sampled or "
                                 "greedy; drop --beam")
            return cls(length, temperature=None, seed=None, num_samples=beam, beam=beam,
                       no_repeat=no_repeat)
        if greedy:
            if sampling:
                raise GruLmError(f"--greedy takes the most likely character every time, so "
                                 f"{sampling[0]} means nothing with it; drop one of the two")
            return cls(length, temperature=None, seed=None, no_repeat=no_repeat, poem=poem)
        taken = []
        if temperature is None:
            temperature = DEFAULT_TEMPERATURE
            taken.append(f"temperature {DEFAULT_TEMPERATURE} (--temperature T)")
        if seed is None:
            seed = DEFAULT_SEED
            taken.append(f"seed {DEFAULT_SEED} (--seed N for other samples)")
        note = f"sampled at {', '.join(taken)}; --greedy for the book's argmax" if taken else ""
        return cls(length, temperature, top_k, top_p, seed, num_samples, no_repeat=no_repeat,
                   poem=poem, note=note)


def _check(d: Decoding) -> None:
    """Every field in range, and the fields that exclude each other apart (one line each,
    named as the CLI's options)."""
    for name, v in (("num_chars", d.num_chars), ("num_samples", d.num_samples)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise GruLmError(f"--{name.replace('_', '-')} {v!r} is not an integer")
    t = d.temperature
    if d.beam is not None:
        if not 1 <= d.beam <= MAX_BEAM:
            raise GruLmError(f"--beam {d.beam} is out of range; give 1..{MAX_BEAM} "
                             "(1 is greedy)")
        if t is not None or d.top_k is not None or d.top_p is not None or d.poem is not None:
            raise GruLmError("--beam searches for the likeliest continuations; it takes no "
                             "temperature, top-k, top-p or form")
        if d.num_samples != d.beam:
            raise GruLmError(f"--beam {d.beam} gives {d.beam} continuations; num_samples "
                             f"must be {d.beam} too")
    if not 1 <= d.num_chars <= MAX_CHARS and d.poem is None:
        raise GruLmError(f"--num-chars {d.num_chars} is out of range; give 1..{MAX_CHARS}")
    if not 1 <= d.num_samples <= MAX_SAMPLES:
        raise GruLmError(f"--num-samples {d.num_samples} is out of range; give "
                         f"1..{MAX_SAMPLES}")
    # (compared in float32, as computed: 1e-6 itself is 9.99999997e-07 there)
    if t is not None and not (math.isfinite(_float32(t))
                              and _float32(t) >= _float32(MIN_TEMPERATURE)):
        raise GruLmError(f"--temperature {t} is invalid; give a number from "
                         f"{MIN_TEMPERATURE:g} to 3.4e38 (or --greedy for greedy decoding)")
    if d.top_k is not None and d.top_k < 1:
        raise GruLmError(f"--top-k {d.top_k} is invalid; give an integer >= 1")
    if d.beam is None and t is None and (d.top_k is not None or d.top_p is not None):
        raise GruLmError("--greedy takes the most likely character every time, so --top-k / "
                         "--top-p mean nothing with it; drop one of the two")
    if d.top_p is not None and not (math.isfinite(d.top_p) and 0 < _float32(d.top_p) <= 1):
        raise GruLmError(f"--top-p {d.top_p} is invalid; give a number in (0, 1] "
                         "(at least 1.5e-45, the smallest float32)")
    if d.seed is not None and not 0 <= d.seed <= MAX_SEED:
        raise GruLmError(f"--seed {d.seed} is out of range; give 0..{MAX_SEED}")
    if d.no_repeat is not None and not 2 <= d.no_repeat <= MAX_NO_REPEAT:
        raise GruLmError(f"--no-repeat {d.no_repeat} is out of range; give 2..{MAX_NO_REPEAT} "
                         "(the length of the character sequences that may not repeat)")


def decoding_of(decoding: Decoding | None, num_chars: int | None, num_samples: int,
                options: DecodingOptions) -> Decoding:
    """The one Decoding an API call continues with: `decoding` as given, or one made from
    the keyword arguments (not both)."""
    if decoding is None:
        return Decoding.of(num_chars, num_samples, **options)
    if options or num_chars is not None:
        given = sorted(options) + (["num_chars"] if num_chars is not None else [])
        raise GruLmError(f"give decoding= or {given[0]}=, not both (the Decoding holds it)")
    if not isinstance(decoding, Decoding):
        raise GruLmError(f"decoding={decoding!r} is not a gru_lm.Decoding; make one with "
                         "gru_lm.Decoding(...) or Decoding.of(...)")
    return decoding
