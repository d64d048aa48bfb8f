"""What is checked and said before training starts, so the trainer only trains: the
precision's cost on this machine, sample prefixes the corpus cannot spell, and which part of
val and test every evaluation scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gru_lm import ngram
from gru_lm._ext import cpu_has_bf16, cpu_summary
from gru_lm.cells import bf16_pin
from gru_lm.errors import GruLmError
from gru_lm.metrics import corpus_baselines
from gru_lm.models import count_parameters
from gru_lm.sampling import encode_prefix, run_prefixes

if TYPE_CHECKING:
    import torch

    from gru_lm.config import Config
    from gru_lm.data import Corpus

LARGE_EVAL = 2_000_000  # tokens of val or test past which the log suggests a cap


@dataclass
class Plan:
    """The trainer's inputs decided before it starts, and the notes said under its header."""

    prefix_ids: list[list[int]]
    eval_splits: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def plan(cfg: Config, model, corpus: Corpus, device) -> Plan:
    """Check the run's settings against this machine and corpus, and say what matters."""
    notes = [corpus.store_note] if corpus.store_note else []
    notes += [model.output_note()] if model.output_note() else []
    notes += precision_notes(cfg, model, device)
    prefix_ids = sample_prefixes(cfg, corpus, notes)
    return Plan(prefix_ids, eval_splits(cfg, corpus, notes), notes)


def precision_notes(cfg: Config, model, device) -> list[str]:
    """bf16 on a CPU: refuse a wrong GRU_LM_BF16_GEMM, then time this model's recurrent
    products in bf16 and fp32 at its step's shape (a few tens of ms) and, when bf16 is not
    faster here, say so with the figures (the model's kernels.bf16_speed: gru_lm/cells.py)."""
    import torch

    if cfg.train.precision != "bf16":
        return []
    bf16_pin()
    if torch.device(device).type != "cpu":
        return []
    ratio, figures = model.kernels.bf16_speed(cfg.train.batch_size)
    if ratio >= 1:
        return []
    has = "" if cpu_has_bf16() else ", which has no bf16 arithmetic (avx512_bf16, amx_bf16)"
    speed = f"{ratio:.2f}x" if ratio >= 0.1 else f"1/{1 / ratio:,.0f} of"
    return [f"train.precision=bf16 does not pay on this CPU ({cpu_summary()['model']}{has}): "
            f"its recurrent products run at {speed} fp32's speed ({figures}, measured now); "
            "use train.precision=fp32 unless you want bf16's numbers"]


def sample_prefixes(cfg: Config, corpus: Corpus, notes: list[str]) -> list[list[int]]:
    """The sample prefixes as ids (sampling.run_prefixes: the config's, or ones from the
    text); one that this corpus cannot encode becomes the corpus' first characters, with a
    note."""
    out = []
    prefixes = run_prefixes(cfg, corpus)
    if not prefixes:  # a text none of whose first words can be encoded back
        prefixes = [corpus.vocab.decode(corpus.train[:1].tolist())]
    for i, prefix in enumerate(prefixes):
        try:
            out.append(encode_prefix(prefix, corpus.vocab, cfg.data)[0])
        except GruLmError as e:
            ids = corpus.train[:max(1, min(len(prefix), 20))].tolist()
            out.append(ids)
            notes.append(f"train.sample_prefixes[{i}] does not fit this corpus "
                         f"({str(e).split(';')[0]}); sampling from its first characters "
                         f"{corpus.vocab.decode(ids)!r} instead")
    return out


def eval_splits(cfg: Config, corpus: Corpus, notes: list[str]) -> dict[str, torch.Tensor]:
    """val and test as evaluated: their first train.eval_max_tokens tokens. Notes what is
    capped: those splits, and the training tokens the n-gram reference counts."""
    cap = cfg.train.eval_max_tokens
    out = {s: getattr(corpus, s) for s in ("val", "test")}
    cut = [s for s, v in out.items() if cap is not None and len(v) > cap]
    if cut:
        sizes = " and ".join(f"{s} ({len(out[s]):,})" for s in cut)
        notes.append(f"train.eval_max_tokens={cap:,}: evaluation scores the first {cap:,} "
                     f"tokens of {sizes}; perplexities are of that part")
    big = [s for s, v in out.items() if cap is None and len(v) > LARGE_EVAL]
    if big:
        notes.append(f"{' and '.join(f'{s} has {len(out[s]):,}' for s in big)} tokens; every "
                     "evaluation scores all of them; train.eval_max_tokens=N scores the first N")
    if len(corpus.train) > ngram.MAX_TRAIN_TOKENS:
        notes.append(f"the n-gram reference counts the first {ngram.MAX_TRAIN_TOKENS:,} of the "
                     f"{len(corpus.train):,} training tokens (about 10 bytes of memory a "
                     "token); the model trains on all of them")
    return {s: v[:cap] if cap is not None else v for s, v in out.items()}


def announce(trainer, main: bool) -> dict:
    """Before the first step: the header and the plan's notes (rank 0 alone prints); returns
    the n-gram references the header shows, which the summary keeps (rank 0's; {} else)."""
    cfg, corpus = trainer.cfg, trainer.corpus
    reference = corpus_baselines(corpus, cfg.train.ngram_order,
                                 trainer.eval_splits["val"]) if main else {}
    if main:
        trainer.out.header(
            corpus=corpus, model=cfg.model.name, params=count_parameters(trainer.model),
            batches_per_epoch=trainer.batches_per_epoch, device=str(trainer.device),
            kernels=trainer.model.kernels.path(trainer.device, cfg.train.precision) +
            ("" if trainer.model.adaptive is None else f" | {trainer.model.output_layer}"),
            reference=reference,
            reference_split="val" if len(corpus.val) > 1 else "train")
    for note in trainer.notes:
        trainer.out.warning(note)
    return reference
