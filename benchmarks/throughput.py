"""Training throughput (tokens/s) of every registered model against the book's way and sgemm.

Contenders, interleaved and repeated, all on the same batches of the book's setting
(first 10,000 tokens, sequential sampler, SGD lr 1, clip 1):
  * ours:   each registered model through the real Trainer.train_step; the scratch models
            also with train.precision=bf16 (bf16-rounded GEMM operands, fp32 accumulation);
  * naive:  the book's from-scratch code: one-hot inputs, one matmul per gate, a Python
            loop over steps, autograd, d2l's grad_clipping and hand-written SGD;
  * concise: the book's concise RNNModel: one-hot into nn.GRU / nn.LSTM / nn.RNN;
  * bound:  the time of only the GEMMs one training batch needs, measured at their shapes.

Run: python benchmarks/throughput.py [--reps 5] [--json out.json]   (make bench)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gru_lm._ext import cpu_line, cpu_summary  # noqa: E402
from gru_lm.config import validate  # noqa: E402
from gru_lm.data import load_corpus  # noqa: E402
from gru_lm.models import build_model, list_models  # noqa: E402
from gru_lm.trainer import Trainer  # noqa: E402

# ---------------------------------------------------------------- the book's way


def _normal(*shape):
    return (torch.randn(*shape) * 0.01).requires_grad_()


def _three(V, H):
    return _normal(V, H), _normal(H, H), torch.zeros(H, requires_grad=True)


class NaiveScratch:
    """d2l's RNNModelScratch: one-hot, per-gate matmuls, Python loop, autograd."""

    def __init__(self, kind: str, V: int, H: int):
        self.kind, self.V, self.H = kind, V, H
        gates = {"gru": 3, "lstm": 4, "rnn": 1}[kind]
        self.params = [p for _ in range(gates) for p in _three(V, H)]
        self.params += [_normal(H, V), torch.zeros(V, requires_grad=True)]

    def begin_state(self, B):
        z = torch.zeros(B, self.H)
        return (z, z.clone()) if self.kind == "lstm" else (z,)

    def __call__(self, X, state):
        inputs = F.one_hot(X.T, self.V).float()
        p = self.params
        W_hq, b_q = p[-2], p[-1]
        outputs = []
        if self.kind == "gru":
            W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h = p[:9]
            (H,) = state
            for x in inputs:
                Z = torch.sigmoid(x @ W_xz + H @ W_hz + b_z)
                R = torch.sigmoid(x @ W_xr + H @ W_hr + b_r)
                H_tilde = torch.tanh(x @ W_xh + (R * H) @ W_hh + b_h)
                H = Z * H + (1 - Z) * H_tilde
                outputs.append(H @ W_hq + b_q)
            state = (H,)
        elif self.kind == "lstm":
            W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c = p[:12]
            H, C = state
            for x in inputs:
                I = torch.sigmoid(x @ W_xi + H @ W_hi + b_i)
                Fg = torch.sigmoid(x @ W_xf + H @ W_hf + b_f)
                O = torch.sigmoid(x @ W_xo + H @ W_ho + b_o)
                C_tilde = torch.tanh(x @ W_xc + H @ W_hc + b_c)
                C = Fg * C + I * C_tilde
                H = O * torch.tanh(C)
                outputs.append(H @ W_hq + b_q)
            state = (H, C)
        else:
            W_xh, W_hh, b_h = p[:3]
            (H,) = state
            for x in inputs:
                H = torch.tanh(x @ W_xh + H @ W_hh + b_h)
                outputs.append(H @ W_hq + b_q)
            state = (H,)
        return torch.cat(outputs, dim=0), state


class Concise(nn.Module):
    """d2l's RNNModel: one-hot into a torch.nn RNN, then a Linear layer."""

    def __init__(self, cls, V: int, H: int):
        super().__init__()
        self.rnn, self.V, self.H = cls(V, H), V, H
        self.linear = nn.Linear(H, V)
        self.lstm = cls is nn.LSTM

    def begin_state(self, B):
        z = torch.zeros(1, B, self.H)
        return (z, z.clone()) if self.lstm else z

    def forward(self, X, state):
        Y, state = self.rnn(F.one_hot(X.T, self.V).float(), state)
        return self.linear(Y.reshape(-1, Y.shape[-1])), state


def d2l_grad_clipping(params, theta):
    norm = torch.sqrt(sum(torch.sum(p.grad ** 2) for p in params))
    if norm > theta:
        for p in params:
            p.grad[:] *= theta / norm


def book_step_fn(model, params, lr, is_module):
    """The book's train_epoch_ch8 inner step, with sequential-partition state carrying:
    torch.optim.SGD for an nn.Module, the hand-written d2l.sgd for the scratch model."""
    holder = {"state": None}
    updater = torch.optim.SGD(params, lr) if is_module else None

    def step(X, Y):
        state = holder["state"]
        if state is None:
            state = model.begin_state(X.shape[0])
        else:
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) \
                else state.detach()
        y_hat, state = model(X, state)
        loss = F.cross_entropy(y_hat, Y.T.reshape(-1))
        if updater is not None:
            updater.zero_grad()
            loss.backward()
            d2l_grad_clipping(params, 1)
            updater.step()
        else:
            loss.backward()
            d2l_grad_clipping(params, 1)
            with torch.no_grad():
                for p in params:
                    p -= lr * p.grad
                    p.grad.zero_()
        holder["state"] = state
        return loss

    return step


# ---------------------------------------------------------------- the sgemm bound


def gemm_bound_fn(kind: str, V: int, H: int, L: int, B: int, T: int):
    """One batch's GEMMs only (fwd + bwd), at the shapes the scratch cells use."""
    G = {"gru": 3, "lstm": 4, "rnn": 1}[kind]
    h = torch.randn(B, H)
    W_h = torch.randn(H, G * H)
    dA = torch.randn(B, G * H)
    big_in = torch.randn(T * B, H)
    big_dA = torch.randn(T * B, G * H)
    W_x = torch.randn(H, G * H)
    W_out = torch.randn(H, V)
    d_out = torch.randn(T * B, V)
    out_buf = torch.empty(B, G * H)
    back_buf = torch.empty(B, H)

    def step(X, Y):
        for layer in range(L):
            for _ in range(T):
                torch.mm(h, W_h, out=out_buf)  # forward recurrent product
                torch.mm(dA, W_h.t(), out=back_buf)  # backward through it
            big_in.t() @ big_dA  # recurrent weight gradient
            if layer:  # input projection of deeper layers: forward, dX, dW
                big_in @ W_x
                big_dA @ W_x.t()
                big_in.t() @ big_dA
        big_in @ W_out  # output layer: forward, dH, dW
        d_out @ W_out.t()
        big_in.t() @ d_out

    return step


# ---------------------------------------------------------------- harness


def make_contenders(setting: dict, corpus):
    V, H, L, B, T = (len(corpus.vocab), setting["num_hiddens"], setting["num_layers"],
                     setting["batch_size"], setting["num_steps"])
    out = {}
    for name in list_models():
        # torch.nn's bf16 (autocast) is left out: on a CPU without bf16 instructions its
        # matmuls run ~50x slower than fp32, which would stall the whole table.
        for precision in ("fp32", "bf16") if name.endswith("-scratch") else ("fp32",):
            cfg = validate({
                "data": {"max_tokens": 10_000, "train_fraction": 1, "val_fraction": 0,
                         "test_fraction": 0},
                "model": {"name": name, "num_hiddens": H, "num_layers": L},
                "train": {"optimizer": "sgd", "lr": 1, "grad_clip": 1, "batch_size": B,
                          "num_steps": T, "sampler": "sequential", "max_steps": 1,
                          "device": "cpu", "sample_prefixes": [], "precision": precision},
            })
            torch.manual_seed(0)
            model = build_model(cfg.model, V)
            trainer = Trainer(cfg, model, torch.optim.SGD(model.parameters(), lr=1.0), corpus)
            out[f"ours {name}" + (" bf16" if precision == "bf16" else "")] = trainer.train_step
    if L == 1:
        for kind in ("gru", "lstm", "rnn"):
            torch.manual_seed(0)
            naive = NaiveScratch(kind, V, H)
            out[f"naive {kind}-scratch"] = book_step_fn(naive, naive.params, 1.0, False)
            concise = Concise({"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind], V, H)
            out[f"concise {kind}"] = book_step_fn(concise, list(concise.parameters()), 1.0,
                                                  True)
    for kind in ("gru", "lstm", "rnn"):
        out[f"bound {kind}"] = gemm_bound_fn(kind, V, H, L, B, T)
    return out


def batches(corpus, B, T, n):
    from gru_lm.data import BatchLoader

    loader = BatchLoader(corpus.train, B, T, "sequential", seed=0)
    X, Y = loader.epoch().stacked()
    return [(X[i % len(X)], Y[i % len(X)]) for i in range(n)]


def measure(step, data, warmup=2) -> float:
    for X, Y in data[:warmup]:
        step(X, Y)
    t0 = time.perf_counter()
    for X, Y in data:
        step(X, Y)
    return sum(X.numel() for X, _ in data) / (time.perf_counter() - t0)


def reference_of(name: str) -> str | None:
    kind = name.split()[1]
    if kind.endswith("-scratch"):
        return f"naive {kind}"
    return f"concise {kind}" if kind in ("gru", "lstm", "rnn") else None


def run_setting(setting: dict, corpus, reps: int, n_batches: int) -> dict:
    contenders = make_contenders(setting, corpus)
    data = batches(corpus, setting["batch_size"], setting["num_steps"], n_batches)
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(reps):  # interleaved: every contender once per repetition
        for name, step in contenders.items():
            samples[name].append(measure(step, data))
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    for name, tps in med.items():
        if name.startswith("bound"):
            continue
        kind = name.split()[1].removesuffix("-scratch")
        ref = reference_of(name) if name.startswith("ours") else None
        rows.append({
            "contender": name, "tokens_per_s": tps,
            "reference": ref if ref in med else None,
            "vs_reference": tps / med[ref] if ref in med else None,
            "vs_bound": tps / med[f"bound {kind}"],
        })
    bounds = {k: v for k, v in med.items() if k.startswith("bound")}
    return {"setting": setting, "rows": rows, "bounds": bounds, "samples": samples}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["setting"]
    table = Table(title=f"batch {s['batch_size']}, num_steps {s['num_steps']}, "
                        f"{s['num_hiddens']} hiddens x {s['num_layers']} layer(s), "
                        f"{torch.get_num_threads()} threads")
    for col in ("contender", "tokens/s", "reference", "x reference", "share of sgemm bound"):
        table.add_column(col, justify="left" if col in ("contender", "reference") else "right")
    for r in result["rows"]:
        table.add_row(r["contender"], f"{r['tokens_per_s']:,.0f}", r["reference"] or "",
                      f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "",
                      f"{r['vs_bound']:.0%}")
    for k, v in result["bounds"].items():
        table.add_row(k + " (GEMMs only)", f"{v:,.0f}", "", "", "100%")
    Console(width=120).print(table)


SETTINGS = [
    {"batch_size": 32, "num_steps": 35, "num_hiddens": 256, "num_layers": 1},
    {"batch_size": 128, "num_steps": 35, "num_hiddens": 256, "num_layers": 1},
    {"batch_size": 32, "num_steps": 35, "num_hiddens": 512, "num_layers": 2},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="only the book's setting")
    ap.add_argument("--json", type=Path, default=Path("runs/bench/throughput.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    cfg = validate({"data": {"max_tokens": 10_000, "train_fraction": 1, "val_fraction": 0,
                             "test_fraction": 0}, "train": {"max_steps": 1}})
    corpus = load_corpus(cfg.data, progress=False)
    results = []
    for setting in SETTINGS[:1] if args.quick else SETTINGS:
        n = args.batches if setting["num_hiddens"] <= 256 else max(3, args.batches // 3)
        result = run_setting(setting, corpus, args.reps, n)
        print_table(result)
        results.append(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "cpu": cpu_summary(),
                                     "threads": torch.get_num_threads(),
                                     "results": results}, indent=1) + "\n")
    print(f"json: {args.json}")


if __name__ == "__main__":
    main()
