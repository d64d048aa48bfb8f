"""Model registry: from-scratch GRU/LSTM/RNN (the book's equations) and torch.nn wrappers.

Every model: forward(X, state) -> (logits, state), X (batch_size, num_steps) int64,
logits (batch_size, num_steps, vocab_size); begin_state(batch_size, device). Each model
implements forward_features(X, state) -> (logits, state, features), the features being its
last layer's outputs (batch_size, num_steps, num_hiddens), which a continuous cache keys on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gru_lm.cells import (
    GRUFunction,
    GRUResetAfterFunction,
    LSTMFunction,
    RNNFunction,
    autocast_bf16,
    bf16_gemm_report,
    bf16_operands,
)
from gru_lm.config import ModelConfig
from gru_lm.errors import ConfigError, GruLmError
from gru_lm.utils import available_memory

State = Tensor | tuple[Tensor, ...]

# Config keys that only some models take; each model lists the ones it takes in `options`.
OPTIONS = ("reset_after", "forget_bias", "embed_dim", "embed_dropout", "tie_weights")

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


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_class(name: str) -> type[RecurrentLM]:
    if name not in _REGISTRY:
        raise ConfigError(f"model.name: unknown model '{name}'; choose one of "
                          f"{', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_model(cfg: ModelConfig, vocab_size: int) -> RecurrentLM:
    """Build the registered model named by `cfg.name` for a vocabulary of `vocab_size`."""
    cls = model_class(cfg.name)
    problems = cls.check_config(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"a vocabulary of {vocab_size:,} tokens is out of range; "
                          f"1..{MAX_VOCAB:,} are supported")
    check_memory(cfg, cls, vocab_size)
    return cls(cfg, vocab_size)


MAX_VOCAB = 2**20
TRAINING_COPIES = 5  # weights, gradients, two Adam moments, the EMA


def check_memory(cfg: ModelConfig, cls: type[RecurrentLM], vocab_size: int) -> None:
    """Count the parameters on the meta device (no memory) and refuse a model whose training
    copies would not fit, before a single weight is allocated."""
    with torch.device("meta"):
        params = count_parameters(cls(cfg, vocab_size))
    need, have = params * 4 * TRAINING_COPIES, available_memory()  # fp32 copies
    if need > have:
        raise ConfigError(
            f"model.num_hiddens={cfg.num_hiddens} x model.num_layers={cfg.num_layers} with "
            f"{vocab_size:,} tokens makes {params:,} parameters; training needs about "
            f"{need / 2**30:,.1f} GiB but this machine has {have / 2**30:,.1f} GiB free; "
            "lower model.num_hiddens or model.num_layers")


def best_time(fn, work: float, rounds: int = 3) -> float:
    """Seconds of one call of `fn` (best of `rounds` rounds of about 5 ms each, `work` the
    flops of one call, to size the rounds)."""
    import time

    reps = max(1, min(200, round(5e-3 * 20e9 / max(1.0, work))))
    fn()
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def mm_operands(rows: int, n: int, k: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(rows, k, generator=g), torch.rand(k, n, generator=g)


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

    def bf16_speed(self, batch_size: int) -> tuple[float, str]:
        """How fast this model's recurrent products run in bf16 against fp32 on this CPU,
        measured now at its step's shape: (speed ratio, the timings in words). torch.nn:
        torch.mm of bf16 against fp32 tensors."""
        n, k = self.num_gates * self.num_hiddens, self.num_hiddens
        a, b = mm_operands(batch_size, n, k)
        a16, b16 = a.bfloat16(), b.bfloat16()
        work = 2.0 * batch_size * n * k
        fp32 = best_time(lambda: torch.mm(a, b), work)
        bf16 = best_time(lambda: torch.mm(a16, b16), work)
        return fp32 / bf16, (f"torch.mm {batch_size}x{k}x{n}: bf16 {bf16 * 1e3:.3f} ms, "
                             f"fp32 {fp32 * 1e3:.3f} ms")

    def kernel_path(self, device: torch.device | str, precision: str = "fp32") -> str:
        """Which code runs the recurrence here, for the train header and summary.json."""
        return "torch.nn" + (" under bf16 autocast" if precision == "bf16" else "")

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
                         "works with gru-scratch, gru, lstm-scratch and lstm runs")


# ---------------------------------------------------------------- scratch models


def _init_weight(w: Tensor, scheme: str, recurrent: bool, fan_in: int) -> None:
    if scheme == "d2l":
        nn.init.normal_(w, std=0.01)
    elif scheme == "xavier":
        nn.init.xavier_uniform_(w)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(w) if recurrent else nn.init.xavier_uniform_(w)
    else:  # torch's default for its RNNs
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(w, -bound, bound)


class _ScratchLayer(nn.Module):
    """One layer's parameters, named as the book names them; `gates` lists the blocks."""

    gates: tuple[str, ...] = ()

    def __init__(self, num_inputs: int, num_hiddens: int, init: str, weight_drop: float = 0.0):
        super().__init__()
        self.num_inputs, self.num_hiddens = num_inputs, num_hiddens
        self.weight_drop = weight_drop
        for g in self.gates:
            W_x = nn.Parameter(torch.empty(num_inputs, num_hiddens))
            W_h = nn.Parameter(torch.empty(num_hiddens, num_hiddens))
            _init_weight(W_x.data, init, False, num_hiddens)
            _init_weight(W_h.data, init, True, num_hiddens)
            setattr(self, f"W_x{g}", W_x)
            setattr(self, f"W_h{g}", W_h)
            setattr(self, f"b_{g}", nn.Parameter(torch.zeros(num_hiddens)))
        if init == "torch":
            bound = 1 / math.sqrt(num_hiddens)
            for g in self.gates:
                nn.init.uniform_(getattr(self, f"b_{g}"), -bound, bound)

    def _fused(self, prefix: str) -> Tensor:
        parts = [getattr(self, f"{prefix}{g}") for g in self.gates]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def recurrent(self, W: Tensor) -> Tensor:
        """A recurrent weight as this step sees it: DropConnect'ed while training. The cells
        (fused kernels or loops) just receive another matrix; gradients reach W through it."""
        return drop_weight(W, self.weight_drop, self.training)

    def project(self, inputs: Tensor, bf16: bool = False) -> tuple[Tensor, Tensor | None]:
        """X W_x + b for all steps, as (P, ids) for the cell functions.

        Token ids: P is the (vocab_size, G * num_hiddens) table W_x + b and the cell looks
        up its rows (b added to vocab_size rows, not to every step). Vectors: one matmul
        (bf16: of rounded operands).
        """
        W_x, b = self._fused("W_x"), self._fused("b_")
        if inputs.dtype == torch.long:
            return W_x + b, inputs.contiguous()
        T, B, _ = inputs.shape
        r = bf16_operands(bf16)
        return torch.addmm(b, r(inputs.reshape(T * B, -1)), r(W_x)).view(T, B, -1), None


class GRULayer(_ScratchLayer):
    gates = ("z", "r", "h")

    def __init__(self, num_inputs: int, num_hiddens: int, init: str, reset_after: bool,
                 weight_drop: float = 0.0):
        super().__init__(num_inputs, num_hiddens, init, weight_drop)
        self.reset_after = reset_after
        if reset_after:  # b_h acts as b_xh; b_hh sits inside the reset gate
            self.b_hh = nn.Parameter(torch.zeros(num_hiddens))
            if init == "torch":
                bound = 1 / math.sqrt(num_hiddens)
                nn.init.uniform_(self.b_hh, -bound, bound)

    def forward(self, inputs: Tensor, H: Tensor, bf16: bool = False) -> tuple[Tensor, Tensor]:
        P, ids = self.project(inputs, bf16)
        if self.reset_after:
            Y = GRUResetAfterFunction.apply(P, ids, H, self.recurrent(self._fused("W_h")),
                                            self.b_hh, bf16)
        else:
            W_hzr = torch.cat([self.W_hz, self.W_hr], dim=1)  # (num_hiddens, 2 * num_hiddens)
            Y = GRUFunction.apply(P, ids, H, self.recurrent(W_hzr), self.recurrent(self.W_hh),
                                  bf16)
        return Y, Y[-1]


class LSTMLayer(_ScratchLayer):
    gates = ("i", "f", "c", "o")  # the candidate C~ is torch.nn's "g" block

    def __init__(self, num_inputs: int, num_hiddens: int, init: str, forget_bias: float | None,
                 weight_drop: float = 0.0):
        super().__init__(num_inputs, num_hiddens, init, weight_drop)
        if forget_bias is not None:
            nn.init.constant_(self.b_f, forget_bias)

    def forward(self, inputs: Tensor, state: tuple[Tensor, Tensor], bf16: bool = False):
        H, C = state
        Y, C_T = LSTMFunction.apply(*self.project(inputs, bf16), H, C,
                                    self.recurrent(self._fused("W_h")), bf16)
        return Y, (Y[-1], C_T)


class RNNLayer(_ScratchLayer):
    gates = ("h",)

    def forward(self, inputs: Tensor, H: Tensor, bf16: bool = False) -> tuple[Tensor, Tensor]:
        Y = RNNFunction.apply(*self.project(inputs, bf16), H, self.recurrent(self.W_hh), bf16)
        return Y, Y[-1]


class ScratchLM(RecurrentLM):
    """[Embedding E ->] stacked scratch layers -> output layer W_hq, b_q. Without
    model.embed_dim the first layer reads token ids (the book's one-hot inputs)."""

    options = frozenset({"embed_dim", "embed_dropout"})

    def bf16_speed(self, batch_size: int) -> tuple[float, str]:
        """The fused kernels' bf16 GEMM (the kind the step shape chose) against their fp32
        sgemm, on one thread at the rows a thread runs; without the kernels, the loops' fp32
        GEMMs on rounded operands (rounding only adds work)."""
        from gru_lm.cells import (
            GEMM_NAMES,
            _step_rows,
            bf16_operands,
            current,
            gemm_kind,
            timing_reps,
        )

        ext = current().library.load() if current().fused else None
        rows, n, k = _step_rows(batch_size), self.num_gates * self.num_hiddens, self.num_hiddens
        if ext is None:  # the loops: the same fp32 GEMM, after rounding its operands
            a, b = mm_operands(rows, n, k)
            work = 2.0 * rows * n * k
            fp32 = best_time(lambda: torch.mm(a, b), work)
            rounded = bf16_operands(True)
            bf16 = best_time(lambda: torch.mm(rounded(a), rounded(b)), work)
            return fp32 / bf16, (f"the loops' fp32 GEMM on rounded operands {bf16 * 1e3:.3f} "
                                 f"ms against {fp32 * 1e3:.3f} ms at {rows}x{k}x{n}")
        kind = gemm_kind(ext, True, rows, n, k)
        reps = timing_reps(rows, n, k)
        # interleaved, the best of each: another process on the cores slows both alike
        pairs = [(ext.time_gemm(0, rows, n, k, reps), ext.time_gemm(kind, rows, n, k, reps))
                 for _ in range(3)]
        fp32, bf16 = min(p[0] for p in pairs), min(p[1] for p in pairs)
        return fp32 / bf16, (f"{GEMM_NAMES[kind]} {bf16 * 1e3:.3f} ms against fp32 sgemm "
                             f"{fp32 * 1e3:.3f} ms at {rows}x{k}x{n}")

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> list[str]:
        problems = super().check_config(cfg)
        if cfg.embed_dropout and not cfg.embed_dim:
            problems.append(f"model.embed_dropout: '{cls.registry_name}' reads one-hot ids "
                            "unless it has an embedding; set model.embed_dim (e.g. 64) too")
        return problems

    def kernel_path(self, device: torch.device | str, precision: str = "fp32") -> str:
        from gru_lm.cells import current

        rounded = ", GEMM operands rounded to bf16" if precision == "bf16" else ""
        if torch.device(device).type != "cpu":
            return f"portable loops{rounded}: no fused kernels for {torch.device(device).type}"
        k = current()
        if not k.fused:
            return f"portable loops{rounded}: chosen by cells.portable_loops()"
        if k.library.load() is None:
            return f"portable loops{rounded}: {k.library.why}"
        if precision == "bf16":
            return f"fused kernels, bf16 GEMM operands: {bf16_gemm_report()}"
        return "fused kernels"

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        init = "d2l" if cfg.init == "auto" else cfg.init
        self.embedding: nn.Parameter | None = None
        if cfg.embed_dim:  # token id -> a learnt vector, as nn.Embedding (N(0, 1) init)
            self.embedding = nn.Parameter(torch.randn(vocab_size, cfg.embed_dim))
        self.layers = nn.ModuleList(
            self.make_layer((cfg.embed_dim or vocab_size) if i == 0 else cfg.num_hiddens, cfg,
                            init)
            for i in range(cfg.num_layers)
        )
        self.W_hq = nn.Parameter(torch.empty(cfg.num_hiddens, vocab_size))
        _init_weight(self.W_hq.data, init, False, cfg.num_hiddens)
        self.b_q = nn.Parameter(torch.zeros(vocab_size))

    def make_layer(self, num_inputs: int, cfg: ModelConfig, init: str) -> nn.Module:
        raise NotImplementedError

    def input_embedding(self, layer: int) -> Tensor | None:
        """The embedding that turns ids into layer `layer`'s inputs (first layer only)."""
        return self.embedding.detach() if layer == 0 and self.embedding is not None else None

    def layer_states(self, state: State) -> list:
        if isinstance(state, tuple):
            return [tuple(s[i] for s in state) for i in range(self.num_layers)]
        return [state[i] for i in range(self.num_layers)]

    def stack_states(self, states: list) -> State:
        if isinstance(states[0], tuple):
            return tuple(torch.stack(s) for s in zip(*states, strict=True))
        return torch.stack(states)

    def forward_features(self, X: Tensor, state: State | None = None
                         ) -> tuple[Tensor, State, Tensor]:
        # Under bf16 autocast (train.precision=bf16) every GEMM of this model takes bf16-rounded
        # operands and accumulates in fp32, by this model's own code rather than autocast's
        # (whose bf16 matmuls output bf16, and run ~50x slower than fp32 on a CPU without bf16
        # instructions); states and weights stay fp32.
        bf16 = autocast_bf16(X.device.type)
        with torch.autocast(X.device.type, enabled=False):
            return self._forward(X, state, bf16)

    def _forward(self, X: Tensor, state: State | None, bf16: bool
                 ) -> tuple[Tensor, State, Tensor]:
        if state is None:
            state = self.begin_state(X.shape[0], X.device)
        inputs = X.t()  # (num_steps, batch_size) token ids
        if self.embedding is not None:
            E = embedding_dropout(self.embedding, self.cfg.embed_dropout, self.training)
            inputs = F.embedding(inputs, E)  # (num_steps, batch_size, embed_dim)
        new_states = []
        for i, (layer, s) in enumerate(zip(self.layers, self.layer_states(state), strict=True)):
            inputs, s = layer(inputs, s, bf16)  # (num_steps, batch_size, num_hiddens)
            new_states.append(s)
            if i < self.num_layers - 1:
                inputs = sequence_dropout(inputs, self.dropout, self.training,
                                          self.locked_dropout)
        out = sequence_dropout(inputs, self.dropout, self.training, self.locked_dropout)
        # F.linear on W_hq^T: one addmm forward, and its weight gradient comes out as
        # dlogits^T @ out, the faster GEMM orientation for a small vocabulary.
        r = bf16_operands(bf16)
        logits = F.linear(r(out), r(self.W_hq).t(), self.b_q)  # (num_steps, batch, vocab)
        logits = logits.transpose(0, 1)  # (batch_size, num_steps, vocab_size)
        return logits, self.stack_states(new_states), inputs.transpose(0, 1)


@register_model("gru-scratch")
class GRUScratch(ScratchLM):
    description = "the book's GRU from its equations (reset_after: nn.GRU's formula)"
    options = ScratchLM.options | {"reset_after"}

    def make_layer(self, num_inputs, cfg, init):
        return GRULayer(num_inputs, cfg.num_hiddens, init, cfg.reset_after, cfg.weight_drop)

    def gate_weights(self) -> list:
        out = []
        for k, layer in enumerate(self.layers):
            b_h = torch.zeros(3 * self.num_hiddens)
            if layer.reset_after:
                b_h[2 * self.num_hiddens:] = layer.b_hh.detach()
            out.append(LayerWeights("gru", layer._fused("W_x").detach(),
                                    layer._fused("b_").detach(), layer._fused("W_h").detach(),
                                    b_h, reset_after=layer.reset_after,
                                    embedding=self.input_embedding(k)))
        return out


@register_model("lstm-scratch")
class LSTMScratch(ScratchLM):
    description = "LSTM from its equations: I, F, O gates, candidate C~"
    num_states, num_gates = 2, 4
    options = ScratchLM.options | {"forget_bias"}

    def make_layer(self, num_inputs, cfg, init):
        return LSTMLayer(num_inputs, cfg.num_hiddens, init, cfg.forget_bias, cfg.weight_drop)

    def gate_weights(self) -> list:
        return [LayerWeights("lstm", layer._fused("W_x").detach(), layer._fused("b_").detach(),
                             layer._fused("W_h").detach(), torch.zeros(4 * self.num_hiddens),
                             embedding=self.input_embedding(k))
                for k, layer in enumerate(self.layers)]


@register_model("rnn-scratch")
class RNNScratch(ScratchLM):
    description = "vanilla RNN from its equation: H = tanh(X W_xh + H W_hh + b_h)"
    num_gates = 1

    def make_layer(self, num_inputs, cfg, init):
        return RNNLayer(num_inputs, cfg.num_hiddens, init, cfg.weight_drop)


# ---------------------------------------------------------------- torch.nn models


class TorchLM(RecurrentLM):
    """Embedding lookup -> torch.nn recurrent layers -> dropout -> nn.Linear."""

    rnn_cls: type[nn.RNNBase] = nn.GRU
    options = frozenset({"embed_dim", "embed_dropout", "tie_weights"})

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> list[str]:
        problems = super().check_config(cfg)
        if cfg.tie_weights and cfg.embed_dim != cfg.num_hiddens:
            problems.append(f"model.tie_weights: the output layer can reuse the embedding only "
                            f"when model.embed_dim ({cfg.embed_dim}) = model.num_hiddens "
                            f"({cfg.num_hiddens}); set model.embed_dim={cfg.num_hiddens}")
        return problems

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        # Default: a vocab_size-wide lookup, the same function class as the book's one-hot.
        embed_dim = cfg.embed_dim or vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        # The one place where d2l's names meet torch.nn's: num_hiddens -> hidden_size.
        self.rnn = self.rnn_cls(
            input_size=embed_dim,
            hidden_size=cfg.num_hiddens,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.output = nn.Linear(cfg.num_hiddens, vocab_size)
        if cfg.tie_weights:  # one matrix both reads characters in and scores them out
            self.output.weight = self.embedding.weight
        if cfg.init not in ("auto", "torch"):
            for name, p in self.named_parameters():
                if p.dim() == 2 and name != "embedding.weight":
                    _init_weight(p.data, cfg.init, "weight_hh" in name, cfg.num_hiddens)
                elif p.dim() == 1:
                    nn.init.zeros_(p.data)
        if cfg.forget_bias is not None:
            nh = cfg.num_hiddens
            for layer in range(cfg.num_layers):
                getattr(self.rnn, f"bias_ih_l{layer}").data[nh:2 * nh] = cfg.forget_bias
                getattr(self.rnn, f"bias_hh_l{layer}").data[nh:2 * nh] = 0.0

    def forward_features(self, X: Tensor, state: State | None = None
                         ) -> tuple[Tensor, State, Tensor]:
        if state is None:
            state = self.begin_state(X.shape[0], X.device)
        E = embedding_dropout(self.embedding.weight, self.cfg.embed_dropout, self.training)
        emb = F.embedding(X.t(), E)  # (num_steps, batch_size, embed_dim)
        if self.weight_drop and self.training:
            # DropConnect on W_hh through functional_call: torch.nn's fused RNN still runs,
            # on the dropped matrices, and the stored weights stay untouched.
            dropped = {n: drop_weight(getattr(self.rnn, n), self.weight_drop, True)
                       for n, _ in self.rnn.named_parameters() if n.startswith("weight_hh")}
            Y, state = torch.func.functional_call(self.rnn, dropped, (emb, state))
        else:
            Y, state = self.rnn(emb, state)  # (num_steps, batch_size, num_hiddens)
        out = sequence_dropout(Y, self.dropout, self.training, self.locked_dropout)
        # (batch_size, num_steps, vocab_size), the state, (batch_size, num_steps, num_hiddens)
        return self.output(out).transpose(0, 1), state, Y.transpose(0, 1)

    def _layer_tensors(self, k: int, order: tuple[int, ...]):
        """torch.nn's stacked gate rows, reordered into our blocks and transposed."""
        nh = self.num_hiddens

        def blocks(t: Tensor) -> Tensor:
            return torch.cat([t[i * nh:(i + 1) * nh] for i in order]).detach()

        rnn = self.rnn
        return (blocks(getattr(rnn, f"weight_ih_l{k}")).t(), blocks(getattr(rnn, f"bias_ih_l{k}")),
                blocks(getattr(rnn, f"weight_hh_l{k}")).t(), blocks(getattr(rnn, f"bias_hh_l{k}")))


@register_model("gru")
class TorchGRU(TorchLM):
    description = "torch.nn.GRU with an input embedding"
    rnn_cls = nn.GRU

    def gate_weights(self) -> list:
        emb = self.embedding.weight.detach()
        return [LayerWeights("gru", *self._layer_tensors(k, (1, 0, 2)), reset_after=True,
                             embedding=emb if k == 0 else None)
                for k in range(self.num_layers)]  # torch.nn's (r, z, n) -> our (z, r, h)


@register_model("lstm")
class TorchLSTM(TorchLM):
    description = "torch.nn.LSTM with an input embedding"
    rnn_cls = nn.LSTM
    num_states, num_gates = 2, 4
    options = frozenset({"embed_dim", "embed_dropout", "tie_weights", "forget_bias"})

    def gate_weights(self) -> list:
        emb = self.embedding.weight.detach()
        return [LayerWeights("lstm", *self._layer_tensors(k, (0, 1, 2, 3)),
                             embedding=emb if k == 0 else None)
                for k in range(self.num_layers)]


@register_model("rnn")
class TorchRNN(TorchLM):
    description = "torch.nn.RNN (tanh) with an input embedding"
    rnn_cls = nn.RNN
    num_gates = 1
