"""Train every registered model briefly on CUDA (fp32 and bf16) and check a CUDA resume.

Needs a GPU; CI never runs it. Prints one line per run and writes JSON with --json:

    python benchmarks/cuda_check.py --steps 300 --json cuda.json

Each run is a real `gru-lm train` (configs/gru.yaml's data, optimizer and shapes) with the
budget replaced by a step count; tokens/s excludes evaluation, as in every run summary.
The book's figure for its concise nn.GRU (section 9.1.3) on one GPU is 334,788 tokens/s
(batch 32, 35 steps, 256 hiddens); `--book` runs the same setting here for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gru-scratch", "lstm-scratch", "rnn-scratch", "gru", "lstm", "rnn")
BOOK_TOKENS_PER_S = 334_788


def train(runs: Path, name: str, config: str, *overrides: str, resume: bool = False) -> dict:
    args = ["--resume", str(runs / name)] if resume else ["--config", config, "--name", name]
    cmd = [sys.executable, "-m", "gru_lm", "train", "-q", *args, f"run.runs_dir={runs}",
           "train.device=cuda", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1][:300]}
    return json.loads((runs / name / "summary.json").read_text())


def _state(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--book", action="store_true", help="also run the book's GRU setting")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    budget = [f"train.max_steps={a.steps}", "train.time_budget_s=null",
              "train.early_stopping_patience=null", f"train.eval_interval={a.steps}",
              f"train.sample_interval={a.steps}"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for model in MODELS:
            for precision in ("fp32", "bf16"):
                name = f"{model}-{precision}"
                s = train(runs, name, "configs/gru.yaml", f"model.name={model}",
                          f"train.precision={precision}", *budget)
                row = {"model": model, "precision": precision, **{
                    k: s.get(k) for k in ("tokens_per_s", "best_val_ppl", "kernels", "error")
                    if k in s}}
                results.append(row)
                print(json.dumps(row))
        # Resume on the GPU mid-epoch with a carried state: must equal the straight run.
        for model in ("gru-scratch", "gru"):
            common = [f"model.name={model}", "model.dropout=0", "train.time_budget_s=null",
                      "train.early_stopping_patience=null", "train.eval_interval=20",
                      "train.sample_interval=1000"]
            straight = train(runs, f"straight-{model}", "configs/gru.yaml", *common,
                             "train.max_steps=40")
            train(runs, f"part-{model}", "configs/gru.yaml", *common, "train.max_steps=20")
            resumed = train(runs, f"part-{model}", "", "train.max_steps=40", resume=True)
            if "error" in straight or "error" in resumed:
                row = {"resume": model, "error": straight.get("error") or resumed.get("error")}
            else:
                a_, b_ = _state(runs / f"straight-{model}"), _state(runs / f"part-{model}")
                diff = max(float((a_[k].float() - b_[k].float()).abs().max()) for k in a_)
                row = {"resume": model, "max_abs_weight_diff": diff}
            results.append(row)
            print(json.dumps(row))
        if a.book:
            s = train(runs, "book", "configs/d2l-gru-scratch.yaml", "train.epochs=50")
            row = {"book_setting": "d2l-gru-scratch", **{k: s.get(k) for k in (
                "tokens_per_s", "final_train_ppl", "error") if k in s},
                "book_tokens_per_s": BOOK_TOKENS_PER_S}
            results.append(row)
            print(json.dumps(row))
    if a.json:
        a.json.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                      "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
