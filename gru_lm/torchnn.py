"""torch.nn's GRU, LSTM and RNN behind the one interface: an embedding, the torch.nn layers
(cuDNN on a GPU), dropout and a linear output layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    tie_weights_problems,
)

DEFAULT_EMBED_MAX = 256  # the widest default embedding (bytes: 256, d2l: 28, unchanged)


class TorchLM(RecurrentLM):
    """Embedding lookup -> torch.nn recurrent layers -> dropout -> nn.Linear."""

    rnn_cls: Callable[..., nn.RNNBase] = nn.GRU
    options = frozenset({"embed_dim", "embed_dropout", "tie_weights"})

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> list[str]:
        return super().check_config(cfg) + tie_weights_problems(cfg)

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        # Default: a vocab_size-wide lookup, the same function class as the book's one-hot,
        # up to DEFAULT_EMBED_MAX wide: a 5,000-character vocabulary would otherwise make a
        # 5,000 x 5,000 table and a 5,000-wide input product (25M + 10M parameters).
        embed_dim = cfg.embed_dim or min(vocab_size, DEFAULT_EMBED_MAX)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        # The one place where d2l's names meet torch.nn's: num_hiddens -> hidden_size.
        self.rnn = self.rnn_cls(
            input_size=embed_dim,
            hidden_size=cfg.num_hiddens,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        if self.adaptive is None:
            self.output = nn.Linear(cfg.num_hiddens, vocab_size)
            if cfg.tie_weights:  # one matrix both reads characters in and scores them out
                self.output.weight = self.embedding.weight
        if cfg.init not in ("auto", "torch"):
            for name, p in self.named_parameters():
                if p.dim() == 2 and name != "embedding.weight":
                    init_weight(p.data, cfg.init, "weight_hh" in name, cfg.num_hiddens)
                elif p.dim() == 1:
                    nn.init.zeros_(p.data)
        if cfg.forget_bias is not None:
            nh = cfg.num_hiddens
            for layer in range(cfg.num_layers):
                getattr(self.rnn, f"bias_ih_l{layer}").data[nh:2 * nh] = cfg.forget_bias
                getattr(self.rnn, f"bias_hh_l{layer}").data[nh:2 * nh] = 0.0

    def hidden(self, X: Tensor, state: State | None = None) -> tuple[Tensor, State, Tensor]:
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
        # (num_steps, batch_size, num_hiddens) twice, and the state
        return out, state, Y.transpose(0, 1)

    def logits(self, out: Tensor) -> Tensor:
        return self.output(out)  # (num_steps, batch_size, vocab_size)

    def _layer_tensors(self, k: int, order: tuple[int, ...]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
