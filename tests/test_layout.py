"""The house rules that keep gru-lm easy to change: layering, visible kernels, one run owner."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, one_line_error

from gru_lm.rundir import RunDir

PACKAGE = Path(__file__).resolve().parents[1] / "gru_lm"
# Bottom to top: a module may import only from modules listed before it (lazy imports too).
LAYERS = ["__init__", "errors", "utils", "stats", "supervisor", "distributed", "yamlconf", "config",
          "script", "poetry", "httpget", "download", "importing", "tokenstore", "data", "ngram",
          "mixing", "_ext", "cells", "recurrent", "scratch", "torchnn", "mogrifier", "models",
          "metrics", "cache", "dynamic", "poems", "decoding", "sampling", "checkpoint", "exporting",
          "rundir", "schedule", "ema", "display", "members", "scorers", "evaluation", "trainstate",
          "resume", "preflight", "trainer", "building", "runner", "plots", "report", "campaign",
          "gatereport", "argcheck", "trained", "api", "server", "terminal", "views", "cliargs",
          "clidata", "cli", "__main__"]
REEXPORTED = {"api", "errors"}  # the package re-exports them lazily (gru_lm.train, ...)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gru_lm"):
            name = node.module.removeprefix("gru_lm").lstrip(".") or "__init__"
            if name == "__init__":  # `from gru_lm import x`: x may be a module
                found |= {a.name for a in node.names if a.name in LAYERS} or {"__init__"}
            else:
                found.add(name)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("gru_lm.") for a in node.names
                      if a.name.startswith("gru_lm.")}
    return found


def test_every_module_has_a_layer():
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_no_module_imports_from_a_module_above_it(module):
    rank = LAYERS.index(module)
    above = sorted(m for m in _imports(PACKAGE / f"{module}.py") if LAYERS.index(m) >= rank
                   and m != module and not (module == "__init__" and m in REEXPORTED))
    assert not above, f"gru_lm/{module}.py imports from {above}, which sit above it"


# ---------------------------------------------------------------- kernels say what runs


def test_training_without_a_compiler_uses_the_loops_and_says_why(workdir, monkeypatch):
    from torch.utils import cpp_extension

    from gru_lm import _ext, cells

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'gru_lm_cells': c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with cells.use(cells.Kernels(library=_ext.Library())):  # a process that has none yet
        r = cli("train", "--config", "configs/tiny.yaml", "--name", "nocc")
    assert r.exit_code == 0, r.output
    assert "portable loops: RuntimeError: Error building extension" in r.output
    summary = json.loads(Path("runs/nocc/summary.json").read_text())
    assert summary["kernels"].startswith("portable loops: RuntimeError: Error building")
    assert 1 < summary["best_val_ppl"] < 28


def test_summary_names_the_code_that_ran(tiny_run):
    from gru_lm._ext import kernels, why_not

    summary = json.loads((tiny_run() / "summary.json").read_text())
    expected = "fused kernels" if kernels() is not None else f"portable loops: {why_not()}"
    assert summary["kernels"] == expected and summary["device"] == "cpu"


def test_no_module_global_decides_which_kernel_runs():
    """The kernel choice is an explicit object in force for a block, not a flag to flip."""
    import ast

    for module in ("cells", "_ext", "models"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        assigned = [t.id for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)]
        assert not [n for n in assigned if n in ("_USE_KERNELS", "_BF16_CHOICES", "_STATE")]
        assert "global " not in (PACKAGE / f"{module}.py").read_text()


def test_the_first_build_says_so_once(tmp_path, capsys):
    from gru_lm import _ext

    _ext._announce_build(tmp_path, "gru_lm_cells_abc")
    assert capsys.readouterr().err == (f"building fused kernels, once, ~40 s (cached in "
                                       f"{tmp_path})\n")
    (tmp_path / "gru_lm_cells_abc.so").write_bytes(b"")
    _ext._announce_build(tmp_path, "gru_lm_cells_abc")
    assert capsys.readouterr().err == ""  # built: nothing to say


def test_the_kernel_cache_is_keyed_by_the_cpu(monkeypatch):
    from gru_lm import _ext

    names = set()
    for cpu in ("x86_64 model name: Intel Xeon | flags: avx2", "x86_64 model name: AMD EPYC | "
                "flags: avx2 avx512f avx512_bf16"):
        monkeypatch.setattr(_ext, "cpu_signature", lambda cpu=cpu: cpu)
        names.add(_ext.build_name())
    assert len(names) == 2 and all(n.startswith("gru_lm_cells_") for n in names)
    assert "flags" in _ext.cpu_signature() or "model name" in _ext.cpu_signature() \
        or not Path("/proc/cpuinfo").exists()


def test_benchmarks_name_the_cpu_and_its_isa(monkeypatch):
    from gru_lm import _ext

    monkeypatch.setattr(_ext, "cpu_signature", lambda: "x86_64 flags: fpu avx2 fma avx512f "
                        "avx512_bf16 | model name: AMD EPYC 9B45")
    c = _ext.cpu_summary()
    assert c["model"] == "AMD EPYC 9B45" and c["isa"] == ["avx2", "fma", "avx512f", "avx512_bf16"]
    assert _ext.cpu_line().startswith("AMD EPYC 9B45, ") and _ext.cpu_line().endswith(
        "ISA: avx2, fma, avx512f, avx512_bf16")
    monkeypatch.setattr(_ext, "cpu_signature", lambda: "aarch64 CPU part: 0xd40 | Features: "
                        "fp asimd sve bf16")
    assert _ext.cpu_summary()["isa"] == ["asimd", "sve", "bf16"]


# ---------------------------------------------------------------- one owner of a run folder


def test_a_second_writer_is_refused_naming_the_holder(tiny_run):
    run = tiny_run("locked")
    with RunDir(run).lock():
        r = cli("train", "--resume", run, "train.max_steps=32", "-q")
        one_line_error(r, "is being trained by another process", f"pid {os.getpid()}")
    r = cli("train", "--resume", run, "train.max_steps=32", "-q")  # released: resumes
    assert r.exit_code == 0, r.output


def test_metrics_reader_skips_torn_and_foreign_lines(tmp_path):
    run = RunDir(tmp_path)
    good = {"kind": "eval", "step": 10, "train_ppl": 5.0}
    run.metrics.write_bytes(json.dumps(good).encode() + b'\n{"kind": "eval", "st\n'
                            b"\xff\xfe binary\n[1, 2]\n" + b'{"kind": "eval", "step": "x"}\n'
                            + json.dumps({**good, "step": 20}).encode() + b"\n")
    assert [r["step"] for r in run.evals()] == [10, 20]
    run.truncate_records(10)
    assert run.records() == [good]


def test_damaged_summary_is_named(tmp_path):
    run = RunDir(tmp_path)
    run.summary.write_bytes(b"\x00\x01 not json")
    with pytest.raises(Exception, match=r"summary.json cannot be read"):
        run.read_summary()


def test_the_trainer_class_stays_small_and_model_agnostic():
    """Issue 28: Trainer keeps the loop, evaluation, checkpoints and resume in <= 300 lines;
    checks made before training live in preflight.py; no branch on the model's type."""
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 300
    names = {n.id for n in ast.walk(trainer) if isinstance(n, ast.Name)}
    assert not names & {"isinstance", "ScratchLM", "TorchLM", "GRUScratch", "LSTMScratch",
                         "RNNScratch", "TorchGRU", "TorchLSTM", "TorchRNN"}


# ---------------------------------------------------------------- imports at the top


def _loaded_by(code: str) -> set[str]:
    """The gru_lm modules a fresh interpreter has loaded after `code` (torch must not be)."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nassert 'torch' not in "
                          "sys.modules\nprint(' '.join(m for m in sys.modules if m.startswith("
                          "'gru_lm')))"], capture_output=True, text=True, check=True)
    return {m.removeprefix("gru_lm.") if m != "gru_lm" else "__init__"
            for m in out.stdout.split()}


def test_modules_import_at_the_top_unless_start_up_time_needs_otherwise():
    """An import inside a function hides the structure from readers and tools: one is
    allowed only where importing at the top would load more than its module needs at start,
    i.e. a module that `gru-lm --help` loads importing one it does not, or a module that
    the torch-free commands (`gru-lm runs`, `config show`: the API) load importing one that
    brings torch. The package's lazy re-exports (gru_lm.train, ...) are the other case."""
    help_set = _loaded_by("import gru_lm.cli")
    torch_free = _loaded_by("import gru_lm.cli, gru_lm.api")
    late = []
    for module in LAYERS:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        typing_only = {id(n) for node in tree.body if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or id(node) in top | typing_only or \
                    not (node.module or "").startswith("gru_lm"):
                continue
            target = node.module.removeprefix("gru_lm").lstrip(".")
            for t in [a.name for a in node.names] if not target else [target]:
                if module == "__init__" and t in REEXPORTED:
                    continue
                if (module in help_set and t not in help_set) or \
                        (module in torch_free and t not in torch_free):
                    continue
                late.append(f"gru_lm/{module}.py:{node.lineno} imports gru_lm.{t}")
    assert not late, "imports that belong at the top:\n" + "\n".join(late)
