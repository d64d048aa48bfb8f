"""A model that leaves gru-lm: `gru-lm export --format safetensors|onnx`, read back by gru-lm,
by plain safetensors, by onnxruntime, and by examples/onnx_sample.py without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, cli, one_line_error, real_data_dir
from safetensors.torch import load_file

import gru_lm
from gru_lm.config import ModelConfig
from gru_lm.data import Vocab, preprocess
from gru_lm.errors import GruLmError
from gru_lm.exporting import load_export, write_onnx
from gru_lm.models import build_model, list_models

PICKLE_OR_ZIP = (b"\x80", b"PK\x03\x04")  # what torch.save / pickle files start with


def test_safetensors_export_loads_back_in_gru_lm_and_in_plain_safetensors(tiny_run):
    run = tiny_run()
    r = cli("export", run, "--out", "ex")
    assert r.exit_code == 0, r.output
    out = Path("ex")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                      "model.safetensors", "vocab.json"]
    for f in out.iterdir():  # nothing a reader must unpickle
        assert not f.read_bytes().startswith(PICKLE_OR_ZIP), f
    original = gru_lm.load(run)
    exported = gru_lm.load(out)
    assert exported.predict("time traveller", 40) == original.predict("time traveller", 40)
    assert exported.samples("time", beam=3, num_chars=10) == \
        original.samples("time", beam=3, num_chars=10)
    r = cli("predict", "time traveller", "--run", out, "-n", "40")
    assert r.exit_code == 0 and r.stdout == original.predict("time traveller", 40) + "\n"
    # plain safetensors + json: every tensor of the state dict, the vocabulary, the config
    weights = load_file(out / "model.safetensors")
    _, vocab, model = original._model()
    state = model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)
    assert json.loads((out / "vocab.json").read_text())["idx_to_token"] == vocab.idx_to_token
    assert json.loads((out / "config.json").read_text())["model"]["name"] == "gru-scratch"


def test_the_model_card_says_what_the_model_is_and_how_well_it_does(tiny_run):
    run = tiny_run()
    summary = json.loads((run / "summary.json").read_text())
    gru_lm.export(run, out="ex")
    card = Path("ex/README.md").read_text()
    assert f"val {summary['best_val_ppl']:,.2f}, test {summary['best_test_ppl']:,.2f}" in card
    assert "timemachine" in card and "30 steps" in card and "load_file" in card
    assert "gru-scratch, 1 layer(s) of 32 units" in card


def test_an_export_replaces_an_earlier_one_and_refuses_other_folders(tiny_run):
    run = tiny_run()
    first = gru_lm.export(run, out="ex")
    again = gru_lm.export(run, out="ex")
    assert [p.name for p in first.files] == [p.name for p in again.files]
    assert not [p for p in Path(".").iterdir() if p.name.startswith(".ex-")]  # no leftovers
    Path("other").mkdir()
    Path("other/notes.txt").write_text("mine")
    one_line_error(cli("export", run, "--out", "other"), "other files in it")
    assert Path("other/notes.txt").read_text() == "mine"
    Path("afile").write_text("x")
    one_line_error(cli("export", run, "--out", "afile"), "is a file")
    one_line_error(cli("export", run, "--format", "pickle"), "pickle")


def test_without_the_extra_export_says_what_to_install(tiny_run, monkeypatch):
    run = tiny_run()
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    one_line_error(cli("export", run, "--out", "ex"), 'pip install "gru-lm[export]"')
    assert not Path("ex").exists()


def test_a_damaged_export_is_named(tiny_run):
    gru_lm.export(tiny_run(), out="ex")
    vocab = json.loads(Path("ex/vocab.json").read_text())
    Path("ex/vocab.json").write_text(json.dumps({"idx_to_token": vocab["idx_to_token"][:-1]}))
    one_line_error(cli("predict", "time", "--run", "ex"), "ex/model.safetensors",
                   "does not match the weights")
    Path("ex/vocab.json").write_text(json.dumps(vocab))
    weights = Path("ex/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    one_line_error(cli("predict", "time", "--run", "ex"), "ex/model.safetensors",
                   "export the run again")
    with pytest.raises(GruLmError, match="no vocab.json"):
        Path("ex/vocab.json").unlink()
        load_export(Path("ex"))


# ---------------------------------------------------------------- ONNX, every family


def _text_ids(n: int) -> tuple[Vocab, list[int]]:
    text = (real_data_dir() / "timemachine.txt").read_text()[:20_000]
    tokens = preprocess(text)
    vocab = Vocab(tokens)
    return vocab, vocab.encode(tokens[5_000:5_000 + n])


FAMILIES = [*list_models(), "lstm+adaptive", "gru-scratch+adaptive"]
QUICK = ("gru-scratch", "lstm")  # the others run with `make test` (slow: ~2 s each)


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FAMILIES])
def test_onnx_agrees_with_torch_over_real_text(name, tmp_path):
    """Every model family (and the adaptive softmax) as a one-step graph: onnxruntime's
    log-probs agree with the torch model's (fused kernels where they load) to 1e-4 over
    300 characters of The Time Machine, at a batch size other than the export's."""
    vocab, ids = _text_ids(301)
    base, _, adaptive = name.partition("+")
    extra = {"softmax": "adaptive", "cutoffs": [8, 16]} if adaptive else {}
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=base, num_hiddens=24, num_layers=2, **extra),
                        len(vocab)).eval()
    write_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[0] == "token" and names[1:] in (["h"], ["h", "c"])
    B = 3  # (exported at 2: the batch is dynamic); rows read the text at 3 offsets
    rows = torch.tensor([ids[:300], ids[1:301], ids[::-1][:300]]).T  # (300, B)
    state = model.begin_state(B)
    np_state = [s.numpy() for s in (state if isinstance(state, tuple) else (state,))]
    worst = 0.0
    with torch.no_grad():
        for step in rows:
            logits, state = model(step.unsqueeze(1), state)
            ref = logits[:, -1].float().log_softmax(-1).numpy()
            got, *np_state = session.run(None, {"token": step.numpy(),
                                                **dict(zip(names[1:], np_state, strict=True))})
            worst = max(worst, float(np.abs(got - ref).max()))
    assert worst < 1e-4, worst


def test_onnx_sample_runs_without_torch(tiny_run):
    run = tiny_run()
    r = cli("export", run, "--format", "onnx", "--out", "ex-onnx")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in Path("ex-onnx").iterdir()) == [
        "README.md", "config.json", "model.onnx", "vocab.json"]
    no_torch = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    script = str(ROOT / "examples" / "onnx_sample.py")

    def sample(*args: str) -> str:
        p = subprocess.run([sys.executable, "-c", no_torch, script, "ex-onnx", *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout.rstrip("\n")

    greedy = sample("Time Traveller", "-n", "30", "--greedy")
    assert greedy == "Time Traveller" + gru_lm.load(run).predict(
        "Time Traveller", 30, greedy=True).removeprefix("time traveller")
    drawn = sample("time", "-n", "60", "--seed", "1")
    assert len(drawn) == len("time") + 60 and drawn == sample("time", "-n", "60", "--seed", "1")
    assert set(drawn[4:]) <= set("abcdefghijklmnopqrstuvwxyz ")
    p = subprocess.run([sys.executable, "-c", no_torch, script, ".", "time"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "has no model.onnx" in p.stderr
