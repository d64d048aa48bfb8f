"""The Mogrifier LSTM (Melis, Kočiský and Blunsom, "Mogrifier LSTM", ICLR 2020): before each
LSTM step, the input and the previous output gate each other for a number of rounds.

With x^{-1} = x_t and h^0 = h_{t-1}, for i = 1 .. rounds:

    odd i:   x^i = 2 σ(Q^i h^{i-1} + b_Q^i) ⊙ x^{i-2}      (the state rescales the input)
    even i:  h^i = 2 σ(R^i x^{i-1} + b_R^i) ⊙ h^{i-2}      (the input rescales the state)

then an ordinary LSTM step reads the last x and h of the rounds:

    I, F, G, O = σ, σ, tanh, σ of (x W_x + h W_h + b), split in four   (torch.nn's order)
    c_t = F ⊙ c_{t-1} + I ⊙ G,    h_t = O ⊙ tanh(c_t)

The cell c_{t-1} is carried unchanged; the mogrified h only feeds the gates, and h_t is the
LSTM's own output. Q^i and R^i have rank `rank` (Q = Q_a Q_b, as DeepMind's lamb
factorises them; rank 0: full matrices), their biases start at zero. With rounds = 0 the
model is exactly an LSTM (the test suite checks it against nn.LSTM with the same weights).
Each step's input depends on the previous output, so no input product can be computed for
all steps at once as the LSTM's can: on the CPU in float32 the whole recurrence runs in the
fused kernels of gru_lm/csrc/cells.cpp (rounds, products and LSTM step per step in C++,
backward by hand; MogrifierFunction), elsewhere (a GPU, bf16 autocast, no compiler,
cells.portable_loops()) in the PyTorch step loop below, through autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gru_lm.cells import LoopPath, current
from gru_lm.config import ModelConfig
from gru_lm.errors import ConfigError
from gru_lm.recurrent import (
    BOOK_GATES,
    BOOK_HOW,
    GateTrace,
    RecurrentLM,
    State,
    check_layer,
    drop_weight,
    embedding_dropout,
    register_model,
    sequence_dropout,
    tie_weights_problems,
)
from gru_lm.torchnn import DEFAULT_EMBED_MAX

DEFAULT_ROUNDS, DEFAULT_RANK = 4, 24  # lamb's PTB-character configuration


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class MogrifierLayer(nn.Module):
    """One layer: the rounds' factors (Q for odd rounds, R for even), then the LSTM's
    W_x (num_inputs, 4 H), W_h (H, 4 H) and b (4 H), gate blocks [i | f | g | o]."""

    def __init__(self, num_inputs: int, num_hiddens: int, rounds: int, rank: int,
                 weight_drop: float = 0.0):
        super().__init__()
        E, H = num_inputs, num_hiddens
        self.weight_drop = weight_drop
        self.W_x = _uniform(E, 4 * H, fan_in=H)
        self.W_h = _uniform(H, 4 * H, fan_in=H)
        self.b = _uniform(4 * H, fan_in=H)
        self.masks = nn.ParameterList()  # per round: factors (or one matrix), then the bias
        self.shapes: list[int] = []  # parameters per round
        for i in range(rounds):
            src, dst = (H, E) if i % 2 == 0 else (E, H)  # round 1 (i = 0) rescales x
            factors = [_uniform(src, dst, fan_in=src)] if not rank else \
                [_uniform(src, rank, fan_in=src), _uniform(rank, dst, fan_in=rank)]
            self.masks.extend([*factors, nn.Parameter(torch.zeros(dst))])
            self.shapes.append(len(factors) + 1)

    def rounds(self) -> list[tuple[list[Tensor], Tensor]]:
        """Each round's factors and bias, in order."""
        out, k = [], 0
        params = list(self.masks)
        for n in self.shapes:
            out.append((params[k:k + n - 1], params[k + n - 1]))
            k += n
        return out

    def mogrify(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """x and h after the rounds, and each round's mask (2 σ(...), for inspection)."""
        masks = []
        for i, (factors, bias) in enumerate(self.rounds()):
            src = h if i % 2 == 0 else x
            for W in factors:
                src = src @ W
            mask = 2 * torch.sigmoid(src + bias)
            masks.append(mask)
            if i % 2 == 0:
                x = mask * x
            else:
                h = mask * h
        return x, h, masks

    def step(self, x: Tensor, h: Tensor, c: Tensor, W_h: Tensor
             ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One step: the rounds, then the LSTM's; the new h and c, and (for inspection) the
        gates I, F, O and each round's mask M1, M2, ... (2 σ(...))."""
        xm, hm, masks = self.mogrify(x, h)
        i, f, g, o = torch.addmm(torch.addmm(self.b, xm, self.W_x), hm, W_h).chunk(4, -1)
        gate_i, gate_f, gate_o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
        c = gate_f * c + gate_i * torch.tanh(g)
        h = gate_o * torch.tanh(c)
        return h, c, {"I": gate_i, "F": gate_f, "O": gate_o,
                      **{f"M{r + 1}": m for r, m in enumerate(masks)}}

    def forward(self, inputs: Tensor, state: tuple[Tensor, Tensor]
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """inputs (num_steps, batch_size, num_inputs) -> outputs (num_steps, batch_size, H):
        the fused CPU kernels where they load (float32 on the CPU, not under autocast), else
        the step loop below."""
        h, c = state
        W_h = drop_weight(self.W_h, self.weight_drop, self.training)
        if fused_library(inputs) is not None:
            Y, c_T = MogrifierFunction.apply(inputs, h, c, self.W_x, W_h, self.b,
                                             tuple(self.shapes), *self.masks)
            return Y, (Y[-1], c_T)
        outs = []
        for x in inputs:
            h, c, _ = self.step(x, h, c, W_h)
            outs.append(h)
        return torch.stack(outs), (h, c)


def fused_library(inputs: Tensor):
    """The fused kernels for these inputs, or None (the step loop runs): float32 CPU tensors
    outside autocast, kernels in force (cells.current()) and loadable (built on first use
    only when training, as the scratch cells do)."""
    if (inputs.dtype != torch.float32 or inputs.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")):
        return None
    k = current()
    return k.library.load(build=torch.is_grad_enabled()) if k.fused else None


class MogrifierFunction(torch.autograd.Function):
    """A MogrifierLayer over all steps in the fused kernels (gru_lm/csrc/cells.cpp): the
    rounds and the LSTM step per step in C++, forward and hand-written backward; the weight
    gradients here, one GEMM each over all steps. Same numbers as the step loop (tested).

    Inputs: X (T, B, E), H0 and C0 (B, H), W_x, W_h, b, each round's parameter count (2:
    one matrix and its bias; 3: two factors and the bias), then the rounds' parameters.
    Returns (Y (T, B, H), C_T (B, H))."""

    @staticmethod
    def forward(ctx, X: Tensor, H0: Tensor, C0: Tensor, W_x: Tensor, W_h: Tensor, b: Tensor,
                shapes: tuple[int, ...], *params: Tensor):
        ext = fused_library(X)
        assert ext is not None  # (the layer checked)
        mats, counts, biases = _split(shapes, params)
        H0, C0 = H0.contiguous(), C0.contiguous()
        out = ext.mogrifier_forward(X.contiguous(), H0, C0, W_x.contiguous(), W_h.contiguous(),
                                    b.contiguous(), mats, counts, biases)
        R = len(shapes)
        Y, IFGO, Cs, Tc, XV, HV = out[:6]
        ctx.ext, ctx.shapes, ctx.R = ext, shapes, R
        ctx.save_for_backward(C0, W_x, W_h, IFGO, Cs, Tc, XV, HV, *out[6:], *params)
        return Y, Cs[-1].clone()

    @staticmethod
    def backward(ctx, dY: Tensor, dC_T: Tensor | None):
        C0, W_x, W_h, IFGO, Cs, Tc, XV, HV, *rest = ctx.saved_tensors
        R = ctx.R
        Ms, As, params = rest[:R], rest[R:2 * R], rest[2 * R:]
        mats, counts, biases = _split(ctx.shapes, params)
        out = ctx.ext.mogrifier_backward(dY.contiguous(), dC_T, C0, W_x.contiguous(),
                                         W_h.contiguous(), mats, counts, biases, IFGO, Cs, Tc,
                                         XV, HV, list(Ms))
        dA, dX, dH0, dC0 = out[:4]
        dS, dR = out[4:4 + R], out[4 + R:]
        T, B, _ = Cs.shape
        flat = dA.view(T * B, -1)
        E, H = XV.shape[-1], HV.shape[-1]
        grads = [XV[-1].reshape(-1, E).t() @ flat, HV[-1].reshape(-1, H).t() @ flat,
                 flat.sum(0)]
        for k in range(R):
            src = (HV[k // 2].reshape(-1, H) if k % 2 == 0
                   else XV[(k + 1) // 2].reshape(-1, E))
            ds = dS[k].reshape(T * B, -1)
            if counts[k] == 2:
                rank = As[k].shape[-1]
                grads += [src.t() @ dR[k].reshape(-1, rank), As[k].reshape(-1, rank).t() @ ds]
            else:
                grads.append(src.t() @ ds)
            grads.append(ds.sum(0))
        dW_x, dW_h, db, *dparams = grads
        return dX, dH0, dC0, dW_x, dW_h, db, None, *dparams


def _split(shapes: tuple[int, ...], params) -> tuple[list[Tensor], list[int], list[Tensor]]:
    """A layer's round parameters (per round: factors, then bias) as the kernels take them:
    the factors of all rounds, how many each round has, the biases."""
    mats, counts, biases, k = [], [], [], 0
    for n in shapes:
        mats += [p.contiguous() for p in params[k:k + n - 1]]
        counts.append(n - 1)
        biases.append(params[k + n - 1].contiguous())
        k += n
    return mats, counts, biases


def rank_problems(cfg: ModelConfig, embed_dim: int) -> list[str]:
    """A rank at or above full rank (min of the embedding and the hidden width) only adds
    parameters: a full matrix is smaller and spans as much."""
    full = min(embed_dim, cfg.num_hiddens)
    if cfg.rank and cfg.rank >= full:
        return [f"model.rank={cfg.rank} is not below full rank ({full}: the smaller of "
                f"{embed_dim} inputs and {cfg.num_hiddens} hidden units), so the factors "
                f"hold more than a full matrix; set model.rank below {full}, or 0 for full "
                "matrices"]
    return []


@register_model("mogrifier")
class Mogrifier(RecurrentLM):
    description = "Mogrifier LSTM: input and state gate each other before each step"
    num_states, num_gates = 2, 4
    options = frozenset({"embed_dim", "embed_dropout", "tie_weights", "rounds", "rank"})

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        embed_dim = cfg.embed_dim or min(vocab_size, DEFAULT_EMBED_MAX)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        rounds = DEFAULT_ROUNDS if cfg.rounds is None else cfg.rounds
        rank = DEFAULT_RANK if cfg.rank is None else cfg.rank
        problems = rank_problems(cfg, embed_dim)
        if problems:
            raise ConfigError(problems[0])
        self.layers = nn.ModuleList(
            MogrifierLayer(embed_dim if k == 0 else cfg.num_hiddens, cfg.num_hiddens, rounds,
                           rank, cfg.weight_drop) for k in range(cfg.num_layers))
        if self.adaptive is None:
            self.output = nn.Linear(cfg.num_hiddens, vocab_size)
            if cfg.tie_weights:
                self.output.weight = self.embedding.weight

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> list[str]:
        problems = super().check_config(cfg) + tie_weights_problems(cfg)
        if cfg.init != "auto":
            problems.append(f"model.init={cfg.init}: the mogrifier draws its weights as "
                            "DeepMind's lamb does (uniform, ±1/√fan-in), whatever init says; "
                            "drop model.init")
        return problems + rank_problems(cfg, cfg.embed_dim or DEFAULT_EMBED_MAX)

    @property
    def kernels(self) -> LoopPath:
        return LoopPath(self.num_gates, self.num_hiddens)

    def mogrifier_layers(self) -> list[MogrifierLayer]:
        return [layer for layer in self.layers if isinstance(layer, MogrifierLayer)]

    def hidden(self, X: Tensor, state: State | None = None) -> tuple[Tensor, State, Tensor]:
        if state is None:
            state = self.begin_state(X.shape[0], X.device)
        assert isinstance(state, tuple)
        E = embedding_dropout(self.embedding.weight, self.cfg.embed_dropout, self.training)
        inputs = F.embedding(X.t(), E)  # (num_steps, batch_size, embed_dim)
        hs, cs = [], []
        for k, layer in enumerate(self.mogrifier_layers()):
            inputs, (h, c) = layer(inputs, (state[0][k], state[1][k]))
            hs.append(h)
            cs.append(c)
            if k < self.num_layers - 1:
                inputs = sequence_dropout(inputs, self.dropout, self.training,
                                          self.locked_dropout)
        out = sequence_dropout(inputs, self.dropout, self.training, self.locked_dropout)
        return out, (torch.stack(hs), torch.stack(cs)), inputs.transpose(0, 1)

    def logits(self, out: Tensor) -> Tensor:
        return self.output(out)  # (num_steps, batch_size, vocab_size)

    def gate_trace(self, ids: list[int], layer: int) -> GateTrace:
        """The LSTM's gates and the masks of the state rounds (see trace)."""
        check_layer(layer, self.num_layers)
        gates, H = self.trace(ids, layer)
        titles = {**BOOK_GATES["lstm"], **{name: f"state mask of round {name[1:]} (2σ(R x), "
                                                 "halved)" for name in gates if name[0] == "M"}}
        how = (BOOK_HOW["lstm"] + " M2, M4: the input's rescaling of the state before the "
               "gates (0.5: none).")
        return GateTrace.of("mogrifier", gates, H, titles, how)

    @torch.no_grad()
    def trace(self, ids: list[int], layer: int) -> tuple[dict[str, Tensor], Tensor]:
        """Layer `layer`'s gates I, F, O and the masks of its state rounds (rounds 2, 4, ...:
        2 σ(R x + b), halved into [0, 1]) at every token of `ids`, each (tokens, num_hiddens),
        and its outputs H, read one token at a time from a zero state in eval mode (what
        `gru-lm gates` shows). The input rounds' masks have the embedding's width, not the
        state's, and are left out."""
        was = self.training
        self.eval()
        try:
            inputs = self.embedding.weight[torch.tensor(ids)].unsqueeze(1)  # (T, 1, E)
            for k, lay in enumerate(self.mogrifier_layers()[: layer + 1]):
                H = torch.zeros(1, self.num_hiddens)
                C = torch.zeros(1, self.num_hiddens)
                rec: dict[str, list[Tensor]] = {}
                outs = []
                for x in inputs:
                    H, C, gates = lay.step(x, H, C, lay.W_h)
                    for name, v in gates.items():
                        if name[0] != "M":
                            rec.setdefault(name, []).append(v[0])
                        elif int(name[1:]) % 2 == 0:  # a state round's mask, halved to [0, 1]
                            rec.setdefault(name, []).append(v[0] / 2)
                    outs.append(H)
                inputs = torch.stack(outs)  # (T, 1, H)
                if k == layer:
                    return {n: torch.stack(v) for n, v in rec.items()}, inputs[:, 0]
            raise IndexError(layer)
        finally:
            self.train(was)
