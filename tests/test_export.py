"""A model that leaves gru-lm: `gru-lm export --format safetensors|onnx`, read back by gru-lm,
by plain safetensors, by onnxruntime, and by examples/onnx_sample.py without torch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import ROOT, cli, one_line_error, real_data_dir
from safetensors.torch import load_file, save_file

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
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "export.json",
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
    one_line_error(cli("export", run, "--out", "other"), "did not write (notes.txt)")
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
    one_line_error(cli("predict", "time", "--run", "ex"), "ex/vocab.json",
                   "changed since it was exported")
    _forge("ex", "vocab.json")  # (export.json made to agree: the weights still do not)
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


def _forge(folder: str, name: str) -> None:
    """Make export.json agree with `name` as it is now: what a hostile edit would do."""
    manifest = Path(folder) / "export.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        m["files"][name] = hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()
        manifest.write_text(json.dumps(m))


def _tree(folder: str | Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


# ------------------------------------------------ --out keeps what it did not write


def test_export_refuses_a_folder_that_is_not_an_earlier_export_and_deletes_nothing(tiny_run):
    run = tiny_run()
    Path("hf").mkdir()  # a Hugging Face-style folder: its own model.safetensors
    for name, text in [("model.safetensors", "theirs"), ("tokenizer.json", "{}"),
                       ("NOTES.md", "mine")]:
        Path("hf", name).write_text(text)
    Path("csv").mkdir()
    Path("csv/model.onnx").write_text("theirs")
    Path("csv/important.csv").write_text("a,b\n1,2\n")
    for folder in ("hf", "csv"):
        before = _tree(folder)
        one_line_error(cli("export", run, "--out", folder), f"--out {folder} holds files "
                       "gru-lm export did not write", "move them away")
        assert _tree(folder) == before and len(list(Path(folder).iterdir())) == len(before)


def test_an_export_replaces_only_the_files_an_earlier_export_wrote(tiny_run):
    run = tiny_run()
    gru_lm.export(run, out="ex")
    Path("ex/NOTES.md").write_text("my note")  # added to an earlier export: it stays
    r = cli("export", run, "--out", "ex")
    assert r.exit_code == 0, r.output
    assert Path("ex/NOTES.md").read_text() == "my note"
    assert "NOTES.md" not in r.output  # (not listed as written)
    manifest = json.loads(Path("ex/export.json").read_text())
    assert sorted(manifest["files"]) == ["README.md", "config.json", "model.safetensors",
                                         "vocab.json"] and "previous" not in manifest
    expected = gru_lm.load(run).predict("time", 20)
    assert gru_lm.load("ex").predict("time", 20) == expected
    # another format: the earlier export's weights go (they were its), the note stays
    r = cli("export", run, "--format", "onnx", "--out", "ex")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in Path("ex").iterdir()) == [
        "NOTES.md", "README.md", "config.json", "export.json", "model.onnx", "vocab.json"]
    # a file of the earlier export changed since is the user's: refused, kept
    Path("ex/README.md").write_text("my own card")
    one_line_error(cli("export", run, "--out", "ex"), "README.md there was not written by "
                   "gru-lm export, or was changed since")
    assert Path("ex/README.md").read_text() == "my own card"
    assert Path("ex/model.onnx").is_file() and not Path("ex/model.safetensors").exists()
    # a file at a name the export writes that the earlier one did not: refused, kept
    Path("ex/README.md").unlink()
    Path("ex/model.safetensors").write_text("theirs")
    one_line_error(cli("export", run, "--out", "ex"), "model.safetensors there was not "
                   "written by gru-lm export")
    assert Path("ex/model.safetensors").read_text() == "theirs"
    assert not [p for p in Path("ex").iterdir() if p.name.startswith(".")]  # no leftovers


def test_an_export_through_a_symlink_or_into_dot_writes_in_place(tiny_run, monkeypatch):
    run = tiny_run().resolve()
    gru_lm.export(run, out="ex")
    Path("ex/NOTES.md").write_text("my note")
    Path("link").symlink_to("ex")
    r = cli("export", run, "--out", "link")
    assert r.exit_code == 0, r.output
    assert Path("link").is_symlink() and Path("link").resolve() == Path("ex").resolve()
    assert Path("ex/NOTES.md").read_text() == "my note"
    assert not [p for p in Path(".").iterdir() if p.name.startswith(".")]  # no .link-old-PID
    assert gru_lm.load("link").predict("time", 20) == gru_lm.load(run).predict("time", 20)
    # `--out .`: the working directory, which here holds other files: refused in one line
    one_line_error(cli("export", run, "--out", "."), "--out . holds files")
    Path("empty").mkdir()
    monkeypatch.chdir("empty")
    r = cli("export", run, "--out", ".")
    assert r.exit_code == 0, r.output
    assert Path("export.json").is_file() and Path("model.safetensors").is_file()
    r = cli("export", run, "--out", ".")  # (again: an earlier export there, replaced)
    assert r.exit_code == 0, r.output
    Path("gone").symlink_to("nowhere")
    one_line_error(cli("export", run, "--out", "gone"), "symbolic link to nothing")


# ---------------------------------------------------------------- an export is checked on load


def test_an_export_with_non_finite_weights_is_refused_on_load(tiny_run):
    gru_lm.export(tiny_run(), out="ex")
    weights = load_file("ex/model.safetensors")
    name = sorted(weights)[0]
    for bad in (float("nan"), float("inf")):
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = bad
        save_file(weights, "ex/model.safetensors", metadata={"format": "gru-lm"})
        _forge("ex", "model.safetensors")
        for args in (["predict", "time", "--run", "ex"],
                     ["predict", "time", "--run", "ex", "--greedy"],
                     ["evaluate", "--run", "ex", "--text", "ex/README.md"]):
            one_line_error(cli(*args), "ex/model.safetensors", f"weight {name!r} holds NaN "
                           "or infinity", "export the run again")


def test_a_flipped_bit_in_an_export_is_refused_on_load(tiny_run):
    gru_lm.export(tiny_run(), out="ex")
    weights = Path("ex/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # (a bit of the last tensor: the file still reads)
    weights.write_bytes(bytes(data))
    assert load_file(weights)  # still a readable safetensors file, finite
    one_line_error(cli("predict", "time", "--run", "ex"), "ex/model.safetensors is damaged",
                   "SHA-256 does not match export.json", "export the run again")
    Path("ex/export.json").unlink()
    one_line_error(cli("predict", "time", "--run", "ex"), "has no export.json",
                   "integrity cannot be checked")


@pytest.mark.parametrize("token, said", [("ab", "'ab' has 2 characters"), ("", "is empty")])
def test_a_vocabulary_with_a_token_that_is_not_one_character_is_refused(tiny_run, token, said):
    gru_lm.export(tiny_run(), out="ex")
    vocab = json.loads(Path("ex/vocab.json").read_text())
    last = len(vocab["idx_to_token"]) - 1  # (a rare letter: "time" still reads)
    assert vocab["idx_to_token"][last] not in "time"
    vocab["idx_to_token"][last] = token
    Path("ex/vocab.json").write_text(json.dumps(vocab))
    _forge("ex", "vocab.json")
    one_line_error(cli("predict", "time", "--run", "ex"), "ex/vocab.json",
                   f"token {last} {said}", "one character a token")


def test_an_onnx_export_or_one_without_weights_is_named_with_what_to_do(tiny_run):
    run = tiny_run()
    assert cli("export", run, "--format", "onnx", "--out", "ex-onnx").exit_code == 0
    for given in ("ex-onnx", "ex-onnx/model.onnx"):
        for args in (["predict", "time", "--run", given], ["evaluate", "--run", given]):
            r = cli(*args)
            one_line_error(r, "is an ONNX export", "onnxruntime", "examples/onnx_sample.py",
                           "--format safetensors")
            assert "checkpoints/" not in r.output
    gru_lm.export(run, out="ex")
    Path("ex/model.safetensors").unlink()
    r = cli("predict", "time", "--run", "ex")
    one_line_error(r, "ex is a gru-lm export without its weights", "gru-lm export RUN --out ex")
    assert "checkpoints/" not in r.output


def test_onnx_sample_refuses_bad_values_in_one_line():
    script = str(ROOT / "examples" / "onnx_sample.py")
    for args, said in [(["--temperature", "0"], "--temperature 0: give a number above 0"),
                       (["--temperature", "nan"], "--temperature nan"),
                       (["-n", "-5"], "--num-chars -5: give"),
                       (["--seed", "-1"], "--seed -1")]:
        p = subprocess.run([sys.executable, script, ".", "time", *args], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("error: ") and said in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


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
        "README.md", "config.json", "export.json", "model.onnx", "vocab.json"]
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


def test_the_docs_state_the_onnx_bound_the_tests_check():
    """docs/commands.md promises what test_onnx_agrees_with_torch_over_real_text checks (1e-4
    absolute, on small models), and says it is no bound for every model (issue 55: a trained
    2 x 768 LSTM differs by 1.2e-4)."""
    doc = " ".join((ROOT / "docs" / "commands.md").read_text(encoding="utf-8").split())
    assert "within 1e-4 absolute" in doc and "That is no bound for every model" in doc
    assert "assert worst < 1e-4, worst" in Path(__file__).read_text(encoding="utf-8")
