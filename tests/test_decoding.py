"""One decoding value (gru_lm.Decoding) and beam search: `predict --beam K`, --no-repeat N."""

from __future__ import annotations

import math
import random
import tracemalloc

import pytest
import torch
from conftest import cli, one_line_error

import gru_lm
from gru_lm.decoding import DEFAULT_CHARS, DEFAULT_TEMPERATURE, Decoding
from gru_lm.errors import GruLmError
from gru_lm.sampling import NoRepeat, PersistentMap, beam_search, encode_prefix, generate

PREFIX = "time traveller"


def _loaded(tiny_run):
    run = gru_lm.load(tiny_run())
    cfg, vocab, model = run._model()
    ids, _ = encode_prefix(PREFIX, vocab, cfg.data)
    return run, vocab, model, ids


def _log_prob(model, ids: list[int], cont: list[int]) -> float:
    """log P(cont | ids) by reading prefix + continuation in one pass (teacher forcing)."""
    x = torch.tensor(ids + cont[:-1]).unsqueeze(0)
    with torch.no_grad():
        logits, _ = model(x, model.begin_state(1, "cpu"))
    logp = logits[0].float().log_softmax(-1)[len(ids) - 1:]
    return float(logp.gather(1, torch.tensor(cont).unsqueeze(1)).sum())


# ---------------------------------------------------------------- the value


def test_defaults_live_in_the_value_and_the_config_reads_them():
    from gru_lm.config import TrainConfig

    d = Decoding()
    assert (d.num_chars, d.temperature, d.seed) == (DEFAULT_CHARS, DEFAULT_TEMPERATURE, 0)
    assert TrainConfig.model_fields["sample_temperature"].default == DEFAULT_TEMPERATURE
    assert Decoding.of(beam=4).count == 4 and Decoding.of(num_samples=3).count == 3


def test_predict_help_states_the_default_temperature():
    r = cli("predict", "--help")
    assert f"default {DEFAULT_TEMPERATURE}" in " ".join(r.output.split())


@pytest.mark.parametrize("kwargs, message", [
    ({"beam": 3, "greedy": True}, "--beam 3 and --greedy"),
    ({"beam": 3, "temperature": 0.5}, "--temperature means nothing"),
    ({"beam": 3, "seed": 1}, "--seed means nothing"),
    ({"beam": 3, "num_samples": 2}, "--num-samples means nothing"),
    ({"beam": 3, "top_p": 0.9}, "--top-p means nothing"),
    ({"beam": 2, "form": "五绝"}, "--beam with --form"),
    ({"beam": 0}, "--beam 0 is out of range"),
    ({"beam": 1001}, "--beam 1001 is out of range"),
    ({"no_repeat": 1}, "--no-repeat 1 is out of range"),
    ({"num_chars": 0}, "--num-chars 0 is out of range"),
    ({"temperature": 0.0}, "--temperature 0.0 is invalid"),
])
def test_each_bad_choice_is_one_line(kwargs, message):
    with pytest.raises(GruLmError) as e:
        Decoding.of(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_value_made_directly_is_checked_too():
    with pytest.raises(GruLmError, match="--top-k 0 is invalid"):
        Decoding(top_k=0)
    with pytest.raises(GruLmError, match="num_samples must be 3"):
        Decoding(temperature=None, seed=None, beam=3)
    with pytest.raises(GruLmError, match="takes no temperature"):
        Decoding(beam=2, num_samples=2)  # (the default temperature is a sampling choice)


def test_the_api_takes_a_decoding_or_its_fields_not_both(tiny_run):
    run = gru_lm.load(tiny_run())
    d = Decoding(20, 0.8, seed=3)
    assert run.predict(PREFIX, decoding=d) == run.predict(PREFIX, 20, temperature=0.8, seed=3)
    for call, message in ((lambda: run.predict(PREFIX, decoding=d, seed=1), "not both"),
                          (lambda: run.predict(PREFIX, 20, decoding=d), "not both"),
                          (lambda: run.predict(PREFIX, decoding="greedy"), "not a gru_lm"),
                          (lambda: run.predict(PREFIX, beem=3), "no argument beem="),
                          (lambda: run.predict(PREFIX, beam="3"), "beam='3' is a str")):
        with pytest.raises(GruLmError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- beam search


def test_a_beam_of_one_is_greedy(tiny_run):
    run, vocab, model, ids = _loaded(tiny_run)
    greedy = generate(model, ids, Decoding(40, None, seed=None))[0]
    (beam,) = beam_search(model, ids, Decoding.of(40, beam=1))
    assert beam.ids == greedy
    assert run.predict(PREFIX, 40, beam=1) == run.predict(PREFIX, 40, greedy=True)


def test_beams_are_distinct_sorted_scored_and_no_worse_than_greedy(tiny_run):
    _, vocab, model, ids = _loaded(tiny_run)
    (greedy,) = beam_search(model, ids, Decoding.of(30, beam=1))
    beams = beam_search(model, ids, Decoding.of(30, beam=5))
    assert len(beams) == 5 and len({tuple(b.ids) for b in beams}) == 5
    assert all(len(b.ids) == 30 for b in beams)
    losses = [b.log_loss for b in beams]
    assert losses == sorted(losses)
    assert beams[0].log_prob >= greedy.log_prob - 1e-4
    for b in (beams[0], beams[-1], greedy):  # the score is the model's, read in one pass
        assert b.log_prob == pytest.approx(_log_prob(model, ids, b.ids), abs=1e-3)
        assert b.log_loss == pytest.approx(-b.log_prob / 30)


def test_no_repeat_blocks_every_repeated_ngram(tiny_run):
    _, vocab, model, ids = _loaded(tiny_run)

    def repeats(seq: list[int], n: int) -> int:
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        return len(grams) - len(set(grams))

    looping = beam_search(model, ids, Decoding.of(120, beam=3))
    assert repeats(looping[0].ids, 4) > 0  # (the tiny model loops without the block)
    for d in (Decoding.of(120, beam=3, no_repeat=4), Decoding.of(120, greedy=True, no_repeat=4),
              Decoding.of(120, num_samples=2, no_repeat=4)):
        outs = generate(model, ids, d)
        assert len(outs) == d.count
        assert all(repeats(ids[-3:] + o, 4) == 0 for o in outs), d


def _reference_beams(model, ids: list[int], width: int, n: int, steps: int) -> list[list[int]]:
    """Beam search with --no-repeat as plainly as it can be written: every beam keeps its whole
    text, and a token is blocked when the N-gram it completes is found in it by a scan."""
    with torch.no_grad():
        state = model.begin_state(1, "cpu")
        logits, state = model(torch.tensor([ids]), state)
        logits = logits[:, -1]
        V = logits.shape[-1]
        scores, texts = torch.zeros(1), [ids[-(n - 1):]]  # (the prefix's last N-1 tokens)
        for _ in range(steps):
            logp = logits.float().log_softmax(-1)
            logp[:, 0] = -math.inf
            allowed = torch.ones_like(logp, dtype=torch.bool)
            for r, text in enumerate(texts):
                grams = {tuple(text[i:i + n]) for i in range(len(text) - n + 1)}
                blocked = [t for t in range(V) if (*text[len(text) - n + 1:], t) in grams]
                if blocked and len(blocked) < V - 1:
                    allowed[r, blocked] = False
            logp = logp.masked_fill(~allowed, -math.inf)
            total = (scores.unsqueeze(1) + logp).flatten()
            scores, flat = torch.topk(total, min(width, int(torch.isfinite(total).sum())))
            parents, tokens = flat // V, flat % V
            texts = [texts[p] + [t] for p, t in zip(parents.tolist(), tokens.tolist(),
                                                     strict=True)]
            state = state.index_select(1, parents) if not isinstance(state, tuple) else \
                tuple(s.index_select(1, parents) for s in state)
            logits, state = model(tokens.unsqueeze(1), state)
            logits = logits[:, -1]
    return [text[n - 1:] for text in texts]


@pytest.mark.parametrize("width, n, steps", [(3, 4, 120), (8, 2, 60), (5, 6, 150), (1, 3, 80)])
def test_no_repeat_beams_are_those_of_the_plain_search(tiny_run, width, n, steps):
    _, _, model, ids = _loaded(tiny_run)
    beams = beam_search(model, ids, Decoding.of(steps, beam=width, no_repeat=n))
    expected = _reference_beams(model, ids, width, n, steps)
    assert [b.ids for b in beams] == expected
    for b in beams:
        grams = [tuple((ids[-(n - 1):] + b.ids)[i:i + n]) for i in range(len(b.ids))]
        assert len(grams) == len(set(grams))


def _step_bytes(block: NoRepeat, rng: random.Random, steps: int, beams: int, V: int) -> int:
    """Run `steps` beam steps of random tokens (beams fork and die as in a search) and
    return the most memory one of the last 20 allocated (Python objects, by tracemalloc)."""
    most = 0
    for i in range(steps):
        parents = sorted(rng.choice(range(beams)) for _ in range(beams))
        tokens = [rng.randrange(1, V) for _ in range(beams)]
        measure = i >= steps - 20
        if measure:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
        block.allowed()
        block.advance(tokens, parents)
        if measure:
            most = max(most, tracemalloc.get_traced_memory()[1] - before)
            tracemalloc.stop()
    return most


def test_no_repeat_does_the_same_work_each_step_however_long_the_text():
    # --beam 8 --no-repeat 20 -n 4000 took 128 s against 5 s without the block when each
    # step copied every beam's N-grams; a step's memory stands for its work (no timing)
    rng, beams, V = random.Random(0), 8, 60
    block = NoRepeat(20, list(range(1, 30)), 1, V)
    block.advance([1] * beams, [0] * beams)
    early = _step_bytes(block, rng, 300, beams, V)
    late = _step_bytes(block, rng, 2700, beams, V)  # 3,000 characters written
    assert late < 2 * early, (early, late)


class _Colliding:
    """A key whose hash the test chooses: many keys in one leaf, splits at every depth."""

    def __init__(self, key: int, h: int):
        self.key, self.h = key, h

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other) -> bool:
        return isinstance(other, _Colliding) and other.key == self.key


def test_a_persistent_map_is_a_dict_whose_old_versions_stay():
    rng = random.Random(1)
    versions: list[tuple[PersistentMap, dict]] = [(PersistentMap(), {})]
    for i in range(3000):
        m, d = versions[rng.randrange(len(versions))]  # (any version may be extended)
        k = rng.randrange(400)
        # (hashes equal in their low bits, equal throughout, negative, or plain ints)
        key = (_Colliding(k, k << 30), _Colliding(k, k % 7), _Colliding(k, -k), k)[k % 4]
        versions.append((m.set(key, i), {**d, key: i}))
    for m, d in versions[::37]:
        assert all(m.get(k) == v for k, v in d.items())
        assert m.get(_Colliding(-1, 0)) is None and m.get("absent", 5) == 5


def test_a_beam_wider_than_the_vocabulary_is_refused(tiny_run):
    run, vocab, model, ids = _loaded(tiny_run)
    with pytest.raises(GruLmError, match=f"give at most {len(vocab) - 1}"):
        run.predict(PREFIX, beam=len(vocab))
    assert len(run.samples(PREFIX, num_chars=3, beam=len(vocab) - 1)) == len(vocab) - 1


def test_predict_beam_prints_sorted_beams_with_their_log_loss(tiny_run):
    run = tiny_run()
    r = cli("predict", PREFIX, "--run", run, "--beam", "5", "-n", "30", "--no-repeat", "4")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stdout.splitlines() if line]
    assert len(lines) == 5
    losses = [float(line.split("\t")[0]) for line in lines]
    assert losses == sorted(losses) and all(0 < x < math.log(28) * 3 for x in losses)
    assert all(line.split("\t")[1].startswith(PREFIX) for line in lines)
    assert len({line.split("\t")[1] for line in lines}) == 5
    assert "beam search, width 5" in r.stderr
    api = gru_lm.load(run).continuations(PREFIX, num_chars=30, beam=5, no_repeat=4)
    assert [f"{x:.4f}" for x in api.log_losses] == [line.split("\t")[0] for line in lines]


@pytest.mark.parametrize("args, message", [
    (("--beam", "3", "--greedy"), "--beam 3 and --greedy"),
    (("--beam", "3", "--temperature", "0.5"), "--temperature means nothing"),
    (("--beam", "0"), "--beam 0 is out of range"),
    (("--beam", "40"), "give at most 27"),
    (("--no-repeat", "1"), "--no-repeat 1 is out of range"),
])
def test_predict_refuses_a_beam_that_makes_no_sense(tiny_run, args, message):
    one_line_error(cli("predict", PREFIX, "--run", tiny_run(), *args), message)
