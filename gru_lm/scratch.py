"""The book's models from their equations: GRU, LSTM and vanilla RNN layers whose
recurrences run in gru_lm/cells.py (fused kernels or portable loops, hand-written BPTT),
parameters named as the book names them (W_xz, W_hz, b_z, ...; W_hq, b_q)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gru_lm.cells import (
    FusedPath,
    GRUFunction,
    GRUResetAfterFunction,
    LSTMFunction,
    RNNFunction,
    autocast_bf16,
    bf16_operands,
)
from gru_lm.config import ModelConfig
from gru_lm.recurrent import (
    LayerWeights,
    RecurrentLM,
    State,
    drop_weight,
    embedding_dropout,
    init_weight,
    register_model,
    sequence_dropout,
)


class _ScratchLayer(nn.Module):
    """One layer's parameters, named as the book names them; `gates` lists the blocks."""

    gates: tuple[str, ...] = ()
    reset_after = False  # GRU layers: R multiplies (H W_hh + b_hh), as torch.nn's GRU

    def __init__(self, num_inputs: int, num_hiddens: int, init: str, weight_drop: float = 0.0):
        super().__init__()
        self.num_inputs, self.num_hiddens = num_inputs, num_hiddens
        self.weight_drop = weight_drop
        for g in self.gates:
            W_x = nn.Parameter(torch.empty(num_inputs, num_hiddens))
            W_h = nn.Parameter(torch.empty(num_hiddens, num_hiddens))
            init_weight(W_x.data, init, False, num_hiddens)
            init_weight(W_h.data, init, True, num_hiddens)
            setattr(self, f"W_x{g}", W_x)
            setattr(self, f"W_h{g}", W_h)
            setattr(self, f"b_{g}", nn.Parameter(torch.zeros(num_hiddens)))
        if init == "torch":
            bound = 1 / math.sqrt(num_hiddens)
            for g in self.gates:
                nn.init.uniform_(getattr(self, f"b_{g}"), -bound, bound)

    def param(self, name: str) -> Tensor:
        """A parameter by its book name (made by setattr in __init__)."""
        p = getattr(self, name)
        assert isinstance(p, Tensor)
        return p

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
            W_hzr = torch.cat([self.param("W_hz"), self.param("W_hr")], dim=1)  # (nh, 2 nh)
            Y = GRUFunction.apply(P, ids, H, self.recurrent(W_hzr),
                                  self.recurrent(self.param("W_hh")), bf16)
        return Y, Y[-1]


class LSTMLayer(_ScratchLayer):
    gates = ("i", "f", "c", "o")  # the candidate C~ is torch.nn's "g" block

    def __init__(self, num_inputs: int, num_hiddens: int, init: str, forget_bias: float | None,
                 weight_drop: float = 0.0):
        super().__init__(num_inputs, num_hiddens, init, weight_drop)
        if forget_bias is not None:
            nn.init.constant_(self.param("b_f"), forget_bias)

    def forward(self, inputs: Tensor, state: tuple[Tensor, Tensor], bf16: bool = False):
        H, C = state
        Y, C_T = LSTMFunction.apply(*self.project(inputs, bf16), H, C,
                                    self.recurrent(self._fused("W_h")), bf16)
        return Y, (Y[-1], C_T)


class RNNLayer(_ScratchLayer):
    gates = ("h",)

    def forward(self, inputs: Tensor, H: Tensor, bf16: bool = False) -> tuple[Tensor, Tensor]:
        Y = RNNFunction.apply(*self.project(inputs, bf16), H,
                              self.recurrent(self.param("W_hh")), bf16)
        return Y, Y[-1]


class ScratchLM(RecurrentLM):
    """[Embedding E ->] stacked scratch layers -> output layer W_hq, b_q. Without
    model.embed_dim the first layer reads token ids (the book's one-hot inputs)."""

    options = frozenset({"embed_dim", "embed_dropout"})

    @property
    def kernels(self) -> FusedPath:
        return FusedPath(self.num_gates, self.num_hiddens)

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> list[str]:
        problems = super().check_config(cfg)
        if cfg.embed_dropout and not cfg.embed_dim:
            problems.append(f"model.embed_dropout: '{cls.registry_name}' reads one-hot ids "
                            "unless it has an embedding; set model.embed_dim (e.g. 64) too")
        return problems

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
        if self.adaptive is None:  # the book's output layer
            self.W_hq = nn.Parameter(torch.empty(cfg.num_hiddens, vocab_size))
            init_weight(self.W_hq.data, init, False, cfg.num_hiddens)
            self.b_q = nn.Parameter(torch.zeros(vocab_size))

    def make_layer(self, num_inputs: int, cfg: ModelConfig, init: str) -> nn.Module:
        raise NotImplementedError

    def scratch_layers(self) -> list[_ScratchLayer]:
        return [layer for layer in self.layers if isinstance(layer, _ScratchLayer)]

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

    # Under bf16 autocast (train.precision=bf16) every GEMM of this model takes bf16-rounded
    # operands and accumulates in fp32, by this model's own code rather than autocast's
    # (whose bf16 matmuls output bf16, and run ~50x slower than fp32 on a CPU without bf16
    # instructions); states and weights stay fp32.

    def hidden(self, X: Tensor, state: State | None = None) -> tuple[Tensor, State, Tensor]:
        bf16 = autocast_bf16(X.device.type)
        with torch.autocast(X.device.type, enabled=False):
            return self._hidden(X, state, bf16)

    def logits(self, out: Tensor) -> Tensor:
        # F.linear on W_hq^T: one addmm forward, and its weight gradient comes out as
        # dlogits^T @ out, the faster GEMM orientation for a small vocabulary.
        r = bf16_operands(autocast_bf16(out.device.type))
        with torch.autocast(out.device.type, enabled=False):
            return F.linear(r(out), r(self.W_hq).t(), self.b_q)  # (num_steps, batch, vocab)

    def _hidden(self, X: Tensor, state: State | None, bf16: bool
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
        return out, self.stack_states(new_states), inputs.transpose(0, 1)


@register_model("gru-scratch")
class GRUScratch(ScratchLM):
    description = "the book's GRU from its equations (reset_after: nn.GRU's formula)"
    options = ScratchLM.options | {"reset_after"}

    def make_layer(self, num_inputs, cfg, init):
        return GRULayer(num_inputs, cfg.num_hiddens, init, cfg.reset_after, cfg.weight_drop)

    def gate_weights(self) -> list:
        out = []
        for k, layer in enumerate(self.scratch_layers()):
            b_h = torch.zeros(3 * self.num_hiddens)
            if layer.reset_after:
                b_h[2 * self.num_hiddens:] = layer.param("b_hh").detach()
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
                for k, layer in enumerate(self.scratch_layers())]


@register_model("rnn-scratch")
class RNNScratch(ScratchLM):
    description = "vanilla RNN from its equation: H = tanh(X W_xh + H W_hh + b_h)"
    num_gates = 1

    def make_layer(self, num_inputs, cfg, init):
        return RNNLayer(num_inputs, cfg.num_hiddens, init, cfg.weight_drop)
