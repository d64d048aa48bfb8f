"""How far the scratch GRU can lead nn.GRU on this CPU: the GEMM bound of configs/gru.yaml.

Issue 14 asks for the main job at >= 2x nn.GRU's tokens/s. The fused kernels give each of
the threads its own rows of the batch and run every step's recurrent products with
single-threaded BLAS, so their speed is bounded by single-thread GEMM throughput at the
step shapes. This script measures, in one run:
  - one thread's GEMM rate at those shapes for each GEMM the kernels have (fp32 sgemm; for
    train.precision=bf16, MKL's bf16 x bf16 -> fp32 GEMM and sgemm on bf16-rounded operands,
    the conversion of the left operand included), and torch.mm on bfloat16 tensors;
  - the steady-state step time of configs/gru.yaml (nn.GRU) and of configs/gru-scratch.yaml
    (fused kernels; with model.reset_after=true, the nn.GRU formula; with
    train.precision=bf16), and of configs/lstm.yaml (nn.LSTM) against lstm-scratch at its
    shape (fp32 and bf16), through Trainer.train_step: 5 rounds of 10 steps, the cases
    interleaved, medians; each scratch row's ratio is against its torch.nn model;
and prints the GEMM-only bound of the scratch GRU: the recurrent FLOPs of one step (forward
H [W_hz|W_hr] and (R*H) W_hh, backward twice that) divided by the measured GEMM rate on
all cores; then, from PyTorch's profiler, where a gru-scratch and an lstm-scratch step's
time goes (the fused recurrence, the output projection, the loss, the masks, the
optimizer, clipping, the rest).

Run: python benchmarks/gemm.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gru_lm._ext import cpu_line, cpu_summary, kernels, why_not  # noqa: E402
from gru_lm.cells import GEMM_NAMES, bf16_gemm_report  # noqa: E402


def rate(fn, flop: float, reps: int = 200) -> float:
    """GFLOP/s of `fn`, best of 3 timings of `reps` calls after a warm-up."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return flop / best / 1e9


def gemm_rates(rows: int, nh: int) -> dict[str, float]:
    """Single-thread GFLOP/s of the step's products, (rows x nh) @ (nh x 2nh) and @ (nh x nh),
    for each GEMM of the fused kernels and for torch.mm on bfloat16."""
    import torch

    ext = kernels()
    if ext is None:
        sys.exit(f"benchmarks/gemm.py measures the fused kernels, which are unavailable: "
                 f"{why_not()}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    flop = 2 * rows * nh * 3 * nh
    for kind in ext.gemm_kinds():
        seconds = sum(ext.time_gemm(kind, rows, n, nh, 50) for n in (2 * nh, nh))
        out[GEMM_NAMES[kind]] = flop / seconds / 1e9
    h = torch.randn(rows, nh).bfloat16()
    w2, w1 = torch.randn(nh, 2 * nh).bfloat16(), torch.randn(nh, nh).bfloat16()

    def step():
        torch.mm(h, w2)
        torch.mm(h, w1)

    out["torch.mm bf16 (bf16 out)"] = rate(step, flop, reps=5)
    torch.set_num_threads(threads)
    return out


def step_ms(cases: dict[str, tuple[str, list[str]]], threads: int, rounds: int = 5
            ) -> dict[str, float]:
    """Steady-state milliseconds of one Trainer.train_step per case: rounds of 10 steps,
    the cases interleaved, medians."""
    import statistics

    from gru_lm.building import build_trainer
    from gru_lm.config import load_config
    from gru_lm.data import load_corpus

    ready = {}
    for name, (config, overrides) in cases.items():
        cfg = load_config(ROOT / config, [f"train.threads={threads}", *overrides])
        tr = build_trainer(cfg, load_corpus(cfg.data, progress=False))
        X, Y = tr._next_batch()
        for _ in range(5):
            tr.train_step(X, Y)
        ready[name] = (tr, X, Y)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (tr, X, Y) in ready.items():
            t = time.perf_counter()
            for _ in range(10):
                tr.train_step(X, Y)
            times[name].append((time.perf_counter() - t) / 10 * 1000)
    return {name: statistics.median(v) for name, v in times.items()}


# The parts of a training step, by the profiler's op names (self time, so nothing counts
# twice): what the issue asks to see beside the recurrent GEMMs.
PARTS = [
    ("recurrence, forward (fused kernel: GEMMs + gates)", ("GRUFunction", "LSTMFunction",
                                                            "RNNFunction")),
    ("recurrence, backward (fused kernel)", ("GRUFunctionBackward", "LSTMFunctionBackward",
                                             "RNNFunctionBackward")),
    ("other matmuls (output projection, weight gradients)", ("aten::addmm", "aten::mm",
                                                             "aten::linear", "aten::matmul",
                                                             "aten::bmm")),
    ("loss (log-softmax, NLL) and its gradient", ("aten::_log_softmax", "aten::nll_loss",
                                                  "_log_softmax_backward", "nll_loss_backward",
                                                  "aten::_log_softmax_backward_data",
                                                  "aten::nll_loss_forward",
                                                  "aten::nll_loss_backward")),
    ("dropout and DropConnect masks", ("aten::randint", "aten::random_", "aten::lt",
                                       "aten::bernoulli_")),
    ("optimizer (AdamW)", ("Optimizer.step", "aten::_foreach_", "aten::_fused_adam")),
    ("gradient clipping", ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::stack",
                           "aten::clamp")),
]


def profile(config: str, overrides: list[str], threads: int, steps: int = 10
            ) -> tuple[float, list[tuple[str, float]]]:
    """Milliseconds of one Trainer.train_step and where they go: each PART's share of the
    profiled self time, the rest in one line."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from gru_lm.building import build_trainer
    from gru_lm.config import load_config
    from gru_lm.data import load_corpus

    cfg = load_config(ROOT / config, [f"train.threads={threads}", *overrides])
    tr = build_trainer(cfg, load_corpus(cfg.data, progress=False))
    X, Y = tr._next_batch()
    for _ in range(5):
        tr.train_step(X, Y)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            tr.train_step(X, Y)
        wall = (time.perf_counter() - t) / steps * 1000
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    shares, used = [], set()
    for label, names in PARTS:
        mine = [(k, t) for k, t in events if k not in used and any(
            k == n or k.startswith(n + "#") or (n.endswith("_") and k.startswith(n))
            for n in names)]
        used |= {k for k, _ in mine}
        shares.append((label, sum(t for _, t in mine) / total))
    rest = sorted(((k, t) for k, t in events if k not in used), key=lambda e: -e[1])
    top = ", ".join(f"{k.removeprefix('aten::')} {t / total:.0%}" for k, t in rest[:4])
    shares.append((f"everything else (largest: {top})", 1 - sum(x for _, x in shares)))
    return wall, shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("GRU_LM_OFFLINE", "1")
    threads = len(os.sched_getaffinity(0))
    B, T, nh = 64, 50, 512  # configs/gru.yaml
    rows = B // threads  # each thread's share of the batch
    print(cpu_line())
    g = gemm_rates(rows, nh)
    print(f"one thread, ({rows} x {nh}) @ ({nh} x {3 * nh} in two products):")
    for name, gflops in g.items():
        print(f"  {name:<34} {gflops:6.1f} GFLOP/s")
    cases = {"gru (nn.GRU)": ("configs/gru.yaml", []),
             "gru-scratch": ("configs/gru-scratch.yaml", []),
             "gru-scratch reset_after": ("configs/gru-scratch.yaml", ["model.reset_after=true"]),
             "gru-scratch bf16": ("configs/gru-scratch.yaml", ["train.precision=bf16"]),
             "lstm (nn.LSTM)": ("configs/lstm.yaml", []),
             "lstm-scratch": ("configs/lstm.yaml", ["model.name=lstm-scratch"]),
             "lstm-scratch bf16": ("configs/lstm.yaml", ["model.name=lstm-scratch",
                                                         "train.precision=bf16"])}
    ms = step_ms(cases, threads)
    print(f"bf16 GEMM chosen: {bf16_gemm_report()}")
    tokens = B * T
    flop = 3 * T * 2 * B * nh * 3 * nh  # forward + backward (twice the forward) per step
    fp32 = g[GEMM_NAMES[0]]
    bound_ms = flop / (fp32 * threads * 1e9) * 1000
    base = tokens / ms["gru (nn.GRU)"] * 1000
    print(f"configs/gru.yaml's shape: batch {B}, {T} steps, {nh} hiddens, {threads} threads")
    for k, v in ms.items():
        tps = tokens / v * 1000
        ref = "lstm (nn.LSTM)" if k.startswith("lstm") else "gru (nn.GRU)"
        print(f"  {k:<24} {v:7.1f} ms/step {tps:>9,.0f} tok/s  {ms[ref] / v:.2f}x "
              f"{ref.split()[1].strip('()')}")
    bound = tokens / bound_ms * 1000
    print(f"  {'recurrent GEMMs only':<24} {bound_ms:7.1f} ms/step {bound:>9,.0f} tok/s  "
          f"{bound / base:.2f}x nn.GRU (fp32 bound)")
    need = flop / (ms["gru (nn.GRU)"] / 2 / 1000) / threads / 1e9
    best = max(g, key=g.__getitem__)
    print(f"2x nn.GRU needs {ms['gru (nn.GRU)'] / 2:.1f} ms/step: the recurrent GEMMs alone "
          f"at >= {need:.0f} GFLOP/s a thread (fp32 sgemm here: {fp32:.0f}; fastest GEMM: "
          f"{best}, {g[best]:.0f})")
    breakdown = {}
    for name, config in (("gru-scratch", "configs/gru-scratch.yaml"),
                         ("lstm-scratch", "configs/recipe.yaml")):
        extra = ["model.name=lstm-scratch"] if name == "lstm-scratch" else []
        wall, shares = profile(config, extra, threads)
        breakdown[name] = {"step_ms": wall, "shares": dict(shares)}
        print(f"where a {name} step's {wall:.1f} ms go (profiler self time, {threads} "
              "threads):")
        for label, share in shares:
            print(f"  {share:6.1%} {share * wall:6.1f} ms  {label}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "gemm_gflops": g,
                                         "step_ms": ms, "bound_ms": bound_ms,
                                         "breakdown": breakdown}, indent=2))


if __name__ == "__main__":
    main()
