"""The one interface every model has (RecurrentLM), and the registry the models join.

Every model: forward(X, state) -> (logits, state), X (batch_size, num_steps) int64,
logits (batch_size, num_steps, vocab_size); begin_state(batch_size, device). Each model
implements forward_features(X, state) -> (logits, state, features), the features being its
last layer's outputs (batch_size, num_steps, num_hiddens), which a continuous cache keys on.

A model family is one module (scratch.py: the book's equations; torchnn.py: torch.nn's
layers) whose classes join the registry with @register_model; models.py imports the
families and builds a model by its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gru_lm.cells import TorchPath
from gru_lm.config import ModelConfig
from gru_lm.errors import GruLmError

State = Tensor | tuple[Tensor, ...]

# Config keys that only some models take (the ModelConfig fields marked as options); each
# model lists the ones it takes in `options`.
OPTIONS = tuple(k for k, f in ModelConfig.model_fields.items()
                if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("option"))

_REGISTRY: dict[str, type[RecurrentLM]] = {}


def register_model(name: str) -> Callable[[type[RecurrentLM]], type[RecurrentLM]]:
    """Class decorator: make a model buildable by its stable config name."""

    def deco(cls: type[RecurrentLM]) -> type[RecurrentLM]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def detach_state(state: State) -> State:
    """Cut the graph between TBPTT windows, for a tensor or a tuple of tensors."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def keep_mask(shape: tuple[int, ...], keep: float, like: Tensor) -> Tensor:
    """A random mask of 1/keep (probability `keep`) and 0, in like's dtype and device.

    On the CPU, each entry compares 16 random bits from torch.randint's 64-bit draws, so
    `keep` is rounded to a multiple of 1/65536: a 512 x 1536 mask takes 1.4 ms instead of
    bernoulli_'s 11 ms (2 cores of an AMD EPYC). It draws from torch's default generator,
    like bernoulli_, so seeds, checkpoints and resumes cover it. Elsewhere: bernoulli_.
    """
    if like.device.type != "cpu":
        return like.new_empty(shape).bernoulli_(keep).div_(keep)
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    threshold = min(round(keep * 65536), 65535) - 32768
    return (bits < threshold).to(like.dtype).mul_(1 / keep)


def sequence_dropout(x: Tensor, p: float, training: bool, locked: bool) -> Tensor:
    """Dropout on (num_steps, batch_size, features); locked: one mask per sequence for all
    steps (Gal & Ghahramani's variational dropout), so a unit is either on or off for the
    whole window instead of flickering from step to step."""
    if not p or not training:
        return x
    shape = (1, x.shape[1], x.shape[2]) if locked else tuple(x.shape)
    return x * keep_mask(shape, 1 - p, x)


def embedding_dropout(E: Tensor, p: float, training: bool) -> Tensor:
    """Drop whole rows of an embedding (a character, wherever it occurs), training only."""
    if not p or not training:
        return E
    return E * keep_mask((E.shape[0], 1), 1 - p, E)  # (vocab_size, 1)


def drop_weight(W: Tensor, p: float, training: bool) -> Tensor:
    """DropConnect (AWD-LSTM's weight drop): zero entries of a weight matrix, training only."""
    return W * keep_mask(tuple(W.shape), 1 - p, W) if p and training else W


def state_to(state: State, device: torch.device | str) -> State:
    """Move a tensor or a tuple of tensors (an LSTM's (H, C)) to `device`."""
    if isinstance(state, tuple):
        return tuple(s.to(device) for s in state)
    return state.to(device)


def init_weight(w: Tensor, scheme: str, recurrent: bool, fan_in: int) -> None:
    """Initialise one weight by model.init's scheme (d2l: N(0, 0.01); torch: its RNNs'
    uniform(+-1/sqrt(fan_in)))."""
    if scheme == "d2l":
        nn.init.normal_(w, std=0.01)
    elif scheme == "xavier":
        nn.init.xavier_uniform_(w)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(w) if recurrent else nn.init.xavier_uniform_(w)
    else:  # torch's default for its RNNs
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(w, -bound, bound)


def tie_weights_problems(cfg: ModelConfig) -> list[str]:
    """model.tie_weights needs an embedding as wide as the output layer's input."""
    if cfg.tie_weights and cfg.embed_dim != cfg.num_hiddens:
        return [f"model.tie_weights: the output layer can reuse the embedding only when "
                f"model.embed_dim ({cfg.embed_dim}) = model.num_hiddens ({cfg.num_hiddens}); "
                f"set model.embed_dim={cfg.num_hiddens}"]
    return []


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class LayerWeights:
    """One gated layer's weights in one layout, for recomputing its gates (gru_lm.gates).

    x W_x + b_x and H W_h + b_h for every gate block, blocks along the last axis.
    kind "gru": blocks [z | r | h]; reset_after says whether R multiplies (H W_hh + b_hh)
    (torch.nn) or H before W_hh (the book). kind "lstm": blocks [i | f | g | o].
    """

    kind: str
    W_x: Tensor  # (num_inputs, num_gates * num_hiddens); layer 0: rows looked up by token id
    b_x: Tensor  # (num_gates * num_hiddens,)
    W_h: Tensor  # (num_hiddens, num_gates * num_hiddens)
    b_h: Tensor  # (num_gates * num_hiddens,)
    reset_after: bool = False
    embedding: Tensor | None = None  # torch.nn models: token id -> input vector


class RecurrentLM(nn.Module):
    """The one interface: token ids -> recurrent layers -> dropout -> vocabulary logits."""

    registry_name: str = ""
    description: str = ""
    num_states: int = 1  # 2 for LSTMs: (H, C)
    options: frozenset[str] = frozenset()  # the keys of OPTIONS this model takes

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.num_hiddens = cfg.num_hiddens
        self.num_layers = cfg.num_layers
        self.dropout = cfg.dropout
        self.locked_dropout = cfg.locked_dropout
        self.weight_drop = cfg.weight_drop

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> list[str]:
        """Refuse every option set away from its default that this model does not take."""
        problems = []
        for key in OPTIONS:
            if key in cls.options or getattr(cfg, key) == ModelConfig.model_fields[key].default:
                continue
            takers = [n for n, c in _REGISTRY.items() if key in c.options]
            problems.append(f"model.{key}: only {', '.join(takers)} take(s) it, not "
                            f"'{cls.registry_name}'; remove the key")
        return problems

    num_gates: int = 3  # blocks of the recurrent weight: 3 GRU, 4 LSTM, 1 RNN

    @property
    def kernels(self) -> TorchPath:
        """The code that runs the recurrence (gru_lm/cells.py): its name for the run header
        and summary.json (`kernels.path(device, precision)`) and its bf16 timing
        (`kernels.bf16_speed(batch_size)`)."""
        return TorchPath(self.num_gates, self.num_hiddens)

    def begin_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.num_layers, batch_size, self.num_hiddens)
        dtype = next(self.parameters()).dtype
        zeros = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.num_states)]
        return zeros[0] if self.num_states == 1 else tuple(zeros)

    def forward(self, X: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        logits, state, _ = self.forward_features(X, state)
        return logits, state

    def forward_features(self, X: Tensor, state: State | None = None
                         ) -> tuple[Tensor, State, Tensor]:
        """forward, plus the last layer's outputs before the output dropout (batch_size,
        num_steps, num_hiddens)."""
        raise NotImplementedError

    def gate_weights(self) -> list:
        """Per-layer weights in the canonical layout of gru_lm.gates (gated models only)."""
        raise GruLmError(f"model '{self.registry_name}' has no gates to show; `gru-lm gates` "
                         "works with gru-scratch, gru, lstm-scratch, lstm and mogrifier runs")






