"""The one interface every model has (RecurrentLM), and the registry the models join.

Every model: forward(X, state) -> (logits, state), X (batch_size, num_steps) int64,
logits (batch_size, num_steps, vocab_size); forward(X, state, targets=Y) -> (loss, state),
the mean log-loss of Y (what training minimises, cheaper than the logits with an adaptive
softmax); forward_features(X, state) -> (logits, state, features), the features being its
last layer's outputs (batch_size, num_steps, num_hiddens), which a continuous cache keys on;
begin_state(batch_size, device). A family implements hidden(X, state) (everything up to the
output layer) and, for the full softmax, logits(out).

A model family is one module (scratch.py: the book's equations; torchnn.py: torch.nn's
layers) whose classes join the registry with @register_model; models.py imports the
families and builds a model by its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gru_lm.cells import TorchPath
from gru_lm.config import MODEL_OPTIONS, ModelConfig
from gru_lm.errors import GruLmError

State = Tensor | tuple[Tensor, ...]


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


def time_major_loss(logits: Tensor, Y: Tensor, reduction: str = "mean",
                    ignore_index: int = -100) -> Tensor:
    """Cross-entropy over every token, read in (num_steps, batch_size) order.

    The models compute time-major and hand back a transposed view, so reading it time-major
    costs no copy of the logits (only of the small target tensor).
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits.transpose(0, 1).reshape(-1, V).float(), Y.t().reshape(-1),
                           reduction=reduction, ignore_index=ignore_index)


# The adaptive softmax's clusters start at these frequency ranks (the vocabulary is ordered by
# frequency): on 全唐诗 the head's 250 characters are 57% of the text, 1,000 84%, 4,000 99%.
DEFAULT_CUTOFFS = (250, 1000, 4000)
ADAPTIVE_DIV = 4.0  # each cluster's rows are 4x narrower than the one before (torch's default)


def adaptive_cutoffs(cfg: ModelConfig, vocab_size: int) -> list[int]:
    """The clusters' first ranks that fall inside this vocabulary ([]: a full softmax)."""
    if cfg.softmax != "adaptive":
        return []
    return [c for c in (cfg.cutoffs or DEFAULT_CUTOFFS) if c < vocab_size]


class AdaptiveOutput(nn.AdaptiveLogSoftmaxWithLoss):
    """The adaptive softmax (Grave et al., 2017) as an output layer: the frequent tokens and
    one entry per cluster in a head; a cluster's tokens scored through a narrower projection,
    only for the rows whose target falls in it when training. log_probs gives the exact
    log-distribution over the whole vocabulary (scoring, sampling)."""

    def __init__(self, num_hiddens: int, vocab_size: int, cutoffs: list[int]):
        import warnings

        with warnings.catch_warnings():  # (the zero-wide rows replaced below)
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            super().__init__(num_hiddens, vocab_size, cutoffs, div_value=ADAPTIVE_DIV,
                             head_bias=True)
        for i, size in enumerate(b - a for a, b in zip(self.cutoffs, self.cutoffs[1:],
                                                          strict=False)):
            if num_hiddens // ADAPTIVE_DIV ** (i + 1) < 1:  # a small model's last clusters
                self.tail[i] = nn.Sequential(nn.Linear(num_hiddens, 1, bias=False),
                                             nn.Linear(1, size, bias=False))

    def log_probs(self, out: Tensor) -> Tensor:
        """(num_steps, batch_size, num_hiddens) -> (num_steps, batch_size, vocab_size)."""
        T, B, H = out.shape
        with torch.autocast(out.device.type, enabled=False):
            return self.log_prob(out.reshape(T * B, H).float()).view(T, B, -1)

    def nll(self, out: Tensor, Y: Tensor) -> Tensor:
        """Mean log-loss of the targets Y (num_steps, batch_size; -100: not scored). Every
        cluster takes part (0 x its weights when no target falls in it), so each weight has
        a gradient at every step, as distributed training needs."""
        H = out.shape[-1]
        flat, targets = out.reshape(-1, H).float(), Y.reshape(-1)
        keep = targets >= 0
        with torch.autocast(out.device.type, enabled=False):
            loss = self(flat[keep], targets[keep]).loss
        touch = sum(p.view(-1)[0] for p in self.tail.parameters())
        return loss + 0.0 * touch


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class LayerWeights:
    """One gated layer's weights in one layout, for recomputing its gates (trace_gates).

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


@dataclass
class GateTrace:
    """A layer's gates at every token of a text, as `gru-lm gates` shows them: the family's
    kind, each gate's values in [0, 1], the layer's outputs H and how far each step moved
    them, a title for each gate and a sentence on how to read them."""

    kind: str
    gates: dict[str, Tensor]  # name -> (num_chars, num_hiddens)
    H: Tensor  # (num_chars, num_hiddens)
    delta_H: Tensor  # (num_chars,) ||H_t - H_{t-1}||
    titles: dict[str, str]
    how: str

    @classmethod
    def of(cls, kind: str, gates: dict[str, Tensor], H: Tensor, titles: dict[str, str],
           how: str) -> GateTrace:
        return cls(kind, gates, H, _delta(H), titles, how)


# The book's cells: their gates' names and titles, and how to read them.
BOOK_GATES = {"gru": {"Z": "update gate Z", "R": "reset gate R"},
              "lstm": {"I": "input gate I", "F": "forget gate F", "O": "output gate O"}}
BOOK_HOW = {"gru": "Z near 1 keeps the old state, R near 0 forgets it.",
            "lstm": "F near 1 keeps the cell state, I lets new input in."}


@torch.no_grad()
def trace_gates(layers: list[LayerWeights], ids: list[int], layer: int) -> GateTrace:
    """The book's cells (LayerWeights): `ids` through layers 0..layer from a zero state, one
    token at a time; the gates of `layer`."""
    check_layer(layer, len(layers))
    X = torch.tensor(ids)
    inputs: Tensor | None = None
    for w in layers[: layer + 1]:
        if inputs is None:  # the first layer reads token ids
            x = w.embedding[X] @ w.W_x if w.embedding is not None else w.W_x[X]
        else:
            x = inputs @ w.W_x
        P = x + w.b_x  # (num_chars, G * num_hiddens)
        nh = w.W_h.shape[0]
        H = torch.zeros(nh, dtype=P.dtype)
        C = torch.zeros(nh, dtype=P.dtype)
        outs: list[Tensor] = []
        rec: dict[str, list[Tensor]] = {name: [] for name in BOOK_GATES[w.kind]}
        for p in P:
            if w.kind == "gru":
                A = H @ w.W_h + w.b_h
                Z = torch.sigmoid(p[:nh] + A[:nh])
                R = torch.sigmoid(p[nh:2 * nh] + A[nh:2 * nh])
                if w.reset_after:
                    H_tilde = torch.tanh(p[2 * nh:] + R * A[2 * nh:])
                else:
                    H_tilde = torch.tanh(p[2 * nh:] + (R * H) @ w.W_h[:, 2 * nh:]
                                         + w.b_h[2 * nh:])
                H = Z * H + (1 - Z) * H_tilde
                rec["Z"].append(Z)
                rec["R"].append(R)
            else:
                A = p + H @ w.W_h + w.b_h
                i, f = torch.sigmoid(A[:nh]), torch.sigmoid(A[nh:2 * nh])
                g, o = torch.tanh(A[2 * nh:3 * nh]), torch.sigmoid(A[3 * nh:])
                C = f * C + i * g
                H = o * torch.tanh(C)
                rec["I"].append(i)
                rec["F"].append(f)
                rec["O"].append(o)
            outs.append(H)
        inputs = torch.stack(outs)  # (num_chars, num_hiddens)
    assert inputs is not None  # (layer is in range: at least one layer ran)
    return GateTrace.of(w.kind, {k: torch.stack(v) for k, v in rec.items()}, inputs,
                        BOOK_GATES[w.kind], BOOK_HOW[w.kind])


def check_layer(layer: int, count: int) -> None:
    if not 0 <= layer < count:
        raise GruLmError(f"--layer {layer} is out of range; the model has {count} layer(s): "
                         f"0..{count - 1}")


def _delta(H: Tensor) -> Tensor:
    """||H_t - H_{t-1}|| at every step (H_{-1} = 0)."""
    return (H - torch.cat([torch.zeros_like(H[:1]), H[:-1]])).norm(dim=-1)


class RecurrentLM(nn.Module):
    """The one interface: token ids -> recurrent layers -> dropout -> vocabulary logits."""

    registry_name: str = ""
    description: str = ""
    num_states: int = 1  # 2 for LSTMs: (H, C)
    options: frozenset[str] = frozenset()  # the keys of MODEL_OPTIONS this model takes

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.num_hiddens = cfg.num_hiddens
        self.num_layers = cfg.num_layers
        self.dropout = cfg.dropout
        self.locked_dropout = cfg.locked_dropout
        self.weight_drop = cfg.weight_drop
        # The output layer: an adaptive softmax, or (None) the family's own full one.
        cutoffs = adaptive_cutoffs(cfg, vocab_size)
        self.adaptive = AdaptiveOutput(cfg.num_hiddens, vocab_size, cutoffs) if cutoffs \
            else None

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> list[str]:
        """Refuse every option set away from its default that this model does not take."""
        problems = []
        if cfg.tie_weights and cfg.softmax == "adaptive":
            problems.append("model.tie_weights: the adaptive softmax has no one output matrix "
                            "to share with the embedding; drop one of the two")
        for key in MODEL_OPTIONS:
            if key in cls.options or getattr(cfg, key) == ModelConfig.model_fields[key].default:
                continue
            takers = [n for n, c in _REGISTRY.items() if key in c.options]
            problems.append(f"model.{key}: only {', '.join(takers)} take(s) it, not "
                            f"'{cls.registry_name}'; remove the key")
        return problems

    num_gates: int = 3  # blocks of the recurrent weight: 3 GRU, 4 LSTM, 1 RNN

    @property
    def output_layer(self) -> str:
        """The output layer in words, for the run header and summary.json."""
        if self.adaptive is None:
            return "full softmax"
        cuts = self.adaptive.cutoffs  # [head size, ..., vocab_size]
        clusters = ", ".join(f"{a:,}-{b:,}" for a, b in zip(cuts, cuts[1:], strict=False))
        return f"adaptive softmax ({cuts[0]:,} tokens in the head; clusters {clusters})"

    def output_note(self) -> str:
        """What the run should be told about its output layer ("" : nothing): that
        model.softmax=adaptive found no cutoff inside the vocabulary."""
        if self.cfg.softmax != "adaptive" or self.adaptive is not None:
            return ""
        cuts = ", ".join(f"{c:,}" for c in (self.cfg.cutoffs or DEFAULT_CUTOFFS))
        return (f"model.softmax=adaptive: no cutoff ({cuts}) falls inside the vocabulary of "
                f"{self.vocab_size:,} tokens, so the output layer is the full softmax (as "
                "fast here); lower model.cutoffs for clusters")

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

    def forward(self, X: Tensor, state: State | None = None, targets: Tensor | None = None
                ) -> tuple[Tensor, State]:
        """(logits, state); with `targets` (batch_size, num_steps; -100: not scored), (the
        mean log-loss of the targets, state) instead."""
        out, state, _ = self.hidden(X, state)
        if targets is not None:
            if self.adaptive is not None:
                return self.adaptive.nll(out, targets.t()), state
            return time_major_loss(self.logits(out).transpose(0, 1), targets), state
        return self.readout(out), state

    def forward_features(self, X: Tensor, state: State | None = None
                         ) -> tuple[Tensor, State, Tensor]:
        """forward, plus the last layer's outputs before the output dropout (batch_size,
        num_steps, num_hiddens)."""
        out, state, features = self.hidden(X, state)
        return self.readout(out), state, features

    def readout(self, out: Tensor) -> Tensor:
        """The output layer on (num_steps, batch_size, num_hiddens): (batch_size, num_steps,
        vocab_size) logits (the adaptive softmax's are log-probabilities)."""
        scores = self.logits(out) if self.adaptive is None else self.adaptive.log_probs(out)
        return scores.transpose(0, 1)

    def hidden(self, X: Tensor, state: State | None = None) -> tuple[Tensor, State, Tensor]:
        """Everything before the output layer: the last layer's outputs after the output
        dropout (num_steps, batch_size, num_hiddens), the state, and the features."""
        raise NotImplementedError

    def logits(self, out: Tensor) -> Tensor:
        """The full softmax's logits of (num_steps, batch_size, num_hiddens) outputs,
        (num_steps, batch_size, vocab_size)."""
        raise NotImplementedError

    def gate_trace(self, ids: list[int], layer: int) -> GateTrace:
        """Layer `layer`'s gates at every token of `ids`, read one token at a time from a
        zero state (what `gru-lm gates` shows): the book's cells recompute them from
        gate_weights(); a family with other gates overrides this."""
        return trace_gates(self.gate_weights(), ids, layer)

    def gate_weights(self) -> list[LayerWeights]:
        """Per-layer weights in the one layout of LayerWeights (the book's gated cells)."""
        raise GruLmError(f"model '{self.registry_name}' has no gates to show; `gru-lm gates` "
                         "works with gru-scratch, gru, lstm-scratch, lstm and mogrifier runs")






