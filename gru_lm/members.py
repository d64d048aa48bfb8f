"""Trained runs as their users name them: one way to find a run's checkpoint, one way to load
it, and the checks every command that scores several runs shares.

    locate(path)        a run folder, a checkpoint file, or None (the newest run under
                        runs_dir) -> the run folder and the checkpoint to use
    load_member(path)   a checkpoint -> model (eval mode), config, vocabulary, corpus
                        fingerprint
    scoring_corpus(ms)  the corpus the members were trained on, checked to be that text
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gru_lm.errors import DataError, GruLmError
from gru_lm.rundir import RunDir, find_latest
from gru_lm.utils import missing_reason

if TYPE_CHECKING:  # (torch is imported by what loads a model: `gru-lm runs` needs none)
    from gru_lm.config import Config
    from gru_lm.data import Corpus, Vocab
    from gru_lm.models import RecurrentLM


@dataclass(frozen=True)
class Located:
    """Where a path a user gave leads: the run folder and the checkpoint to load; `newest`
    when no path was given and the newest run was taken."""

    run: RunDir  # (a loose checkpoint file: the folder it lies in)
    checkpoint: Path
    newest: bool = False


def locate(path: str | Path | None, runs_dir: str | Path = "runs") -> Located:
    """A run folder -> its best.pt (else last.pt); a checkpoint file -> itself and the run it
    lies in (runs/X/checkpoints/last.pt belongs to runs/X); None -> the newest run under
    `runs_dir`. The one place gru-lm turns a user's path into a checkpoint."""
    if path is None:
        run = find_latest(Path(runs_dir))
        return Located(run, run.best_or_last(), newest=True)
    p = Path(path)
    if p.is_dir():
        from gru_lm.exporting import export_weights, is_export

        if is_export(p):  # (a folder `gru-lm export` wrote: its weights, or why there are none)
            return Located(RunDir(p), export_weights(p))
        run = RunDir(p)
        return Located(run, run.best_or_last())
    if not p.exists():
        raise GruLmError(f"{p} {missing_reason(p)}; give a run folder (see `gru-lm runs`) or a "
                         "checkpoint file")
    if p.suffix in (".safetensors", ".onnx"):  # (an export's file: the export it is in)
        from gru_lm.exporting import ONNX, WEIGHTS, export_weights

        if p.name in (WEIGHTS, ONNX):
            return Located(RunDir(p.parent), export_weights(p.parent))
    check_checkpoint_file(p)
    folder = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return Located(RunDir(folder), p)


def check_checkpoint_file(p: Path) -> None:
    """Refuse a file that is not a checkpoint (a config, a text) given where a run or a
    checkpoint belongs, saying what to give instead."""
    from gru_lm.checkpoint import looks_like_checkpoint

    if not looks_like_checkpoint(p):
        hint = (f"; a config trains a new run: gru-lm train --config {p}"
                if p.suffix.lower() in (".yaml", ".yml") else "")
        raise GruLmError(f"{p} is not a run folder or a checkpoint (a .pt file gru-lm wrote)"
                         f"{hint}; give a run folder (see `gru-lm runs`)")


@dataclass
class Member:
    """One trained run as loaded from its checkpoint."""

    path: Path
    cfg: Config
    vocab: Vocab
    model: RecurrentLM
    fingerprint: str | None  # of the corpus it was trained on (None: an old checkpoint)


def load_member(path: Path) -> Member:
    """The one loader: a checkpoint file (or an export's model.safetensors) -> its model (in
    eval mode) with what it needs."""
    from gru_lm.checkpoint import load_checkpoint, restore_model
    from gru_lm.exporting import WEIGHTS, load_export

    if Path(path).name == WEIGHTS:
        cfg, vocab, model = load_export(Path(path).parent)
        return Member(Path(path), cfg, vocab, model, None)
    ck = load_checkpoint(path)
    cfg, vocab, model = restore_model(ck, path)
    model.eval()
    fp = ck.get("data_fingerprint")
    return Member(Path(path), cfg, vocab, model, fp if isinstance(fp, str) else None)


def check_distinct(paths: list[Path], what: str = "run or checkpoint") -> None:
    """Each path once: the same file twice would be counted twice."""
    import os

    seen: dict[str, Path] = {}
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            also = f" (also as {seen[key]})" if str(seen[key]) != str(p) else ""
            raise GruLmError(f"{p} is given twice{also}; give each {what} once")
        seen[key] = Path(p)


def check_members(members: list[Member]) -> None:
    """An ensemble or a comparison needs one vocabulary and one corpus: refuse the first
    member that differs."""
    first = members[0]
    need = ("an ensemble or a comparison needs runs trained on the same data (one corpus, "
            "preprocessing and split)")
    for m in members[1:]:
        if m.vocab.idx_to_token != first.vocab.idx_to_token:
            raise GruLmError(f"{m.path}: it was trained on other data than {first.path} (its "
                             f"vocabulary has {_how_vocab_differs(m.vocab, first.vocab)}); "
                             f"{need}")
        if (m.cfg.data.model_dump(mode="json") != first.cfg.data.model_dump(mode="json")
                or (m.fingerprint and first.fingerprint and m.fingerprint != first.fingerprint)):
            raise GruLmError(f"{m.path}: it was trained on other data than {first.path} "
                             f"(another corpus, preprocessing or split); {need}")


def _how_vocab_differs(mine: Vocab, first: Vocab) -> str:
    if len(mine) != len(first):
        return f"{len(mine)} tokens against {len(first)}"
    if set(mine.idx_to_token) == set(first.idx_to_token):
        return f"the same {len(mine)} tokens, in another order"
    return f"other tokens, {len(mine)} of them"


def check_fingerprint(members: list[Member], corpus: Corpus) -> None:
    """Refuse to score a corpus that is not the text the runs were trained on."""
    recorded = [m for m in members if m.fingerprint]
    if not recorded:
        return
    now = corpus.fingerprint()
    for m in recorded:
        if m.fingerprint != now:
            raise DataError(
                f"{m.path}: the corpus ({corpus.source}) is not the text this run was trained "
                "on: the file, its token store or the split changed; restore the original "
                "file, or score another text with --text FILE")


def scoring_corpus(members: list[Member], offline: bool | None) -> Corpus:
    """The members checked to share one corpus, and that corpus, checked to be the text they
    were trained on (evaluate's and compare's shared first steps)."""
    from gru_lm.data import load_corpus

    check_members(members)
    corpus = load_corpus(members[0].cfg.data, vocab=members[0].vocab, offline=offline,
                         progress=False)
    check_fingerprint(members, corpus)
    return corpus
