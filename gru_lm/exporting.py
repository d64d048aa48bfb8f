"""A trained model that leaves gru-lm: its weights as safetensors (with the config, the
vocabulary and a model card, no pickle anywhere), or a one-step ONNX graph
(token, state) -> (log-probs, state) that onnxruntime runs without torch.

    FOLDER/model.safetensors   the weights (metadata: format, model, vocab_size)
    FOLDER/config.json         the run's config (gru_lm.config.Config as JSON)
    FOLDER/vocab.json          the vocabulary ({"idx_to_token": [...]} or {"kind": "bytes"})
    FOLDER/README.md           the model card: data, model, steps, held-out perplexity
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
from gru_lm.checkpoint import restore_model
from gru_lm.config import Config
from gru_lm.data import Vocab
from gru_lm.errors import GruLmError
from gru_lm.models import RecurrentLM

WEIGHTS = "model.safetensors"
ONNX = "model.onnx"
CONFIG = "config.json"
VOCAB = "vocab.json"
CARD = "README.md"
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
    """A folder `gru-lm export --format safetensors` wrote."""
    return (path / WEIGHTS).is_file()


# ---------------------------------------------------------------- writing


@contextmanager
def _staged(out: Path):
    """A folder to write into, renamed to `out` only when everything is written (an
    interrupted export leaves nothing half-written); `out` may exist only as an empty
    folder or an earlier export."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GruLmError(f"--out {out} is a file; give a folder to write the export into")
    if out.is_dir() and any(out.iterdir()) and not (is_export(out) or (out / ONNX).exists()):
        raise GruLmError(f"--out {out} is a folder with other files in it; give a new or "
                         "empty folder (an earlier export there is replaced)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # (mkdtemp and the writers make them private)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}-old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_export(fmt: str, out: Path, cfg: Config, vocab: Vocab, model: RecurrentLM,
                 card: str) -> list[Path]:
    """Write `fmt` into the folder `out` (created, or replaced when it holds an earlier
    export); the files written."""
    if fmt not in FORMATS:
        raise GruLmError(f"--format {fmt!r}: give one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        save_file = need("safetensors.torch", "export --format safetensors").save_file
    else:
        need("onnx", "export --format onnx")
        need("onnxscript", "export --format onnx")
    with _staged(out) as tmp:
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
                "format": FORMAT_TAG, "model": cfg.model.name, "vocab_size": str(len(vocab))})
        else:
            write_onnx(model, tmp / ONNX)
    return sorted(p for p in Path(out).iterdir() if p.is_file())


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
    """config, vocabulary and model (eval mode) of a safetensors export; every file checked,
    a bad one named."""
    folder = Path(folder)
    load_file = need("safetensors.torch", f"loading {folder}").load_file
    for name in (CONFIG, VOCAB):
        if not (folder / name).is_file():
            raise GruLmError(f"{folder} has {WEIGHTS} but no {name}; export the run again "
                             "with gru-lm export RUN --format safetensors")
    try:
        raw_cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        raw_vocab = json.loads((folder / VOCAB).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise GruLmError(f"{folder}: {CONFIG} or {VOCAB} is not valid JSON ({e}); export the "
                         "run again") from None
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:  # (safetensors' own errors: a damaged file)
        raise GruLmError(f"{folder / WEIGHTS} is not a readable safetensors file "
                         f"({type(e).__name__}: {e}); export the run again") from None

    # (the checkpoint's own checks: a config, vocabulary or tensor that disagrees is named)
    cfg, vocab, model = restore_model({"config": raw_cfg, "vocab": raw_vocab, "model": state},
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
