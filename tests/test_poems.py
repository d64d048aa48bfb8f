"""Poems in their forms (predict --form, --acrostic): constrained decoding on a run trained on
Chinese text, checked line by line, and refused in one line where it makes no sense."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cli, one_line_error, train_tiny

import gru_lm
from gru_lm.poems import FORMS, is_hanzi
from gru_lm.sampling import _pick

ZH = ("data.dataset=null", "data.path=examples/classics-zh.txt", "data.preset=raw",
      "data.max_tokens=null")


@pytest.fixture
def zh_run(workdir):
    return train_tiny("zh", *ZH)


def lines_of(poem: str) -> list[str]:
    """The lines of a poem written on one line: each ends with ，or 。."""
    out, line = [], ""
    for c in poem:
        line += c
        if c in "，。":
            out.append(line)
            line = ""
    assert line == "", f"{poem!r} does not end with a mark"
    return out


def check(poem: str, width: int, lines: int, heads: str = "") -> None:
    got = lines_of(poem)
    assert len(got) == lines, poem
    for k, line in enumerate(got):
        assert len(line) == width + 1 and all(is_hanzi(c) for c in line[:-1]), poem
        assert line[-1] == ("。" if k % 2 or k == lines - 1 else "，"), poem
        if heads:
            assert line[0] == heads[k], poem


def test_acrostic_five_character_quatrain_from_the_cli(zh_run):
    r = cli("predict", "--acrostic", "学而时习", "--form", "五绝", "--run", zh_run)
    assert r.exit_code == 0, r.output
    poem = r.stdout.replace("\n", "")
    check(poem, 5, 4, "学而时习")
    assert r.stdout.count("\n") == 2  # a couplet a line


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_from_the_api(zh_run, form):
    run = gru_lm.load(zh_run)
    width, lines = FORMS[form]
    for seed in range(3):
        check(run.predict(form=form, seed=seed), width, lines)
    for poem in run.samples("子曰", 2, form=form, temperature=1.5):
        assert poem.startswith("子曰")
        check(poem[2:], width, lines)
    check(run.predict(form=form, greedy=True), width, lines)


def test_an_acrostic_alone_has_a_line_a_character_of_five_or_seven(zh_run):
    run = gru_lm.load(zh_run)
    for seed in range(4):
        poem = run.predict(acrostic="学而时习之", seed=seed, temperature=2.0)
        width = len(lines_of(poem)[0]) - 1
        assert width in (5, 7)
        check(poem, width, 5, "学而时习之")


def test_traditional_heads_are_read_in_the_runs_script(workdir):
    run = train_tiny("zh-s", *ZH, "data.script=simplified")
    check(gru_lm.load(run).predict(acrostic="學而時習", form="五絕"), 5, 4, "学而时习")


def test_the_form_renormalises_the_models_distribution():
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    allowed = torch.zeros(2, 12, dtype=torch.bool)
    allowed[:, [3, 5, 8]] = True
    picked = _pick(logits, 0.7, None, None, torch.Generator().manual_seed(1), allowed)
    probs = torch.zeros_like(logits)
    probs[:, [3, 5, 8]] = (logits[:, [3, 5, 8]] / 0.7).softmax(-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(picked, expected.squeeze(-1))
    best = _pick(logits, None, None, None, None, allowed)
    assert torch.equal(best, logits.masked_fill(~allowed, -math.inf).argmax(-1))


def test_forms_are_refused_where_they_make_no_sense(zh_run, tiny_run):
    english = tiny_run()
    one_line_error(cli("predict", "--form", "五绝", "--run", english),
                   "--form writes Chinese poems, but this run's vocabulary (28 tokens) has no "
                   "Chinese characters")
    one_line_error(cli("predict", "--acrostic", "春夏秋冬", "--form", "五绝", "--run", zh_run),
                   "--acrostic has 3 characters outside the vocabulary", "'春秋冬'")
    one_line_error(cli("predict", "--acrostic", "春a", "--run", zh_run),
                   "'a' is not a Chinese character")
    one_line_error(cli("predict", "--acrostic", "学而", "--form", "七律", "--run", zh_run),
                   "--acrostic 学而 has 2 characters but a 七律 has 8 lines")
    one_line_error(cli("predict", "--form", "五绝", "-n", "20", "--run", zh_run),
                   "--num-chars 20 means nothing with --form")
    one_line_error(cli("predict", "--form", "六绝", "--run", zh_run),
                   "--form '六绝' is not a form gru-lm knows; give one of 五绝, 七绝, 五律, 七律")
    one_line_error(cli("predict", "--run", zh_run), "give a prefix to continue")
