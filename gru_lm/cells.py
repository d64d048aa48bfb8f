"""Whole-sequence recurrences with hand-written BPTT (torch.autograd.Function).

Every function takes the input projections of all steps at once, P = X W_x + b with shape
(num_steps, batch_size, num_gates * num_hiddens), so only the recurrent product is left in the
step loop. A first layer fed token ids passes `ids` (num_steps, batch_size) and, as P, the
(vocab_size, num_gates * num_hiddens) table W_x + b whose rows the ids pick. Forward keeps the gate
activations; backward walks the steps in reverse with a handful of fused ops each, and
computes the recurrent weight gradient with one large matmul over all steps. Gate blocks
along the last axis:

    GRU  [z | r | h]          LSTM  [i | f | g | o]  (torch.nn's order)     RNN  [h]

bf16=True (train.precision=bf16): every GEMM of the recurrence takes its operands rounded to
bfloat16 and accumulates in fp32; hidden states, gates and weights stay fp32. The loops below
do it by rounding; the fused kernels by MKL's bf16 GEMM or sgemm on rounded copies, whichever
this CPU runs faster (`gemm_kind`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gru_lm._ext import LIBRARY, Library
from gru_lm.errors import ConfigError


@dataclass
class Kernels:
    """Which code runs the scratch recurrences: the fused C++ kernels of `library` when
    `fused` (and they load), else the PyTorch loops below; and, under bf16, the GEMM each step
    shape timed fastest (kept in `bf16`, (rows, n, k) -> (kind, seconds by kind)).

    Which one is in force is a context value, not a global: `use(Kernels(fused=False))` (or
    portable_loops()) selects the loops for a block; `current()` is what runs now."""

    fused: bool = True
    library: Library = field(default_factory=lambda: LIBRARY)
    bf16: dict[tuple[int, int, int], tuple[int, dict[int, float]]] = field(default_factory=dict)


_DEFAULT = Kernels()
_CURRENT: contextvars.ContextVar[Kernels] = contextvars.ContextVar("gru_lm_kernels")


def current() -> Kernels:
    """The kernels in force here (the process' default unless a `use` block says others)."""
    return _CURRENT.get(_DEFAULT)


@contextlib.contextmanager
def use(kernels: Kernels):
    """Run the block with `kernels` (tests: the loops, a fresh library, an empty bf16 cache)."""
    token = _CURRENT.set(kernels)
    try:
        yield kernels
    finally:
        _CURRENT.reset(token)


def portable_loops():
    """Run the PyTorch loops below even where the fused C++ kernels are available."""
    return use(Kernels(fused=False))


# The fused kernels' GEMM kinds (gru_lm/csrc/cells.cpp, enum Kind).
GEMM_NAMES = {0: "fp32 sgemm", 1: "MKL gemm_bf16bf16f32", 2: "sgemm on bf16-rounded operands"}
BF16_ENV = "GRU_LM_BF16_GEMM"  # mkl | sgemm: pin the bf16 GEMM instead of timing both
_BF16_BY_ENV = {"mkl": 1, "sgemm": 2}


def autocast_bf16(device_type: str) -> bool:
    """Whether autocast asks for bf16 on this device (train.precision=bf16)."""
    return (torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.bfloat16)


def gemm_kind(ext, bf16: bool, rows: int, n: int, k: int) -> int:
    """The fused kernels' GEMM for a recurrence whose step product is (rows x k) . (k x n).

    fp32: sgemm. bf16: both bf16 GEMMs give the same numbers up to the order of the sums, so
    the faster one on this CPU is timed once per shape and kept (GRU_LM_BF16_GEMM pins it)."""
    if not bf16:
        return 0
    pinned = bf16_pin(ext.gemm_kinds())
    if pinned is not None:
        return pinned
    key, chosen = (rows, n, k), current().bf16
    if key not in chosen:
        reps = timing_reps(rows, n, k)
        times = {kind: ext.time_gemm(kind, rows, n, k, reps) for kind in ext.gemm_kinds()
                 if kind != 0}
        chosen[key] = (min(times, key=times.__getitem__), times)
    return chosen[key][0]


def timing_reps(rows: int, n: int, k: int) -> int:
    """Products of (rows x k) . (k x n) in one timing round of about 5 ms (at 50 GFLOP/s)."""
    return max(1, min(50, round(5e-3 * 50e9 / (2 * rows * n * k))))


def bf16_pin(available=tuple(_BF16_BY_ENV.values())) -> int | None:
    """The bf16 GEMM that GRU_LM_BF16_GEMM pins, or None; a name that is not one of the
    `available` kinds is a ConfigError (the trainer checks before it writes anything)."""
    pinned = os.environ.get(BF16_ENV, "").strip().lower()
    if not pinned:
        return None
    if _BF16_BY_ENV.get(pinned) not in available:
        have = [name for name, kind in _BF16_BY_ENV.items() if kind in available]
        raise ConfigError(f"{BF16_ENV}={pinned!r} is not a bf16 GEMM this build has; "
                          f"use one of {', '.join(have)} or unset it")
    return _BF16_BY_ENV[pinned]


def bf16_gemm_report() -> str:
    """What the bf16 GEMM timings chose so far, for the run header and summary.json."""
    pinned = os.environ.get(BF16_ENV, "").strip().lower()
    if pinned in _BF16_BY_ENV:
        return f"{GEMM_NAMES[_BF16_BY_ENV[pinned]]} (pinned by {BF16_ENV})"
    if not current().bf16:
        return "the faster of MKL's bf16 GEMM and rounded sgemm, timed at the first step"
    parts = []
    for (rows, n, k), (kind, times) in current().bf16.items():
        timed = ", ".join(f"{GEMM_NAMES[c]} {t * 1e3:.3f} ms" for c, t in times.items())
        parts.append(f"{GEMM_NAMES[kind]} at {rows}x{k}x{n} ({timed})")
    return "; ".join(parts)


def _step_rows(batch_size: int) -> int:
    """Rows of one thread's step GEMM: the kernels split the batch over the threads."""
    return math.ceil(batch_size / max(1, torch.get_num_threads()))


def _round_bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def _same(x: Tensor) -> Tensor:
    return x


def bf16_operands(bf16: bool):
    """How a GEMM takes its operands: as they are, or rounded to bf16 (values kept in fp32,
    so an fp32 GEMM accumulates them in fp32)."""
    return _round_bf16 if bf16 else _same


def _fast(P: Tensor):
    """The fused kernels for float32 CPU tensors, else None (the loops below run).

    Training builds/loads them on first use; inference alone (predict, gates) never pays
    that start-up cost and uses them only when they are already loaded. (Grad mode is off
    inside Function.forward, so "training" is read from P, made under grad mode or not.)
    """
    k = current()
    if not k.fused or P.dtype != torch.float32 or P.device.type != "cpu":
        return None
    return k.library.load(build=P.requires_grad)


def _dense(P: Tensor, ids: Tensor | None) -> Tensor:
    """P for every step: the table rows the ids pick, or P itself."""
    return P if ids is None else torch.nn.functional.embedding(ids, P)


def _begin(ctx, P: Tensor, ids: Tensor | None, H0: Tensor, gates: int, bf16: bool):
    """Record what backward needs about the input; return the fused kernels or None."""
    ctx.ids, ctx.table_rows = ids, (P.shape[0] if ids is not None else 0)
    ctx.bf16 = bf16
    ctx.ext = _fast(P)
    nh = H0.shape[-1]
    ctx.kind = (gemm_kind(ctx.ext, bf16, _step_rows(H0.shape[0]), gates * nh, nh)
                if ctx.ext is not None else 0)
    return ctx.ext


def _input_grad(ctx, dP: Tensor) -> Tensor:
    """dP for a dense P; for a table, the sum of the dP rows of each id."""
    if ctx.ids is None:
        return dP
    width = dP.shape[-1]
    return dP.new_zeros(ctx.table_rows, width).index_add_(0, ctx.ids.reshape(-1),
                                                         dP.reshape(-1, width))


def _prev_states(H0: Tensor, Y: Tensor) -> Tensor:
    """H_{t-1} for every step: (num_steps, batch_size, num_hiddens)."""
    return torch.cat([H0.unsqueeze(0), Y[:-1]], dim=0)


class GRUFunction(torch.autograd.Function):
    """The book's GRU: the reset gate acts on H before W_hh.

    Z = σ(P_z + H W_hz), R = σ(P_r + H W_hr), H~ = tanh(P_h + (R ⊙ H) W_hh),
    H' = Z ⊙ H + (1 - Z) ⊙ H~.  W_hzr = [W_hz | W_hr] is one (H, 2H) matrix.
    """

    @staticmethod
    def forward(ctx, P: Tensor, ids: Tensor | None, H0: Tensor, W_hzr: Tensor,
                W_hh: Tensor, bf16: bool = False) -> Tensor:
        ext = _begin(ctx, P, ids, H0, 3, bf16)
        if ext is not None:
            Y, ZR, H_tilde, S = ext.gru_forward(P.contiguous(), ids, H0, W_hzr.contiguous(),
                                                W_hh.contiguous(), ctx.kind)
            ctx.save_for_backward(H0, W_hzr, W_hh, Y, ZR, H_tilde, S)
            return Y
        P = _dense(P, ids)
        T, B, H3 = P.shape
        nh = H3 // 3
        r = bf16_operands(bf16)
        W_hzr_r, W_hh_r = r(W_hzr), r(W_hh)
        Y = P.new_empty(T, B, nh)  # (num_steps, batch_size, num_hiddens)
        ZR = P.new_empty(T, B, 2 * nh)
        H_tilde = P.new_empty(T, B, nh)
        S = P.new_empty(T, B, nh)
        H = H0
        for t in range(T):
            zr = torch.addmm(P[t, :, : 2 * nh], r(H), W_hzr_r, out=ZR[t]).sigmoid_()
            s = torch.mul(zr[:, nh:], H, out=S[t])
            h_tilde = torch.addmm(P[t, :, 2 * nh:], r(s), W_hh_r, out=H_tilde[t]).tanh_()
            # H' = H~ + Z ⊙ (H - H~)
            H = torch.addcmul(h_tilde, zr[:, :nh], H - h_tilde, out=Y[t])
        ctx.save_for_backward(H0, W_hzr, W_hh, Y, ZR, H_tilde, S)
        return Y

    @staticmethod
    def backward(ctx, dY: Tensor):
        H0, W_hzr, W_hh, Y, ZR, H_tilde, S = ctx.saved_tensors
        if ctx.ext is not None:
            dP, dH0, dW_hzr, dW_hh = ctx.ext.gru_backward(dY, ctx.ids, ctx.table_rows, H0,
                                                          W_hzr, W_hh, Y, ZR, H_tilde, S,
                                                          ctx.kind)
            return dP, None, dH0, dW_hzr, dW_hh, None
        T, B, nh = Y.shape
        Hprev = _prev_states(H0, Y)
        Z, R = ZR[..., :nh], ZR[..., nh:]
        # Coefficients that do not depend on the incoming gradient, for all steps at once.
        c_h = (1 - Z) * (1 - H_tilde * H_tilde)  # dH -> dA_h
        c_z = (Hprev - H_tilde) * Z * (1 - Z)  # dH -> dA_z
        c_r = Hprev * R * (1 - R)  # dS -> dA_r
        dA = dY.new_empty(T, B, 3 * nh)  # gradients of the pre-activations = dP
        r = bf16_operands(ctx.bf16)
        W_hzr_T, W_hh_T = r(W_hzr.t()), r(W_hh.t())
        dY = dY.contiguous()
        carry = torch.zeros_like(H0)
        for t in range(T - 1, -1, -1):
            dh = dY[t] + carry
            dah = torch.mul(dh, c_h[t], out=dA[t, :, 2 * nh:])
            dS = r(dah) @ W_hh_T
            torch.mul(dh, c_z[t], out=dA[t, :, :nh])
            torch.mul(dS, c_r[t], out=dA[t, :, nh:2 * nh])
            carry = torch.addmm(torch.addcmul(dh * Z[t], dS, R[t]), r(dA[t, :, :2 * nh]),
                                W_hzr_T)
        flat = T * B
        dW_hzr = r(Hprev.reshape(flat, nh)).t() @ r(dA[..., :2 * nh].reshape(flat, 2 * nh))
        dW_hh = r(S.reshape(flat, nh)).t() @ r(dA[..., 2 * nh:].reshape(flat, nh))
        return _input_grad(ctx, dA), None, carry, dW_hzr, dW_hh, None


class GRUResetAfterFunction(torch.autograd.Function):
    """torch.nn.GRU's formula: H~ = tanh(P_h + R ⊙ (H W_hh + b_hh)); W_h = [W_hz|W_hr|W_hh]."""

    @staticmethod
    def forward(ctx, P: Tensor, ids: Tensor | None, H0: Tensor, W_h: Tensor,
                b_hh: Tensor, bf16: bool = False) -> Tensor:
        ext = _begin(ctx, P, ids, H0, 3, bf16)
        if ext is not None:
            Y, ZR, Nt, M = ext.gru_ra_forward(P.contiguous(), ids, H0, W_h.contiguous(), b_hh,
                                              ctx.kind)
            ctx.save_for_backward(H0, W_h, Y, ZR, Nt, M)
            return Y
        P = _dense(P, ids)
        T, B, H3 = P.shape
        nh = H3 // 3
        r = bf16_operands(bf16)
        W_h_r = r(W_h)
        Y = P.new_empty(T, B, nh)
        ZR = P.new_empty(T, B, 2 * nh)
        Nt = P.new_empty(T, B, nh)
        M = P.new_empty(T, B, nh)  # H W_hh + b_hh
        H = H0
        for t in range(T):
            A = r(H) @ W_h_r  # (batch_size, 3 * num_hiddens)
            zr = torch.add(P[t, :, : 2 * nh], A[:, : 2 * nh], out=ZR[t]).sigmoid_()
            m = torch.add(A[:, 2 * nh:], b_hh, out=M[t])
            n = torch.addcmul(P[t, :, 2 * nh:], zr[:, nh:], m, out=Nt[t]).tanh_()
            H = torch.addcmul(n, zr[:, :nh], H - n, out=Y[t])
        ctx.save_for_backward(H0, W_h, Y, ZR, Nt, M)
        return Y

    @staticmethod
    def backward(ctx, dY: Tensor):
        H0, W_h, Y, ZR, Nt, M = ctx.saved_tensors
        if ctx.ext is not None:
            dP, dH0, dW_h, db_hh = ctx.ext.gru_ra_backward(dY, ctx.ids, ctx.table_rows, H0,
                                                           W_h, Y, ZR, Nt, M, ctx.kind)
            return dP, None, dH0, dW_h, db_hh, None
        T, B, nh = Y.shape
        Hprev = _prev_states(H0, Y)
        Z, R = ZR[..., :nh], ZR[..., nh:]
        c_n = (1 - Z) * (1 - Nt * Nt)
        # Every recurrent pre-activation gradient is dH times a precomputed coefficient.
        C = torch.cat([(Hprev - Nt) * Z * (1 - Z), c_n * M * R * (1 - R), c_n * R], dim=-1)
        C = C.view(T, B, 3, nh)
        dA = dY.new_empty(T, B, 3, nh)  # d(H W_h) pre-activations: [z | r | m]
        dH_all = dY.new_empty(T, B, nh)
        r = bf16_operands(ctx.bf16)
        W_h_T = r(W_h.t())
        dY = dY.contiguous()
        carry = torch.zeros_like(H0)
        for t in range(T - 1, -1, -1):
            dh = torch.add(dY[t], carry, out=dH_all[t])
            da = torch.mul(dh.unsqueeze(1), C[t], out=dA[t]).view(B, 3 * nh)
            carry = torch.addmm(dh * Z[t], r(da), W_h_T)
        dA = dA.view(T, B, 3 * nh)
        dP = torch.cat([dA[..., : 2 * nh], dH_all * c_n], dim=-1)
        flat = T * B
        dW_h = r(Hprev.reshape(flat, nh)).t() @ r(dA.reshape(flat, 3 * nh))
        db_hh = dA[..., 2 * nh:].sum(dim=(0, 1))
        return _input_grad(ctx, dP), None, carry, dW_h, db_hh, None


class LSTMFunction(torch.autograd.Function):
    """I, F, O = σ(.), C~ = tanh(.), C' = F ⊙ C + I ⊙ C~, H' = O ⊙ tanh(C').

    Returns (Y, C_T). IFGO holds the activated gates [I | F | C~ | O] of every step.
    """

    @staticmethod
    def forward(ctx, P: Tensor, ids: Tensor | None, H0: Tensor, C0: Tensor, W_h: Tensor,
                bf16: bool = False):
        ext = _begin(ctx, P, ids, H0, 4, bf16)
        if ext is not None:
            Y, IFGO, Cs, Tc = ext.lstm_forward(P.contiguous(), ids, H0, C0, W_h.contiguous(),
                                               ctx.kind)
            ctx.save_for_backward(H0, C0, W_h, Y, IFGO, Cs, Tc)
            return Y, Cs[-1].clone()
        P = _dense(P, ids)
        T, B, H4 = P.shape
        nh = H4 // 4
        Y = P.new_empty(T, B, nh)
        IFGO = P.new_empty(T, B, 4 * nh)  # activated gates [i | f | g | o]
        Cs = P.new_empty(T, B, nh)
        Tc = P.new_empty(T, B, nh)
        r = bf16_operands(bf16)
        W_h_r = r(W_h)
        H, C = H0, C0
        for t in range(T):
            g = torch.addmm(P[t], r(H), W_h_r, out=IFGO[t])  # this step's gates
            g[:, : 2 * nh].sigmoid_()
            g[:, 2 * nh: 3 * nh].tanh_()
            g[:, 3 * nh:].sigmoid_()
            C = torch.addcmul(C * g[:, nh: 2 * nh], g[:, :nh], g[:, 2 * nh: 3 * nh], out=Cs[t])
            tc = torch.tanh(C, out=Tc[t])
            H = torch.mul(g[:, 3 * nh:], tc, out=Y[t])
        ctx.save_for_backward(H0, C0, W_h, Y, IFGO, Cs, Tc)
        return Y, Cs[-1].clone()

    @staticmethod
    def backward(ctx, dY: Tensor, dC_T: Tensor | None):
        H0, C0, W_h, Y, IFGO, Cs, Tc = ctx.saved_tensors
        if ctx.ext is not None:
            dP, dH0, dC0, dW_h = ctx.ext.lstm_backward(dY, dC_T, ctx.ids, ctx.table_rows, H0,
                                                       C0, W_h, Y, IFGO, Cs, Tc, ctx.kind)
            return dP, None, dH0, dC0, dW_h, None
        T, B, nh = Y.shape
        Hprev = _prev_states(H0, Y)
        Cprev = _prev_states(C0, Cs)
        I, F, C_tilde, O = (IFGO[..., k * nh:(k + 1) * nh] for k in range(4))
        k_c = O * (1 - Tc * Tc)  # dH -> dC
        Cc = torch.cat([C_tilde * I * (1 - I), Cprev * F * (1 - F), I * (1 - C_tilde * C_tilde)],
                       dim=-1)
        Cc = Cc.view(T, B, 3, nh)  # dC -> [dA_i | dA_f | dA_g]
        c_o = Tc * O * (1 - O)  # dH -> dA_o
        dA = dY.new_empty(T, B, 4 * nh)
        r = bf16_operands(ctx.bf16)
        W_h_T = r(W_h.t())
        dY = dY.contiguous()
        carry_h = torch.zeros_like(H0)
        carry_c = dC_T.contiguous() if dC_T is not None else torch.zeros_like(C0)
        for t in range(T - 1, -1, -1):
            dh = dY[t] + carry_h
            dc = torch.addcmul(carry_c, dh, k_c[t])
            torch.mul(dc.unsqueeze(1), Cc[t], out=dA[t, :, : 3 * nh].view(B, 3, nh))
            torch.mul(dh, c_o[t], out=dA[t, :, 3 * nh:])
            carry_c = dc * F[t]
            carry_h = r(dA[t]) @ W_h_T
        flat = T * B
        dW_h = r(Hprev.reshape(flat, nh)).t() @ r(dA.reshape(flat, 4 * nh))
        return _input_grad(ctx, dA), None, carry_h, carry_c, dW_h, None


class RNNFunction(torch.autograd.Function):
    """H' = tanh(P + H W_hh)."""

    @staticmethod
    def forward(ctx, P: Tensor, ids: Tensor | None, H0: Tensor, W_hh: Tensor,
                bf16: bool = False) -> Tensor:
        ext = _begin(ctx, P, ids, H0, 1, bf16)
        if ext is not None:
            (Y,) = ext.rnn_forward(P.contiguous(), ids, H0, W_hh.contiguous(), ctx.kind)
            ctx.save_for_backward(H0, W_hh, Y)
            return Y
        P = _dense(P, ids)
        T, B, nh = P.shape
        Y = P.new_empty(T, B, nh)
        r = bf16_operands(bf16)
        W_hh_r = r(W_hh)
        H = H0
        for t in range(T):
            H = torch.addmm(P[t], r(H), W_hh_r, out=Y[t]).tanh_()
        ctx.save_for_backward(H0, W_hh, Y)
        return Y

    @staticmethod
    def backward(ctx, dY: Tensor):
        H0, W_hh, Y = ctx.saved_tensors
        if ctx.ext is not None:
            dP, dH0, dW = ctx.ext.rnn_backward(dY, ctx.ids, ctx.table_rows, H0, W_hh, Y,
                                               ctx.kind)
            return dP, None, dH0, dW, None
        T, B, nh = Y.shape
        c = 1 - Y * Y
        dA = dY.new_empty(T, B, nh)
        r = bf16_operands(ctx.bf16)
        W_T = r(W_hh.t())
        dY = dY.contiguous()
        carry = torch.zeros_like(H0)
        for t in range(T - 1, -1, -1):
            da = torch.mul(dY[t] + carry, c[t], out=dA[t])
            carry = r(da) @ W_T
        flat = T * B
        dW = r(_prev_states(H0, Y).reshape(flat, nh)).t() @ r(dA.reshape(flat, nh))
        return _input_grad(ctx, dA), None, carry, dW, None


# ---------------------------------------------------------------- what runs, and how fast


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


@dataclass(frozen=True)
class TorchPath:
    """torch.nn's recurrence (cuDNN, oneDNN or its loops): a model's `kernels`."""

    num_gates: int  # blocks of the recurrent weight: 3 GRU, 4 LSTM, 1 RNN
    num_hiddens: int

    def path(self, device: torch.device | str, precision: str = "fp32") -> str:
        """Which code runs the recurrence here, for the train header and summary.json."""
        return "torch.nn" + (" under bf16 autocast" if precision == "bf16" else "")

    def bf16_speed(self, batch_size: int) -> tuple[float, str]:
        """How fast the recurrent products run in bf16 against fp32 on this CPU, measured now
        at the step's shape: (speed ratio, the timings in words); torch.mm of bf16 against
        fp32 tensors."""
        n, k = self.num_gates * self.num_hiddens, self.num_hiddens
        a, b = mm_operands(batch_size, n, k)
        a16, b16 = a.bfloat16(), b.bfloat16()
        work = 2.0 * batch_size * n * k
        fp32 = best_time(lambda: torch.mm(a, b), work)
        bf16 = best_time(lambda: torch.mm(a16, b16), work)
        return fp32 / bf16, (f"torch.mm {batch_size}x{k}x{n}: bf16 {bf16 * 1e3:.3f} ms, "
                             f"fp32 {fp32 * 1e3:.3f} ms")


@dataclass(frozen=True)
class FusedPath(TorchPath):
    """This module's recurrences: the fused kernels where they load, else the loops."""

    def path(self, device: torch.device | str, precision: str = "fp32") -> str:
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

    def bf16_speed(self, batch_size: int) -> tuple[float, str]:
        """The fused kernels' bf16 GEMM (the kind the step shape chose) against their fp32
        sgemm, on one thread at the rows a thread runs; without the kernels, the loops' fp32
        GEMMs on rounded operands (rounding only adds work)."""
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


@dataclass(frozen=True)
class LoopPath(TorchPath):
    """The Mogrifier LSTM's recurrence, whose every step's input depends on the previous
    output: in fp32 on the CPU, its own fused kernels where they load; else stepped in Python
    with PyTorch ops (autograd builds the backward)."""

    def path(self, device: torch.device | str, precision: str = "fp32") -> str:
        if precision == "bf16":
            return "PyTorch step loop (autograd) under bf16 autocast"
        k = current()
        if torch.device(device).type != "cpu":
            why = f"no fused kernels for {torch.device(device).type}"
        elif not k.fused:
            why = "chosen by cells.portable_loops()"
        elif k.library.load() is None:
            why = str(k.library.why)
        else:
            return "fused kernels"
        return f"PyTorch step loop (autograd): {why}"
