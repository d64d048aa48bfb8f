"""Sample from a model exported by `gru-lm export RUN --format onnx --out FOLDER`, with
onnxruntime and numpy only (no torch, no gru-lm):

    pip install onnxruntime numpy
    python examples/onnx_sample.py FOLDER "time traveller" --num-chars 100 --temperature 0.6

FOLDER holds model.onnx (one step: token, state -> log_probs, state), vocab.json and
config.json. The prefix is prepared as the run's corpus was (data.preset d2l: letters
lowercased, anything else one space; raw: as it is; bytes: its UTF-8 bytes); script
conversion (data.script) is left to you."""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
import onnxruntime as ort


def prepare(text: str, data: dict) -> list[str]:
    """The prefix as tokens, as gru-lm's preprocessing makes them."""
    preset = data.get("preset", "d2l")
    if preset == "d2l":
        lines = (re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.split("\n"))
        return list("".join(lines))
    if preset == "bytes":
        return list(text.encode("utf-8").decode("latin-1"))
    text = unicodedata.normalize("NFC", text)
    return list(text.lower() if data.get("lowercase") else text)


class Model:
    """The exported step, its vocabulary and a zero state."""

    def __init__(self, folder: Path):
        self.session = ort.InferenceSession(str(folder / "model.onnx"),
                                            providers=["CPUExecutionProvider"])
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        self.bytes = vocab.get("kind") == "bytes"
        self.tokens = [chr(b) for b in range(256)] if self.bytes else vocab["idx_to_token"]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.data = json.loads((folder / "config.json").read_text(encoding="utf-8"))["data"]
        self.inputs = self.session.get_inputs()  # token, then h (and c for an LSTM)

    def begin_state(self, batch: int) -> list[np.ndarray]:
        layers, hiddens = (self.inputs[1].shape[0], self.inputs[1].shape[2])
        return [np.zeros((layers, batch, hiddens), np.float32) for _ in self.inputs[1:]]

    def step(self, tokens: np.ndarray, state: list[np.ndarray]):
        """log-probabilities of the next token (batch, vocab_size), and the new state."""
        feed = {"token": tokens.astype(np.int64)}
        feed.update({i.name: s for i, s in zip(self.inputs[1:], state, strict=True)})
        log_probs, *state = self.session.run(None, feed)
        return log_probs, state

    def decode(self, ids: list[int]) -> str:
        if self.bytes:
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.tokens[i] for i in ids)


def sample(model: Model, prefix: str, num_chars: int, temperature: float | None,
           seed: int) -> str:
    """The prefix's continuation: sampled at `temperature` (None: greedy)."""
    tokens = prepare(prefix, model.data)
    unknown = sorted({t for t in tokens if t not in model.index})
    if unknown or not tokens:
        raise SystemExit(f"error: the prefix has characters outside the vocabulary: "
                         f"{''.join(unknown)!r}" if unknown else "error: the prefix is empty")
    rng = np.random.default_rng(seed)
    state = model.begin_state(1)
    for t in tokens:  # read the prefix
        log_probs, state = model.step(np.array([model.index[t]]), state)
    out: list[int] = []
    for _ in range(num_chars):
        logits = log_probs[0].astype(np.float64)
        if not model.bytes:
            logits[0] = -np.inf  # never <unk>
        if temperature is None:
            nxt = int(np.argmax(logits))
        else:
            p = np.exp((logits - logits.max()) / temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        out.append(nxt)
        log_probs, state = model.step(np.array([nxt]), state)
    return model.decode(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="what gru-lm export --format onnx wrote")
    ap.add_argument("prefix", help="text to continue")
    ap.add_argument("--num-chars", "-n", type=int, default=50, help="characters to write")
    ap.add_argument("--temperature", type=float, default=0.6,
                    help="above 0: lower is more conservative")
    ap.add_argument("--greedy", action="store_true", help="the likeliest character each time")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.num_chars < 1:
        raise SystemExit(f"error: --num-chars {args.num_chars}: give how many characters to "
                         "write, 1 or more")
    if not (args.temperature > 0 and np.isfinite(args.temperature)):
        raise SystemExit(f"error: --temperature {args.temperature:g}: give a number above 0 "
                         "(lower is more conservative), or --greedy for the likeliest "
                         "character each time")
    if args.seed < 0:
        raise SystemExit(f"error: --seed {args.seed}: give a number 0 or more")
    if not (args.folder / "model.onnx").is_file():
        raise SystemExit(f"error: {args.folder} has no model.onnx; write one with gru-lm "
                         "export RUN --format onnx --out FOLDER")
    model = Model(args.folder)
    text = sample(model, args.prefix, args.num_chars,
                  None if args.greedy else args.temperature, args.seed)
    sys.stdout.write(args.prefix + text + "\n")


if __name__ == "__main__":
    main()
