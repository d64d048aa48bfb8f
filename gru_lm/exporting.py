"""A trained model that leaves gru-lm: its weights as safetensors (with the config, the
vocabulary and a model card, no pickle anywhere), or a one-step ONNX graph
(token, state) -> (log-probs, state) that onnxruntime runs without torch.

    FOLDER/model.safetensors   the weights (metadata: format, model, vocab_size)
    FOLDER/config.json         the run's config (gru_lm.config.Config as JSON)
    FOLDER/vocab.json          the vocabulary ({"idx_to_token": [...]} or {"kind": "bytes"})
    FOLDER/README.md           the model card: data, model, steps, held-out perplexity
    FOLDER/export.json         the files the export wrote, each with its SHA-256: checked
                               when the folder is loaded, and a later export into the
                               folder replaces these files only
    FOLDER/model.onnx          (--format onnx) inputs token (batch,) int64 and the state
                               (h, or h and c: num_layers x batch x num_hiddens), outputs
                               log_probs (batch x vocab_size) and the new state

A safetensors folder loads in gru-lm again (gru_lm.load(FOLDER), `--run FOLDER`); the
packages are the `export` extra (`pip install "gru-lm[export]"`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gru_lm import __version__, cells
from gru_lm.checkpoint import bad_token, check_weights, restore_model
from gru_lm.config import Config, validate
from gru_lm.data import Vocab, vocab_from_dict
from gru_lm.errors import DataError, GruLmError
from gru_lm.models import RecurrentLM
from gru_lm.utils import atomic_write_text, file_digest, remove_stale_staging

WEIGHTS = "model.safetensors"
ONNX = "model.onnx"
CONFIG = "config.json"
VOCAB = "vocab.json"
CARD = "README.md"
MANIFEST = "export.json"  # every file the export wrote, with its SHA-256
MANIFEST_TAG = "gru-lm-export"
FORMATS = ("safetensors", "onnx")
FORMAT_TAG = "gru-lm"  # the safetensors metadata's "format"
OPSET = 18
EXTRA = 'pip install "gru-lm[export]"'


def need(module: str, what: str) -> Any:
    """Import an optional package of the export extra, or say which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise GruLmError(f"{what} needs the package {module.split('.')[0]}, which is not "
                         f"installed; {EXTRA}") from None


def is_export(path: Path) -> bool:
    """A folder `gru-lm export` wrote (either format), or what is left of one: an export
    never holds a run's config.yaml."""
    if (path / "config.yaml").exists():
        return False
    return (any((path / n).is_file() for n in (MANIFEST, WEIGHTS, ONNX))
            or all((path / n).is_file() for n in (CONFIG, VOCAB)))


def export_weights(folder: Path) -> Path:
    """The weights gru-lm loads from the export `folder`, or why it has none."""
    if (folder / WEIGHTS).is_file():
        return folder / WEIGHTS
    if (folder / ONNX).is_file():
        raise GruLmError(f"{folder} is an ONNX export ({ONNX}), which gru-lm does not run: "
                         "sample from it with onnxruntime (examples/onnx_sample.py in gru-lm's "
                         f"repository: python examples/onnx_sample.py {folder} \"time "
                         "traveller\"), or export the run with --format safetensors for "
                         "predict, evaluate, gates and serve")
    raise GruLmError(f"{folder} is a gru-lm export without its weights ({WEIGHTS} is "
                     f"missing); export the run again: gru-lm export RUN --out {folder}")


# ---------------------------------------------------------------- the manifest
# export.json lists every file the export wrote with its SHA-256: the loader checks the
# files it reads against it (as a checkpoint's .sha256), and a later export into the same
# folder replaces those files only, and only while they are as written.


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: file_digest(p, "sha256") for p in sorted(folder.iterdir()) if p.is_file()}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """export.json of `folder` (None when there is none), checked to be one gru-lm wrote."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_bytes()[:1 << 20].decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raw = None
    files = raw.get("files") if isinstance(raw, dict) else None
    previous = raw.get("previous", {}) if isinstance(raw, dict) else None
    if not (isinstance(raw, dict) and raw.get("format") == MANIFEST_TAG
            and all(_name_digest(x) for x in (files, previous))):
        raise GruLmError(f"{path} is damaged (not the list of files gru-lm export wrote); "
                         "export the run again into a new folder")
    return raw


def _name_digest(x: Any) -> bool:
    """A mapping of plain file names to SHA-256 hex digests."""
    return isinstance(x, dict) and all(
        isinstance(k, str) and k == Path(k).name and k not in ("", ".", "..")
        and isinstance(v, str) and len(v) == 64 and set(v) <= HEX for k, v in x.items())


HEX = set("0123456789abcdef")


def _write_manifest(folder: Path, fmt: str, files: dict[str, str],
                    previous: dict[str, str] | None = None) -> None:
    manifest: dict[str, Any] = {"format": MANIFEST_TAG, "version": 1, "export": fmt,
                                "gru_lm": __version__, "files": files}
    if previous:  # (while files are being replaced: theirs are still this export's)
        manifest["previous"] = previous
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------- writing


STAGING = ".gru-lm-export-"  # the prefix of the folders an export is written into first


def _ours(out: Path, names: set[str]) -> dict[str, str]:
    """The files of an earlier export in the existing folder `out` that this export may
    replace or remove (name -> SHA-256): those its export.json lists, unchanged since.
    Anything else stays; refused: a folder with other files and no earlier export, and a
    file this export would write that is not the earlier export's."""
    manifest = read_manifest(out)
    listed: dict[str, set[str]] = {}
    for part in ("files", "previous"):
        for k, v in (manifest or {}).get(part, {}).items():
            listed.setdefault(k, set()).add(v)
    ours, foreign = {}, []
    for p in sorted(out.iterdir()):
        if p.name == MANIFEST or (p.name.startswith(STAGING) and p.is_dir()):
            continue
        digest = file_digest(p, "sha256") if p.name in listed and p.is_file() else None
        if digest is not None and digest in listed[p.name]:
            ours[p.name] = digest
        else:
            foreign.append(p.name)
    if manifest is None and foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise GruLmError(f"--out {out} holds files gru-lm export did not write ({shown}); "
                         "give a new or empty folder, or move them away")
    clash = sorted(names & set(foreign))
    if clash:
        raise GruLmError(f"--out {out}: {clash[0]} there was not written by gru-lm export, "
                         "or was changed since; move it away (or give another --out), the "
                         "export would replace it")
    return ours


@contextmanager
def _staged(out: Path, fmt: str, names: set[str]):
    """A folder to write the export's files (`names`) into, published to `out` with their
    manifest once every one is written. A new `out` is the staged folder renamed (an
    interrupted export leaves nothing); an existing one must be empty or hold an earlier
    export, whose files are replaced (the manifest accepts old and new while they are) and
    whose folder keeps everything else."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise GruLmError(f"--out {out} is a symbolic link to nothing; remove it or give "
                         "another folder")
    if out.exists() and not out.is_dir():
        raise GruLmError(f"--out {out} is a file; give a folder to write the export into")
    new = not out.exists()
    if new:
        parent = Path(os.path.abspath(out)).parent
        parent.mkdir(parents=True, exist_ok=True)
        ours: dict[str, str] = {}
    else:
        parent = out
        ours = _ours(out, names | {MANIFEST})
        remove_stale_staging(out, STAGING)
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # (mkdtemp and the writers make them private)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        files = _digests(tmp)
        if new:
            _write_manifest(tmp, fmt, files)
            tmp.rename(out)
            return
        _ours(out, set(files) | {MANIFEST})  # (checked again: the files actually written)
        _write_manifest(out, fmt, files, previous=ours)
        for name in files:
            os.replace(tmp / name, out / name)
        for name in set(ours) - set(files):  # (an earlier export's files this one has not)
            (out / name).unlink(missing_ok=True)
        _write_manifest(out, fmt, files)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_export(fmt: str, out: Path, cfg: Config, vocab: Vocab, model: RecurrentLM,
                 card: str) -> list[Path]:
    """Write `fmt` into the folder `out` (created, or an empty folder, or an earlier export's
    whose files are replaced); the files written."""
    if fmt not in FORMATS:
        raise GruLmError(f"--format {fmt!r}: give one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        save_file = need("safetensors.torch", "export --format safetensors").save_file
    else:
        need("onnx", "export --format onnx")
        need("onnxscript", "export --format onnx")
    names = {CONFIG, VOCAB, CARD, WEIGHTS if fmt == "safetensors" else ONNX}
    try:
        with _staged(out, fmt, names) as tmp:
            (tmp / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=1,
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
            (tmp / VOCAB).write_text(json.dumps(vocab.to_dict(), ensure_ascii=False) + "\n",
                                     encoding="utf-8")
            (tmp / CARD).write_text(card, encoding="utf-8")
            if fmt == "safetensors":
                # (cloned: tied weights share storage, which safetensors does not write twice)
                state = {k: v.detach().clone().contiguous().cpu()
                         for k, v in model.state_dict().items()}
                save_file(state, str(tmp / WEIGHTS), metadata={
                    "format": FORMAT_TAG, "model": cfg.model.name,
                    "vocab_size": str(len(vocab))})
            else:
                write_onnx(model, tmp / ONNX)
    except OSError as e:
        raise GruLmError(f"cannot write the export into {out}: {e.strerror or e}; check the "
                         "folder's permissions and free space") from None
    files = read_manifest(Path(out))["files"]  # type: ignore[index]
    return [Path(out) / name for name in sorted([*files, MANIFEST])]


class OneStep(nn.Module):
    """One step of a model as a graph: (token (batch,), *state) -> (log_probs (batch,
    vocab_size), *new state); the state is one tensor (h) or two (h, c), each (num_layers,
    batch, num_hiddens)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, *state: torch.Tensor):
        st: Any = state[0] if len(state) == 1 else tuple(state)
        logits, new = self.model(token.unsqueeze(1), st)
        logp = logits[:, -1].float().log_softmax(-1)
        return (logp, *(new if isinstance(new, tuple) else (new,)))


def state_names(n: int) -> list[str]:
    return ["h"] if n == 1 else ["h", "c"]


def write_onnx(model: RecurrentLM, path: Path) -> None:
    """The one-step graph of `model`, batch dynamic, run by the portable loops (the fused
    CPU kernels are not ONNX operators)."""
    model.eval()
    state = model.begin_state(2, "cpu")
    states = list(state) if isinstance(state, tuple) else [state]
    names = state_names(len(states))
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {"token": {0: batch}, "state": tuple({1: batch} for _ in states)}
    token = torch.zeros(2, dtype=torch.long)
    with torch.no_grad(), cells.portable_loops(), _quiet():
        try:
            program = torch.onnx.export(
                OneStep(model).eval(), (token, *states), dynamo=True, opset_version=OPSET,
                input_names=["token", *names], output_names=["log_probs", *(
                    f"{n}_out" for n in names)], dynamic_shapes=shapes,
                verbose=False)
        except Exception as e:  # (the exporter's own errors: a model it cannot trace)
            raise GruLmError(f"the ONNX exporter failed on model '{model.registry_name}': "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    assert program is not None  # (dynamo=True returns the program)
    program.save(str(path))


@contextmanager
def _quiet():
    """The exporter's warnings and log lines (optional packages it skips, deprecations) kept
    off the user's terminal: what matters, a failure, is raised."""
    import logging
    import warnings

    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


# ---------------------------------------------------------------- reading


def load_export(folder: Path):
    """config, vocabulary and model (eval mode) of a safetensors export; every file checked
    (against the SHA-256 in export.json, weights finite, one character a token), a bad one
    named."""
    folder = Path(folder)
    load_file = need("safetensors.torch", f"loading {folder}").load_file
    again = f"export the run again: gru-lm export RUN --out {folder}"
    manifest = read_manifest(folder)
    if manifest is None:
        raise GruLmError(f"{folder} has no {MANIFEST} (the SHA-256 of each file gru-lm export "
                         f"wrote), so its integrity cannot be checked; {again}")
    for name in (CONFIG, VOCAB):
        if not (folder / name).is_file():
            raise GruLmError(f"{folder} has {WEIGHTS} but no {name}; {again}")
    try:
        raw_cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        raw_vocab = json.loads((folder / VOCAB).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise GruLmError(f"{folder}: {CONFIG} or {VOCAB} is not valid JSON ({e}); "
                         f"{again}") from None
    try:
        cfg = validate(raw_cfg, source=str(folder / CONFIG))
        vocab = vocab_from_dict(raw_vocab)
    except DataError as e:
        raise GruLmError(f"{folder / VOCAB}: {e}; {again}") from None
    bad = bad_token(vocab, cfg)
    if bad:
        raise GruLmError(f"{folder / VOCAB}: {bad}; the file was edited or damaged, {again}")
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:  # (safetensors' own errors: a damaged file)
        raise GruLmError(f"{folder / WEIGHTS} is not a readable safetensors file "
                         f"({type(e).__name__}: {str(e)[:160]}); {again}") from None
    check_weights(state, folder / WEIGHTS, fix=again)
    for name in (WEIGHTS, CONFIG, VOCAB):
        if file_digest(folder / name, "sha256") != manifest["files"].get(name):
            raise GruLmError(f"{folder / name} is damaged or was changed since it was "
                             f"exported (its SHA-256 does not match {MANIFEST}); {again}")
    # (the checkpoint's own checks: a config, vocabulary or tensor that disagrees is named)
    _, _, model = restore_model({"config": raw_cfg, "vocab": raw_vocab, "model": state},
                                folder / WEIGHTS)
    return cfg, vocab, model.eval()


# ---------------------------------------------------------------- the model card


def model_card(name: str, cfg: Config, vocab: Vocab, params: int,
               summary: dict[str, Any] | None, fmt: str, source: Path) -> str:
    """README.md of an export: what the model is, what it was trained on, how well it does on
    held-out text, and how to load it."""
    d, m, s = cfg.data, cfg.model, summary or {}

    def num(key: str, fmt_: str = ",.2f") -> str:
        v = s.get(key)
        return format(v, fmt_) if isinstance(v, int | float) else "not recorded"

    lines = [
        f"# {name}: a character-level language model trained with gru-lm", "",
        f"- model: {m.name}, {m.num_layers} layer(s) of {m.num_hiddens} units, "
        f"{params:,} parameters, {'adaptive' if m.softmax == 'adaptive' else 'full'} softmax",
        f"- data: {d.text_name} (preset {d.preset}, script {d.script}), a vocabulary of "
        f"{len(vocab):,} tokens; contiguous train/val/test split "
        f"{d.train_fraction:g}/{d.val_fraction:g}/{d.test_fraction:g}",
        f"- training: {num('steps', ',')} steps of {cfg.train.batch_size} x "
        f"{cfg.train.num_steps} tokens, seed {cfg.train.seed}, "
        f"{num('train_time_s', ',.0f')} s on {s.get('device', 'an unrecorded device')}",
        f"- held-out perplexity per token, scored as one stream: val {num('best_val_ppl')}, "
        f"test {num('best_test_ppl')} (uniform: {len(vocab) - 1:,}; unigram: "
        f"{num('unigram_ppl')})",
        f"- exported from {source} by gru-lm {__version__}", "",
    ]
    if fmt == "safetensors":
        lines += [
            "## Load it", "",
            "With gru-lm: `gru-lm predict \"...\" --run THIS_FOLDER`, or in Python",
            "`gru_lm.load(\"THIS_FOLDER\").predict(\"...\")`.", "",
            "With plain torch (no pickle: safetensors and JSON only):", "",
            "```python",
            "import json",
            "from safetensors.torch import load_file",
            f"weights = load_file(\"{WEIGHTS}\")          # name -> tensor",
            f"config = json.load(open(\"{CONFIG}\"))     # config[\"model\"]: the architecture",
            f"tokens = json.load(open(\"{VOCAB}\"))[\"idx_to_token\"]  # id -> character",
            "```", "",
        ]
    else:
        lines += [
            "## Run it", "",
            f"`{ONNX}` is one step: inputs `token` (batch,) int64 and the state "
            "(`h`, or `h` and `c`: num_layers x batch x num_hiddens, zeros to begin); outputs "
            "`log_probs` (batch x vocab_size) and the state after the token. "
            "`examples/onnx_sample.py` in gru-lm samples from it with onnxruntime and numpy "
            f"only; `{VOCAB}` maps ids to characters.", "",
        ]
    return "\n".join(lines)
