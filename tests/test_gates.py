"""gru-lm gates: values recomputed independently from the weights match the report."""

import json
from pathlib import Path

import pytest
import torch
from conftest import cli

from gru_lm.config import ModelConfig
from gru_lm.members import load_member
from gru_lm.models import build_model
from gru_lm.recurrent import trace_gates

TEXT = "the time traveller smiled"


def _independent_gru_gates(model, ids):
    """The book's equations from the scratch layer's named parameters, one char at a time."""
    p = dict(model.layers[0].named_parameters())
    H = torch.zeros(model.num_hiddens)
    Zs, Rs = [], []
    with torch.no_grad():
        for i in ids:
            Z = torch.sigmoid(p["W_xz"][i] + H @ p["W_hz"] + p["b_z"])
            R = torch.sigmoid(p["W_xr"][i] + H @ p["W_hr"] + p["b_r"])
            H_tilde = torch.tanh(p["W_xh"][i] + (R * H) @ p["W_hh"] + p["b_h"])
            H = Z * H + (1 - Z) * H_tilde
            Zs.append(Z)
            Rs.append(R)
    return torch.stack(Zs), torch.stack(Rs)


def test_gates_command_reports_the_equations_values(workdir, tiny_run):
    tiny_run("g")
    r = cli("gates", TEXT, "--run", "runs/g", "--png", "g.png", "--json", "g.json",
            "--units", "8")
    assert r.exit_code == 0, r.output
    assert " Z " in r.output and " R " in r.output and "ΔH" in r.output
    png = Path("g.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    data = json.loads(Path("g.json").read_text())
    m = load_member(Path("runs/g/checkpoints/best.pt"))
    vocab, model = m.vocab, m.model
    Z, R = _independent_gru_gates(model, vocab.encode(TEXT))
    torch.testing.assert_close(torch.tensor(data["mean"]["Z"]), Z.mean(1))
    torch.testing.assert_close(torch.tensor(data["mean"]["R"]), R.mean(1))
    torch.testing.assert_close(torch.tensor(data["per_unit"]["Z"]), Z[:, data["units"]])
    assert len(data["units"]) == 8


@pytest.mark.parametrize("name, embed_dim", [("gru", None), ("lstm", None),
                                             ("gru-scratch", None), ("lstm-scratch", None),
                                             ("gru-scratch", 5), ("lstm-scratch", 5)])
def test_trace_reproduces_the_models_own_hidden_states(name, embed_dim):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_hiddens=8, num_layers=2,
                                    reset_after=False, embed_dim=embed_dim), 11).eval()
    ids = [1, 4, 2, 7, 3, 3, 9]
    trace = trace_gates(model.gate_weights(), ids, layer=1)
    _, state = model(torch.tensor([ids]))
    final_H = (state[0] if isinstance(state, tuple) else state)[1, 0]
    torch.testing.assert_close(trace.H[-1], final_H, atol=1e-5, rtol=1e-5)
    gates = trace.gates
    assert set(gates) == ({"Z", "R"} if "gru" in name else {"I", "F", "O"})
    assert all(0 <= g.min() and g.max() <= 1 for g in gates.values())


def test_reset_after_trace_matches_too():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="gru-scratch", num_hiddens=8, reset_after=True,
                                    init="xavier"), 11).eval()
    ids = [1, 4, 2, 7]
    trace = trace_gates(model.gate_weights(), ids, layer=0)
    _, state = model(torch.tensor([ids]))
    torch.testing.assert_close(trace.H[-1], state[0, 0], atol=1e-5, rtol=1e-5)


def test_models_without_gates_say_so(workdir):
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "r", "-q", "model.name=rnn")
    assert r.exit_code == 0, r.output
    r = cli("gates", TEXT, "--run", "runs/r")
    assert r.exit_code == 1
    assert "model 'rnn' has no gates to show" in r.output


def test_layer_out_of_range(workdir, tiny_run):
    tiny_run("g")
    r = cli("gates", TEXT, "--run", "runs/g", "--layer", "3")
    assert r.exit_code == 1 and "--layer 3 is out of range" in r.output


def test_a_mogrifier_run_shows_its_gates_and_state_masks(workdir):
    """`gru-lm gates` on a Mogrifier run: I, F, O and the masks of its state rounds, each a
    strip, written to JSON too; a layer out of range is one line."""
    from conftest import train_tiny

    run = train_tiny("mog", "model.name=mogrifier", "train.max_steps=4")
    r = cli("gates", "the time traveller", "--run", run, "--json", "g.json")
    assert r.exit_code == 0, r.output
    data = json.loads(Path("g.json").read_text())
    assert data["kind"] == "mogrifier" and set(data["mean"]) == {"I", "F", "O", "M2", "M4"}
    assert " M2 " in r.output and "M2, M4: the input's rescaling of the state" in r.output
    r = cli("gates", "the time", "--run", run, "--layer", "3")
    assert r.exit_code == 1 and "--layer 3 is out of range" in r.output
