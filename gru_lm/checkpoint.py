"""Checkpoints as plain data: atomic writes, a SHA-256 beside each file, weights_only loads."""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

from gru_lm.config import validate
from gru_lm.data import vocab_from_dict
from gru_lm.errors import CheckpointError, ConfigError, DataError
from gru_lm.models import build_model
from gru_lm.utils import atomic_write_text, atomic_writer, file_digest, missing_reason

FORMAT = "gru-lm-checkpoint"
VERSION = 1


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_digests(path: Path) -> list[str]:
    """The SHA-256 values listed in the sidecar; anything else in it (a damaged or edited
    file) is ignored, so such a sidecar accepts no checkpoint."""
    side = digest_path(path)
    try:
        text = side.read_bytes()[:4096].decode("ascii", errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    words = (line.split()[0] for line in text.splitlines() if line.split())
    return [w.lower() for w in words if len(w) == 64 and all(c in HEX for c in w.lower())]


HEX = set("0123456789abcdef")


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write `payload` atomically; the sidecar lists the hash(es) valid at every instant.

    Order: sidecar lists old + new hash -> checkpoint replaced -> sidecar lists new only,
    so a kill at any point leaves a checkpoint whose hash the sidecar accepts.
    """
    import io

    import torch

    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buf)
    data = buf.getvalue()
    new = hashlib.sha256(data).hexdigest()
    old = _read_digests(path)[:1] if path.is_file() else []
    atomic_write_text(digest_path(path), "".join(f"{d}  {path.name}\n" for d in [new, *old]))
    with atomic_writer(path, "wb") as f:
        f.write(data)
    atomic_write_text(digest_path(path), f"{new}  {path.name}\n")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def looks_like_checkpoint(path: Path) -> bool:
    """Whether `path` could be a checkpoint: one gru-lm wrote (a .sha256 beside it; whatever is
    wrong with it, load_checkpoint says) or a zip archive as torch.save writes, not a config
    or a text given where a checkpoint belongs."""
    if digest_path(path).exists():
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    except OSError:
        return True  # (unreadable: load_checkpoint names the reason)


def load_checkpoint(path: Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: hash-checked, weights_only, with errors naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} {missing_reason(path)}; train a run first "
                              "or pass --checkpoint / --run pointing at one")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); use another checkpoint "
                              "(e.g. checkpoints/best.pt) or retrain")
    if not looks_like_checkpoint(path):
        raise CheckpointError(f"{path} is not a checkpoint (a .pt file gru-lm wrote); give "
                              "one, e.g. RUN/checkpoints/best.pt")
    digests = _read_digests(path)
    if not digests and digest_path(path).exists():
        raise CheckpointError(f"checkpoint {path}: {digest_path(path).name} beside it is damaged "
                              "(no SHA-256 in it), so its integrity cannot be checked; use "
                              "another checkpoint (e.g. checkpoints/best.pt) or retrain")
    if not digests:
        raise CheckpointError(f"checkpoint {path} has no {digest_path(path).name} beside it, so "
                              "its integrity cannot be checked; only load checkpoints that "
                              "gru-lm wrote")
    if file_digest(path, "sha256") not in digests:
        raise CheckpointError(f"checkpoint {path} is damaged: its SHA-256 does not match "
                              f"{digest_path(path).name}; use another checkpoint "
                              "(e.g. checkpoints/best.pt) or retrain")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} was refused: it holds objects that are not "
                              f"plain data ({first[:160]}); never load untrusted pickles") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is "
                              "truncated or not a gru-lm checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gru-lm checkpoint (no '{FORMAT}' marker)")
    for key in ("model", "config", "vocab", "step"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks the field '{key}'; retrain")
    check_fields(payload, path)
    return payload


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _tensors(x: Any) -> bool:
    """A tensor, or a tuple/list of tensors (an LSTM's (H, C))."""
    return _is_tensor(x) or (isinstance(x, tuple | list) and bool(x)
                             and all(_is_tensor(t) for t in x))


def _finite_tensor(x: Any) -> bool:
    import torch

    return _is_tensor(x) and (not x.is_floating_point() or bool(torch.isfinite(x).all()))


# The type every field must have, whoever wrote the file: a checkpoint is untrusted input.
_FIELDS: dict[str, tuple[str, Any]] = {
    "config": ("a mapping", lambda v: isinstance(v, dict)),
    "vocab": ("a mapping", lambda v: isinstance(v, dict)),
    "step": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool)
             and 0 <= v < 2**63),
    "weights": ("'raw' or 'ema'", lambda v: v in ("raw", "ema")),
    "data_fingerprint": ("a string", lambda v: isinstance(v, str)),
    "progress": ("a mapping", lambda v: isinstance(v, dict)),
    "optimizer": ("a mapping", lambda v: isinstance(v, dict)),
    "ema": ("a mapping or null", lambda v: v is None or isinstance(v, dict)),
    "carry_state": ("finite tensors or null", lambda v: v is None or (
        _tensors(v) and all(_finite_tensor(t) for t in (v if isinstance(v, tuple | list)
                                                          else [v])))),
    "rng": ("a mapping", lambda v: isinstance(v, dict)),
    "loader_epoch_state": ("a tensor", _is_tensor),
    "world_size": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool)
                   and v >= 1),
    "ranks": ("a list of mappings", lambda v: isinstance(v, list)
              and all(isinstance(r, dict) for r in v)),
}


def check_fields(payload: dict[str, Any], path: Path) -> None:
    """Refuse a field of the wrong type or a weight that is not finite, naming the field."""
    for key, (what, ok) in _FIELDS.items():
        if key in payload and not ok(payload[key]):
            raise CheckpointError(f"checkpoint {path} field '{key}' must be {what}; the file "
                                  "was edited or damaged: use another checkpoint or retrain")
    model = payload["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"checkpoint {path} field 'model' is not a state dict")
    check_weights(model, path, f"checkpoint {path} field 'model'",
                  "use another checkpoint or retrain")


def check_weights(state: dict[str, Any], path: Path, where: str | None = None,
                  fix: str = "export the run again") -> None:
    """Refuse a weight that is not a tensor or holds NaN or infinity, naming it."""
    for name, value in state.items():
        if not _finite_tensor(value):
            what = "is not a tensor" if not _is_tensor(value) else "holds NaN or infinity"
            raise CheckpointError(f"{where or path}: weight {str(name)[:80]!r} {what}; {fix}")


def bad_token(vocab, cfg) -> str | None:
    """What is wrong with a character-level vocabulary whose tokens are not one character
    each (besides <unk> and data.reserved_tokens), or None."""
    reserved = set(cfg.data.reserved_tokens)
    for i, t in enumerate(vocab.idx_to_token[1:], start=1):
        if len(t) != 1 and t not in reserved:
            what = "is empty" if not t else f"{t[:20]!r} has {len(t)} characters"
            return (f"token {i} {what}, but a character-level vocabulary holds one "
                    "character a token (besides <unk> and data.reserved_tokens)")
    return None


def restore_model(payload: dict[str, Any], path: Path):
    """Rebuild config, vocab and model from a checkpoint, naming any field that disagrees."""
    try:
        cfg = validate(payload["config"], source=f"{path} (field 'config')")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        vocab = vocab_from_dict(payload["vocab"])
    except DataError as e:
        raise CheckpointError(f"checkpoint {path} field 'vocab': {e}") from None
    bad = bad_token(vocab, cfg)
    if bad:
        raise CheckpointError(f"checkpoint {path} field 'vocab': {bad}; use another checkpoint "
                              "or retrain")
    try:
        model = build_model(cfg.model, len(vocab))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} field 'config': {e}") from None
    load_state(model, payload["model"], path)
    return cfg, vocab, model


def load_state(model, state: Any, path: Path) -> None:
    """load_state_dict, with a one-line error naming the first mismatching tensor."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} field 'model' is not a state dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit model '{model.registry_name}' "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); the checkpoint was written for "
            "another model or config")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint {path}: weight '{k}' has shape {tuple(state[k].shape)} but the "
                f"config/vocab give {tuple(v.shape)}; field 'config' or 'vocab' does not "
                "match the weights")
    model.load_state_dict(state)


# ---------------------------------------------------------------- random number generators
# Saved in every checkpoint so a resumed run draws the same numbers as an uninterrupted one.


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global generators' states as plain data (lists and tensors, weights_only-safe)."""
    import random

    import torch

    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
