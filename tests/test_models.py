"""Models: equivalence with torch.nn, a literal reference, gradchecks, one interface."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gru_lm.cells import GRUFunction, GRUResetAfterFunction, LSTMFunction, RNNFunction
from gru_lm.config import ModelConfig
from gru_lm.errors import ConfigError
from gru_lm.models import build_model, count_parameters, detach_state, list_models

V, B, T, NH = 11, 3, 7, 8


def _ids(seed=0, b=B, t=T):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _copy_lstm(scratch, ref: nn.LSTM):
    """nn.LSTM (i, f, g, o) rows -> scratch W_x*/W_h*/b_* columns."""
    with torch.no_grad():
        for li, layer in enumerate(scratch.layers):
            w_ih, w_hh = getattr(ref, f"weight_ih_l{li}"), getattr(ref, f"weight_hh_l{li}")
            b = getattr(ref, f"bias_ih_l{li}") + getattr(ref, f"bias_hh_l{li}")
            for k, g in enumerate(("i", "f", "c", "o")):
                rows = slice(k * NH, (k + 1) * NH)
                getattr(layer, f"W_x{g}").copy_(w_ih[rows].t())
                getattr(layer, f"W_h{g}").copy_(w_hh[rows].t())
                getattr(layer, f"b_{g}").copy_(b[rows])


def _copy_gru(scratch, ref: nn.GRU):
    """nn.GRU (r, z, n) rows -> scratch (z, r, h) with b_hh inside the reset gate."""
    with torch.no_grad():
        for li, layer in enumerate(scratch.layers):
            w_ih, w_hh = getattr(ref, f"weight_ih_l{li}"), getattr(ref, f"weight_hh_l{li}")
            b_ih, b_hh = getattr(ref, f"bias_ih_l{li}"), getattr(ref, f"bias_hh_l{li}")
            for k, g in ((0, "r"), (1, "z"), (2, "h")):
                rows = slice(k * NH, (k + 1) * NH)
                getattr(layer, f"W_x{g}").copy_(w_ih[rows].t())
                getattr(layer, f"W_h{g}").copy_(w_hh[rows].t())
                getattr(layer, f"b_{g}").copy_(b_ih[rows] + (b_hh[rows] if g != "h" else 0))
            layer.b_hh.copy_(b_hh[2 * NH:])


def _run_reference(ref, X, state, W_out):
    """One-hot into a torch.nn RNN (the book's concise way), then the output layer."""
    onehot = nn.functional.one_hot(X.t(), V).float()
    Y, state = ref(onehot, state)
    return (Y @ W_out).transpose(0, 1), state


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_scratch_matches_torch_nn(kind, num_layers):
    torch.manual_seed(0)
    cfg = ModelConfig(name=f"{kind}-scratch", num_hiddens=NH, num_layers=num_layers,
                      init="torch", reset_after=(kind == "gru"))
    scratch = build_model(cfg, V)
    ref = (nn.LSTM if kind == "lstm" else nn.GRU)(V, NH, num_layers)
    (_copy_lstm if kind == "lstm" else _copy_gru)(scratch, ref)
    with torch.no_grad():
        scratch.b_q.zero_()
    X = _ids()
    state = scratch.begin_state(B)
    state = tuple(torch.randn_like(s) for s in state) if kind == "lstm" else torch.randn_like(state)
    logits, new_state = scratch(X, state)
    ref_logits, ref_state = _run_reference(ref, X, state, scratch.W_hq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.atleast_1d(new_state) if kind == "gru" else new_state,
                    torch.atleast_1d(ref_state) if kind == "gru" else ref_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Gradients of every weight, through outputs and final states.
    w = torch.randn_like(logits)
    final = new_state if kind == "gru" else new_state[1]
    ref_final = ref_state if kind == "gru" else ref_state[1]
    ((logits * w).sum() + final.sum()).backward()
    ((ref_logits * w).sum() + ref_final.sum()).backward()
    for li, layer in enumerate(scratch.layers):
        order = ("i", "f", "c", "o") if kind == "lstm" else ("r", "z", "h")
        g_ih = getattr(ref, f"weight_ih_l{li}").grad
        g_hh = getattr(ref, f"weight_hh_l{li}").grad
        for k, g in enumerate(order):
            rows = slice(k * NH, (k + 1) * NH)
            torch.testing.assert_close(getattr(layer, f"W_x{g}").grad, g_ih[rows].t(), atol=1e-5,
                                       rtol=1e-4)
            torch.testing.assert_close(getattr(layer, f"W_h{g}").grad, g_hh[rows].t(), atol=1e-5,
                                       rtol=1e-4)
            torch.testing.assert_close(getattr(layer, f"b_{g}").grad,
                                       getattr(ref, f"bias_ih_l{li}").grad[rows],
                                       atol=1e-5, rtol=1e-4)


def _literal_gru(X, H, p, W_hq, b_q):
    """The book's four equations, one step at a time, with a one-hot input."""
    outputs = []
    for x in nn.functional.one_hot(X.t(), V).to(H.dtype):
        Z = torch.sigmoid(x @ p["W_xz"] + H @ p["W_hz"] + p["b_z"])
        R = torch.sigmoid(x @ p["W_xr"] + H @ p["W_hr"] + p["b_r"])
        H_tilde = torch.tanh(x @ p["W_xh"] + (R * H) @ p["W_hh"] + p["b_h"])
        H = Z * H + (1 - Z) * H_tilde
        outputs.append(H @ W_hq + b_q)
    return torch.stack(outputs, 1), H


def test_gru_scratch_matches_literal_book_equations():
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="gru-scratch", num_hiddens=NH, init="xavier"), V)
    layer = model.layers[0]
    params = dict(layer.named_parameters())
    X = _ids(2)
    H0 = torch.randn(B, NH)
    logits, H = model(X, H0.unsqueeze(0))
    w = torch.randn_like(logits)
    (logits * w).sum().backward()
    got = {k: v.grad.clone() for k, v in params.items()}
    model.zero_grad()
    ref_logits, ref_H = _literal_gru(X, H0, params, model.W_hq, model.b_q)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(H[0], ref_H, atol=1e-6, rtol=1e-5)
    (ref_logits * w).sum().backward()
    for k, v in params.items():
        torch.testing.assert_close(got[k], v.grad, atol=1e-6, rtol=1e-5, msg=k)


# Each cell function and its input shapes: P (T, B, G*H) or, with token ids, the table
# (V, G*H); then H0 (B, H), [C0,] and the recurrent weights.
CELLS = {
    "gru": (GRUFunction.apply, [(12,), (2, 4), (4, 8), (4, 4)]),
    "gru-reset-after": (GRUResetAfterFunction.apply, [(12,), (2, 4), (4, 12), (4,)]),
    "lstm": (LSTMFunction.apply, [(16,), (2, 4), (2, 4), (4, 16)]),
    "rnn": (RNNFunction.apply, [(4,), (2, 4), (4, 4)]),
}
T_, B_, V_ = 5, 2, 6


def _cell_inputs(shapes, dtype, table: bool):
    """(P or table, ids, *rest) with fixed random values."""
    g = torch.Generator().manual_seed(0)
    first = (V_, *shapes[0]) if table else (T_, B_, *shapes[0])
    tensors = [(torch.randn(*s, generator=g, dtype=dtype) * 0.5).requires_grad_()
               for s in [first, *shapes[1:]]]
    ids = torch.randint(0, V_, (T_, B_), generator=g) if table else None
    return tensors[0], ids, tensors[1:]


@pytest.mark.parametrize("table", [False, True], ids=["dense", "ids"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_scratch_cells(cell, table):
    fn, shapes = CELLS[cell]
    P, ids, rest = _cell_inputs(shapes, torch.float64, table)
    assert torch.autograd.gradcheck(lambda P, *r: fn(P, ids, *r), (P, *rest), eps=1e-6,
                                    atol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_interface_shapes_and_split_sequence(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_hiddens=NH, num_layers=2), V).eval()
    X = _ids(3, b=2, t=10)
    logits, state = model(X, model.begin_state(2))
    assert logits.shape == (2, 10, V)
    states = state if isinstance(state, tuple) else (state,)
    assert all(s.shape == (2, 2, NH) for s in states)
    first, s1 = model(X[:, :4], model.begin_state(2))
    second, s2 = model(X[:, 4:], detach_state(s1))
    torch.testing.assert_close(torch.cat([first, second], 1), logits, atol=1e-6, rtol=1e-5)
    for a, b in zip(s2 if isinstance(s2, tuple) else (s2,), states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_every_model_learns_a_tiny_corpus(name):
    torch.manual_seed(0)
    init = "auto" if name == "mogrifier" else "xavier"  # (the mogrifier has its own)
    model = build_model(ModelConfig(name=name, num_hiddens=32, init=init), V)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    seq = torch.tensor([i % 5 + 1 for i in range(41)])  # "abcde" repeated
    X, Y = seq[:-1].view(2, 20), seq[1:].view(2, 20)
    losses = []
    for _ in range(40):
        logits, _ = model(X)
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), Y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_parameter_counts_follow_the_equations():
    cfg = ModelConfig(name="gru-scratch", num_hiddens=NH)
    assert count_parameters(build_model(cfg, V)) == 3 * (V * NH + NH * NH + NH) + NH * V + V


def test_unknown_model_lists_registered_names():
    with pytest.raises(ConfigError, match="unknown model 'gruu'.*gru-scratch.*lstm"):
        build_model(ModelConfig(name="gruu"), V)


def test_bidirectional_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="reads the characters the model must predict"):
        ModelConfig(name="gru", bidirectional=True)


def test_options_for_other_models_are_refused():
    with pytest.raises(ConfigError, match="model.reset_after: only gru-scratch"):
        build_model(ModelConfig(name="lstm", reset_after=True), V)
    with pytest.raises(ConfigError, match="model.forget_bias: only lstm-scratch, lstm take"):
        build_model(ModelConfig(name="gru", forget_bias=1.0), V)
    # Without an embedding a scratch model reads one-hot ids: embedding dropout needs one.
    with pytest.raises(ConfigError, match="model.embed_dropout: 'gru-scratch' reads one-hot"):
        build_model(ModelConfig(name="gru-scratch", embed_dropout=0.1), V)


@pytest.mark.parametrize("name", list_models())
def test_every_model_declares_only_known_options(name):
    from gru_lm.config import MODEL_OPTIONS
    from gru_lm.models import model_class

    assert model_class(name).options <= set(MODEL_OPTIONS)
    for key in model_class(name).options:  # and each declared option is accepted
        kwargs = {"reset_after": {"reset_after": True}, "forget_bias": {"forget_bias": 1.0},
                  "embed_dim": {"embed_dim": 16},
                  "embed_dropout": {"embed_dropout": 0.1, "embed_dim": 16},
                  "tie_weights": {"tie_weights": True, "embed_dim": NH},
                  "rounds": {"rounds": 2}, "rank": {"rank": 3}}[key]
        build_model(ModelConfig(name=name, num_hiddens=NH, **kwargs), V)


@pytest.mark.parametrize("name", ["gru", "lstm", "rnn"])
def test_tied_weights_share_one_matrix_and_stay_shared(name):
    untied = build_model(ModelConfig(name=name, num_hiddens=NH, embed_dim=NH), V)
    tied = build_model(ModelConfig(name=name, num_hiddens=NH, embed_dim=NH, tie_weights=True), V)
    assert tied.output.weight is tied.embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == V * NH
    opt = torch.optim.Adam(tied.parameters(), lr=0.1)
    X = torch.randint(0, V, (3, 5))
    logits, _ = tied(X)
    logits.sum().backward()
    opt.step()
    assert tied.output.weight is tied.embedding.weight  # still one matrix after a step
    state = tied.state_dict()  # a checkpoint round trip keeps the sharing
    again = build_model(ModelConfig(name=name, num_hiddens=NH, embed_dim=NH, tie_weights=True), V)
    again.load_state_dict(state)
    assert again.output.weight is again.embedding.weight
    assert torch.equal(again.output.weight, tied.embedding.weight)


def test_tied_weights_need_matching_sizes():
    with pytest.raises(ConfigError, match="model.tie_weights.*set model.embed_dim=32"):
        build_model(ModelConfig(name="gru", num_hiddens=32, tie_weights=True), V)
    with pytest.raises(ConfigError, match="model.tie_weights: only gru, lstm, rnn, mogrifier take"):
        build_model(ModelConfig(name="gru-scratch", num_hiddens=32, tie_weights=True), V)


@pytest.mark.parametrize("name", ["lstm-scratch", "lstm"])
def test_forget_bias_is_applied(name):
    model = build_model(ModelConfig(name=name, num_hiddens=NH, forget_bias=1.0), V)
    if name == "lstm-scratch":
        assert torch.all(model.layers[0].b_f == 1.0)
    else:
        assert torch.all(model.rnn.bias_ih_l0[NH:2 * NH] == 1.0)


def test_d2l_init_is_small_normal_with_zero_biases():
    model = build_model(ModelConfig(name="gru-scratch", num_hiddens=64), V)
    layer = model.layers[0]
    assert 0.005 < layer.W_hz.std().item() < 0.015
    assert torch.all(layer.b_z == 0)


def _need_kernels():
    from gru_lm._ext import kernels, why_not

    if kernels() is None:
        pytest.skip(f"no fused kernels on this machine ({why_not()}); the portable loops ran")
    return kernels()


def test_fused_kernels_are_built_unless_disabled():
    import os

    from gru_lm._ext import kernels, why_not

    if os.environ.get("GRU_LM_NO_EXT") == "1":
        assert kernels() is None and why_not() == "disabled by GRU_LM_NO_EXT"
    else:
        assert kernels() is not None, f"the fused C++ kernels did not build: {why_not()}"


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start(tmp_path):
    """torch's build lock is a plain file: one left by a build killed midway used to make
    every later start sleep forever. The next start removes it and loads the kernels."""
    import subprocess
    import sys

    from torch.utils import cpp_extension

    from gru_lm._ext import build_name

    _need_kernels()
    folder = Path(cpp_extension._get_build_directory(build_name(), verbose=False))
    (folder / "lock").touch()
    proc = subprocess.run([sys.executable, "-c", "from gru_lm._ext import kernels, why_not\n"
                           "assert kernels() is not None, why_not()"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "removed a lock left by an interrupted kernel build" in proc.stderr
    assert not (folder / "lock").exists()


def test_a_second_process_waits_for_a_live_kernel_build(tmp_path, capsys):
    """A live build's lock is not stale: the second start waits for it, and says so."""
    import fcntl
    import threading

    from gru_lm._ext import _build_lock

    entered = threading.Event()

    def start():
        with _build_lock(tmp_path):
            entered.set()

    with open(tmp_path / "gru_lm.flock", "a") as live:  # a live builder holds the lock
        fcntl.flock(live, fcntl.LOCK_EX)
        (tmp_path / "lock").touch()  # ... and torch's lock file, which is not stale
        waiter = threading.Thread(target=start)
        waiter.start()
        assert not entered.wait(0.5)
        assert (tmp_path / "lock").exists()
        (tmp_path / "lock").unlink()  # the live build ends: torch removes its file
        fcntl.flock(live, fcntl.LOCK_UN)
    waiter.join(30)
    assert entered.is_set()
    assert "waiting for another process building the fused kernels" in capsys.readouterr().err


@pytest.mark.parametrize("table", [False, True], ids=["dense", "ids"])
@pytest.mark.parametrize("cell", CELLS)
def test_fused_kernels_match_the_portable_loops(cell, table):
    from gru_lm.cells import portable_loops

    _need_kernels()

    fn, shapes = CELLS[cell]

    def run():
        P, ids, rest = _cell_inputs(shapes, torch.float32, table)
        out = fn(P, ids, *rest)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
        return [o.detach() for o in outs], [x.grad for x in (P, *rest)]

    fast_out, fast_grads = run()
    with portable_loops():
        ref_out, ref_grads = run()
    for a, b in zip(fast_out + fast_grads, ref_out + ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_kernels_refuse_bad_ids_and_shapes():
    ext = _need_kernels()
    table, H0 = torch.randn(V_, 12), torch.zeros(B_, 4)
    W_hzr, W_hh = torch.randn(4, 8), torch.randn(4, 4)
    good = torch.randint(0, V_, (T_, B_))
    ext.gru_forward(table, good, H0, W_hzr, W_hh, 0)  # fits: runs
    for bad_id in (V_, -1, 10**9):
        ids = good.clone()
        ids[2, 1] = bad_id
        with pytest.raises(RuntimeError, match=f"token id {bad_id} is outside the input table"):
            ext.gru_forward(table, ids, H0, W_hzr, W_hh, 0)
    with pytest.raises(RuntimeError, match="W_hh must be a contiguous float32 CPU"):
        ext.gru_forward(table, good, H0, W_hzr, torch.randn(4, 5), 0)
    with pytest.raises(RuntimeError, match="P must be"):
        ext.rnn_forward(torch.randn(T_, B_ + 1, 4), None, H0, W_hh, 0)


    with pytest.raises(RuntimeError, match="GEMM kind 7 is not available"):
        ext.rnn_forward(torch.randn(T_, B_, 4), None, H0, W_hh, 7)


def _run_cell(cell, table, bf16):
    """Outputs and input gradients of one cell on fixed float32 inputs."""
    fn, shapes = CELLS[cell]
    P, ids, rest = _cell_inputs(shapes, torch.float32, table)
    out = fn(P, ids, *rest, bf16)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return [o.detach() for o in outs] + [x.grad for x in (P, *rest)]


@pytest.mark.parametrize("gemm", ["mkl", "sgemm"])
@pytest.mark.parametrize("table", [False, True], ids=["dense", "ids"])
@pytest.mark.parametrize("cell", CELLS)
def test_bf16_kernels_match_the_bf16_loops(cell, table, gemm, monkeypatch):
    """Both bf16 GEMMs of the kernels compute what the loops compute by rounding the
    operands (bf16 x bf16 products are exact in fp32: only the order of the sums differs)."""
    from gru_lm.cells import _BF16_BY_ENV, BF16_ENV, portable_loops

    if _BF16_BY_ENV[gemm] not in _need_kernels().gemm_kinds():
        pytest.skip(f"this torch has no {gemm} bf16 GEMM")  # aarch64 wheels: no MKL
    monkeypatch.setenv(BF16_ENV, gemm)
    fast = _run_cell(cell, table, bf16=True)
    with portable_loops():
        ref = _run_cell(cell, table, bf16=True)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_rounds_the_gemm_operands_and_stays_near_fp32(cell):
    """bf16 results differ from fp32 (the operands were rounded) by bf16's precision only."""
    from gru_lm.cells import portable_loops

    for context in (portable_loops, _kernels_if_built):
        with context():
            fp32, bf16 = _run_cell(cell, True, False), _run_cell(cell, True, True)
        assert max((a - b).abs().max().item() for a, b in zip(fp32, bf16, strict=True)) > 1e-5
        for a, b in zip(bf16, fp32, strict=True):
            torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def _kernels_if_built():
    import contextlib

    _need_kernels()
    return contextlib.nullcontext()


def test_bf16_gemm_is_chosen_by_timing_and_reported(monkeypatch):
    from gru_lm import cells

    ext = _need_kernels()
    monkeypatch.delenv(cells.BF16_ENV, raising=False)
    with cells.use(cells.Kernels()) as fresh:  # nothing timed yet
        assert cells.gemm_kind(ext, False, 4, 24, 8) == 0  # fp32: sgemm, nothing timed
        assert "timed at the first step" in cells.bf16_gemm_report()
        kind = cells.gemm_kind(ext, True, 4, 24, 8)
        chosen, times = fresh.bf16[(4, 24, 8)]
        assert kind == chosen == min(times, key=times.get) and set(times) == set(
            ext.gemm_kinds()) - {0}
        assert all(t > 0 for t in times.values())
        report = cells.bf16_gemm_report()
        assert f"{cells.GEMM_NAMES[kind]} at 4x8x24" in report and " ms" in report
        monkeypatch.setenv(cells.BF16_ENV, "sgemm")
        assert cells.gemm_kind(ext, True, 4, 24, 8) == 2
    assert (4, 24, 8) not in cells.current().bf16  # the block's choices stayed in it
    assert "pinned by GRU_LM_BF16_GEMM" in cells.bf16_gemm_report()
    monkeypatch.setenv(cells.BF16_ENV, "fast")
    with pytest.raises(ConfigError, match="GRU_LM_BF16_GEMM='fast' is not a bf16 GEMM"):
        cells.gemm_kind(ext, True, 4, 24, 8)


@pytest.mark.parametrize("name", ["gru-scratch", "lstm-scratch", "rnn-scratch"])
def test_scratch_models_round_their_gemms_under_bf16_autocast(name):
    """train.precision=bf16 (autocast) reaches the recurrences of every scratch model, whose
    GEMMs then round their operands and return fp32 (not autocast's bf16 outputs)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, num_hiddens=16, num_layers=2, init="xavier")
    model = build_model(cfg, V)
    X = _ids()
    fp32, state32 = model(X)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, state16 = model(X)
    pairs = list(zip(*(s if isinstance(s, tuple) else (s,) for s in (state32, state16)),
                     strict=True))
    for s32, s16 in pairs:
        assert s16.dtype == torch.float32  # the state stays fp32
        # Layer 0 reads token ids (no input GEMM): only the recurrence's rounding moves it.
        assert (s32[0] - s16[0]).abs().max() > 1e-5
        torch.testing.assert_close(s16, s32, atol=3e-2, rtol=3e-2)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=5e-2, rtol=5e-2)
    assert "bf16" in model.kernels.path("cpu", "bf16")
    assert "bf16" not in model.kernels.path("cpu", "fp32")


@pytest.mark.parametrize("name", ["gru-scratch", "lstm-scratch", "rnn-scratch"])
def test_scratch_embedding_feeds_the_first_layer_vectors(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_hiddens=NH, embed_dim=5), V)
    assert model.embedding.shape == (V, 5)
    X = torch.randint(1, V, (B, T))
    logits, _ = model.eval()(X)
    # By hand: look the ids up, then run the same layers on the vectors.
    inputs = F.embedding(X.t(), model.embedding)  # (num_steps, batch_size, embed_dim)
    inputs, _ = model.layers[0](inputs, model.layer_states(model.begin_state(B))[0])
    by_hand = F.linear(inputs, model.W_hq.t(), model.b_q).transpose(0, 1)
    torch.testing.assert_close(logits, by_hand)
    model.train()
    model(X)[0].sum().backward()
    assert model.embedding.grad is not None and model.embedding.grad[X.unique()].abs().sum() > 0


@pytest.mark.parametrize("name", ["gru-scratch", "lstm-scratch", "gru", "lstm"])
def test_bf16_speed_is_measured_at_the_step_shape(name):
    model = build_model(ModelConfig(name=name, num_hiddens=32), 10)
    ratio, figures = model.kernels.bf16_speed(8)
    assert ratio > 0 and " ms" in figures and "x32x" in figures


@pytest.mark.parametrize("ratio, said", [(0.8, True), (1.3, False)])
def test_the_trainer_says_when_bf16_does_not_pay(ratio, said):
    from gru_lm.config import load_config
    from gru_lm.preflight import precision_notes

    class Timed:
        def bf16_speed(self, batch_size):
            return ratio, "kind 0.400 ms against fp32 0.320 ms"

    class Model:
        kernels = Timed()

    cfg = load_config(None, ["train.precision=bf16", "train.max_steps=1"])
    notes = precision_notes(cfg, Model(), "cpu")
    assert bool(notes) == said
    if said:
        assert "does not pay on this CPU" in notes[0] and "0.80x fp32's speed" in notes[0]
        assert "measured now" in notes[0]
    assert precision_notes(load_config(None, ["train.max_steps=1"]), Timed(), "cpu") == []


@pytest.mark.parametrize("name", ["gru", "lstm", "rnn"])
def test_a_large_vocabulary_gets_an_embedding_at_most_256_wide(name):
    """A Chinese text as characters has thousands of tokens: the default embedding stays
    vocab_size wide up to 256 (d2l's 28, bytes' 256: unchanged) and 256 beyond."""
    from gru_lm.torchnn import DEFAULT_EMBED_MAX

    for vocab, width in ((28, 28), (256, 256), (5001, DEFAULT_EMBED_MAX)):
        model = build_model(ModelConfig(name=name, num_hiddens=NH), vocab)
        assert tuple(model.embedding.weight.shape) == (vocab, width)
    assert DEFAULT_EMBED_MAX == 256
    explicit = build_model(ModelConfig(name=name, num_hiddens=NH, embed_dim=600), 5001)
    assert explicit.embedding.weight.shape[1] == 600


# ---------------------------------------------------------------- the Mogrifier LSTM


def test_a_mogrifier_of_zero_rounds_is_exactly_an_lstm():
    """rounds = 0: the same weights give nn.LSTM's logits and states."""
    torch.manual_seed(0)
    lstm = build_model(ModelConfig(name="lstm", num_hiddens=NH, num_layers=2), V).eval()
    mog = build_model(ModelConfig(name="mogrifier", num_hiddens=NH, num_layers=2, rounds=0),
                      V).eval()
    with torch.no_grad():
        mog.embedding.weight.copy_(lstm.embedding.weight)
        mog.output.load_state_dict(lstm.output.state_dict())
        for k, layer in enumerate(mog.layers):
            layer.W_x.copy_(getattr(lstm.rnn, f"weight_ih_l{k}").t())
            layer.W_h.copy_(getattr(lstm.rnn, f"weight_hh_l{k}").t())
            layer.b.copy_(getattr(lstm.rnn, f"bias_ih_l{k}") + getattr(lstm.rnn, f"bias_hh_l{k}"))
    X = _ids()
    (a, (ha, ca)), (b, (hb, cb)) = lstm(X), mog(X)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cb, ca, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 3])
def test_the_mogrifier_rounds_follow_the_equations(rank):
    """Round 1 rescales x by 2 σ(Q h + b), round 2 h by 2 σ(R x + b), round 3 x again (with
    the rescaled h); Q and R of rank `rank` (0: full), written out by hand."""
    from gru_lm.mogrifier import MogrifierLayer

    torch.manual_seed(1)
    layer = MogrifierLayer(5, NH, rounds=3, rank=rank)
    with torch.no_grad():
        for p in layer.masks:
            p.normal_()
    x, h = torch.randn(B, 5), torch.randn(B, NH)

    def matrix(factors):
        W = factors[0]
        for f in factors[1:]:
            W = W @ f
        return W

    (q1, b1), (r2, b2), (q3, b3) = [(matrix(f), b) for f, b in layer.rounds()]
    assert q1.shape == (NH, 5) and r2.shape == (5, NH)
    x1 = 2 * torch.sigmoid(h @ q1 + b1) * x
    h2 = 2 * torch.sigmoid(x1 @ r2 + b2) * h
    x3 = 2 * torch.sigmoid(h2 @ q3 + b3) * x1
    xm, hm, masks = layer.mogrify(x, h)
    torch.testing.assert_close(xm, x3)
    torch.testing.assert_close(hm, h2)
    assert len(masks) == 3 and all(((m > 0) & (m < 2)).all() for m in masks)


@pytest.mark.parametrize("rounds,rank", [(0, 0), (2, 3), (3, 0), (5, 2)])
def test_the_fused_mogrifier_matches_its_step_loop(rounds, rank):
    """The fused kernels give the step loop's outputs, final state and every gradient
    (input, state, weights, each round's factors and bias), rounds odd and even, factored
    and full."""
    from gru_lm.cells import portable_loops
    from gru_lm.mogrifier import MogrifierLayer

    _need_kernels()
    torch.manual_seed(2)
    layer = MogrifierLayer(5, NH, rounds=rounds, rank=rank)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # biases away from 0, masks away from 1
    X, h0, c0 = (torch.randn(*shape, requires_grad=True)
                 for shape in ((T_, B_, 5), (B_, NH), (B_, NH)))
    leaves = [X, h0, c0, *layer.parameters()]

    def run():
        for t in leaves:
            t.grad = None
        Y, (h, c) = layer(X, (h0, c0))
        ran.append(type(Y.grad_fn).__name__)
        g = torch.Generator().manual_seed(1)
        ((Y * torch.randn(Y.shape, generator=g)).sum() + (c * c).sum() + h.sum()).backward()
        return [Y.detach(), h.detach(), c.detach()] + [t.grad.clone() for t in leaves]

    ran: list[str] = []
    fast = run()
    with portable_loops():
        ref = run()
    assert ran == ["MogrifierFunctionBackward", "StackBackward0"]
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_training_mogrifier_runs_its_fused_kernels_and_says_so(monkeypatch):
    """A whole model in training (DropConnect, dropout, two layers): the fused kernels run
    each layer and leave the loss and the gradients the loop gives; the run header names
    the path."""
    from gru_lm.cells import portable_loops
    from gru_lm.mogrifier import MogrifierFunction

    _need_kernels()
    cfg = ModelConfig(name="mogrifier", num_hiddens=NH, num_layers=2, rounds=2, rank=3,
                      dropout=0.3, weight_drop=0.4)
    model = build_model(cfg, V).train()
    X = _ids()

    calls = []
    fused = MogrifierFunction.apply
    monkeypatch.setattr(MogrifierFunction, "apply", lambda *a: calls.append(1) or fused(*a))

    def run():
        torch.manual_seed(7)  # the same dropout and DropConnect masks
        model.zero_grad()
        logits, _ = model(X)
        logits.float().log_softmax(-1).mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    fast = run()
    assert len(calls) == 2  # one per layer
    with portable_loops():
        ref = run()
    assert len(calls) == 2  # the loop ran
    with portable_loops():
        assert model.kernels.path("cpu").startswith("PyTorch step loop (autograd): chosen by")
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert model.kernels.path("cpu") == "fused kernels"
    assert "under bf16 autocast" in model.kernels.path("cpu", "bf16")


def test_the_mogrifier_kernels_refuse_mismatched_rounds():
    ext = _need_kernels()
    E, H = 3, 4
    X, H0 = torch.randn(T_, B_, E), torch.zeros(B_, H)
    W_x, W_h, b = torch.randn(E, 4 * H), torch.randn(H, 4 * H), torch.zeros(4 * H)
    ok = [torch.randn(H, 2), torch.randn(2, E)]
    assert len(ext.mogrifier_forward(X, H0, H0, W_x, W_h, b, ok, [2], [torch.zeros(E)])) == 8
    with pytest.raises(RuntimeError, match="a round's second factor must be"):
        ext.mogrifier_forward(X, H0, H0, W_x, W_h, b, [ok[0], torch.randn(2, H)], [2],
                              [torch.zeros(E)])
    with pytest.raises(RuntimeError, match="one matrix or two factors"):
        ext.mogrifier_forward(X, H0, H0, W_x, W_h, b, ok, [3], [torch.zeros(E)])
    with pytest.raises(RuntimeError, match="a round's bias must be"):
        ext.mogrifier_forward(X, H0, H0, W_x, W_h, b, ok, [2], [torch.zeros(H)])


def test_the_mogrifier_refuses_an_init_it_would_ignore_and_a_rank_past_full_rank():
    import gru_lm

    with pytest.raises(ConfigError, match="model.init=d2l: the mogrifier draws its weights"):
        build_model(ModelConfig(name="mogrifier", num_hiddens=NH, init="d2l"), V)
    # full rank is min(inputs, hidden units): the embedding is min(vocab, 256) wide
    with pytest.raises(ConfigError, match=f"model.rank={V} is not below full rank \\({V}"):
        build_model(ModelConfig(name="mogrifier", num_hiddens=64, rank=V), V)
    assert build_model(ModelConfig(name="mogrifier", num_hiddens=64, rank=V - 1), V)
    # config show checks what train checks: before any data is read
    root = Path(__file__).resolve().parents[1]
    for overrides, said in [(("model.name=mogrifier", "model.rank=4096"), "model.rank=4096"),
                            (("model.name=gru-scratch", "model.rounds=2"),
                             "model.rounds: only mogrifier take")]:
        with pytest.raises(gru_lm.GruLmError, match=said):
            gru_lm.resolve_config(root / "configs/tiny.yaml", *overrides)


def test_mogrifier_options_belong_to_the_mogrifier():
    from gru_lm.errors import ConfigError

    with pytest.raises(ConfigError, match="model.rounds: only mogrifier take"):
        build_model(ModelConfig(name="lstm", num_hiddens=NH, rounds=2), V)
    model = build_model(ModelConfig(name="mogrifier", num_hiddens=NH), V)
    assert [len(layer.shapes) for layer in model.layers] == [4]  # the default: 4 rounds
    assert model.layers[0].rounds()[0][0][0].shape == (NH, 24)  # of rank 24


def test_the_mogrifier_shows_its_gates_and_state_masks():
    """trace(): with rounds 0 its I, F, O and outputs are recurrent.trace_gates' for the LSTM
    it is; with 4 rounds it adds the masks of rounds 2 and 4 (halved into [0, 1])."""
    from gru_lm.recurrent import LayerWeights, trace_gates

    ids = _ids()[0].tolist()
    lstm_like = build_model(ModelConfig(name="mogrifier", num_hiddens=NH, rounds=0), V)
    gates, H = lstm_like.trace(ids, 0)
    layer = lstm_like.layers[0]  # the LSTM it is, in LayerWeights' layout
    weights = LayerWeights("lstm", layer.W_x.detach(), layer.b.detach(), layer.W_h.detach(),
                           torch.zeros_like(layer.b), embedding=lstm_like.embedding.weight.detach())
    reference = trace_gates([weights], ids, 0)
    assert set(gates) == {"I", "F", "O"}
    for name in gates:
        torch.testing.assert_close(gates[name], reference.gates[name])
    torch.testing.assert_close(H, reference.H)
    model = build_model(ModelConfig(name="mogrifier", num_hiddens=NH), V)
    gates, H = model.trace(ids, 0)
    assert set(gates) == {"I", "F", "O", "M2", "M4"} and H.shape == (len(ids), NH)
    assert all(((g >= 0) & (g <= 1)).all() and g.shape == (len(ids), NH) for g in gates.values())


# ---------------------------------------------------------------- the adaptive softmax

VA = 60  # a vocabulary with three clusters past a head of 10


@pytest.mark.parametrize("name", list_models())
def test_the_adaptive_softmax_scores_the_whole_vocabulary_exactly(name):
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, num_hiddens=NH, softmax="adaptive", cutoffs=[10, 25, 45],
                      embed_dim=6 if "scratch" in name else None)
    model = build_model(cfg, VA).eval()
    assert model.adaptive is not None and not hasattr(model, "output") and \
        not hasattr(model, "W_hq")
    X = torch.randint(0, VA, (3, 9), generator=torch.Generator().manual_seed(1))
    Y = torch.randint(0, VA, (3, 9), generator=torch.Generator().manual_seed(2))
    logp, state = model(X)
    assert logp.shape == (3, 9, VA)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(3, 9), atol=1e-5, rtol=0)
    loss, state2 = model(X, targets=Y)  # the cheap training loss is the exact log-loss
    by_hand = -logp.gather(-1, Y.unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-5, rtol=1e-5)
    for a, b in zip(state if isinstance(state, tuple) else (state,),
                    state2 if isinstance(state2, tuple) else (state2,), strict=True):
        assert torch.equal(a, b)
    Y[0, :4] = -100  # not scored
    keep = Y >= 0
    loss = model(X, targets=Y)[0]
    torch.testing.assert_close(loss, -logp.gather(-1, Y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                               [keep].mean(), atol=1e-5, rtol=1e-5)


def test_every_cluster_gets_a_gradient_even_without_its_tokens():
    model = build_model(ModelConfig(name="lstm", num_hiddens=NH, softmax="adaptive",
                                    cutoffs=[10, 25, 45]), VA)
    X = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
    model(X, targets=X)[0].backward()  # only head tokens: the clusters are not read
    grads = [p.grad for p in model.adaptive.tail.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    assert model.adaptive.head.weight.grad.any()


def test_a_vocabulary_below_the_first_cutoff_gets_the_full_softmax():
    full = build_model(ModelConfig(name="gru-scratch", num_hiddens=NH), V)
    small = build_model(ModelConfig(name="gru-scratch", num_hiddens=NH, softmax="adaptive"), V)
    assert small.adaptive is None and list(small.state_dict()) == list(full.state_dict())
    big = build_model(ModelConfig(name="lstm", num_hiddens=NH, softmax="adaptive"), 1500)
    assert big.adaptive is not None and big.adaptive.cutoffs == [250, 1000, 1500]


def test_adaptive_settings_are_checked():
    with pytest.raises(ConfigError, match="no one output matrix"):
        build_model(ModelConfig(name="lstm", num_hiddens=NH, embed_dim=NH, tie_weights=True,
                                softmax="adaptive"), 300)
    from gru_lm.config import validate

    with pytest.raises(ConfigError, match="only the adaptive softmax has clusters"):
        validate({"model": {"cutoffs": [10]}})
    with pytest.raises(ConfigError, match="must be increasing positive ranks"):
        validate({"model": {"softmax": "adaptive", "cutoffs": [10, 10]}})


def test_cutoffs_are_whole_numbers_not_flags():
    from gru_lm.config import validate

    with pytest.raises(ConfigError, match="cutoffs.0"):
        validate({"model": {"softmax": "adaptive", "cutoffs": [True]}})


def test_the_run_says_which_output_layer_it_has(workdir):
    from conftest import cli

    r = cli("train", "-c", "configs/tiny.yaml", "--name", "a", "model.softmax=adaptive")
    assert r.exit_code == 0, r.output
    assert "no cutoff (250, 1,000, 4,000) falls inside the vocabulary of 28 tokens, so the " \
           "output layer is the full softmax" in " ".join(r.output.split())
    r = cli("train", "-c", "configs/tiny.yaml", "--name", "b", "model.softmax=adaptive",
            "model.cutoffs=[8,20]")
    assert r.exit_code == 0, r.output
    layer = "adaptive softmax (8 tokens in the head; clusters 8-20, 20-28)"
    assert layer in r.output
    import json

    summary = json.loads(Path("runs/b/summary.json").read_text())
    assert summary["output_layer"] == layer
