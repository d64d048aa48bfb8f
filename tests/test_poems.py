"""Poems in their forms (predict --form, --acrostic): constrained decoding on a run trained on
Chinese text, checked line by line, and refused in one line where it makes no sense."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ZH, cli, one_line_error, train_tiny

import gru_lm
from gru_lm.decoding import Decoding
from gru_lm.poems import FORMS, is_hanzi
from gru_lm.sampling import _pick


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
    for poem in run.samples("子曰", 2, form=form, temperature=1.5):  # its first characters
        assert poem.startswith("子曰")
        check(poem, width, lines)
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
    picked = _pick(logits, Decoding(temperature=0.7), torch.Generator().manual_seed(1), allowed)
    probs = torch.zeros_like(logits)
    probs[:, [3, 5, 8]] = (logits[:, [3, 5, 8]] / 0.7).softmax(-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(picked, expected.squeeze(-1))
    best = _pick(logits, Decoding(temperature=None, seed=None), None, allowed)
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


def test_a_prefix_begins_the_poem_and_a_whole_one_comes_before_it(zh_run):
    run = gru_lm.load(zh_run)
    poem = run.predict("学而", form="五绝")  # the prefix is the first line's beginning
    assert poem.startswith("学而")
    check(poem, 5, 4)
    poem = run.predict("学而时习之，", acrostic="学不人子", form="五绝")
    check(poem, 5, 4, "学不人子")
    first = run.predict(form="五绝")
    after = run.predict(first, form="五绝")  # a whole poem: the next starts on a new line
    assert after.startswith(first + "\n")
    check(after[len(first) + 1:], 5, 4)
    with pytest.raises(gru_lm.GruLmError, match=r"the prefix does not begin a 五绝: line 1, "
                       r"character 6 must be ， \(a line has 5 characters\), not '而'"):
        run.predict("学而时习之而", form="五绝")
    with pytest.raises(gru_lm.GruLmError, match="line 1, character 1 must be 子"):
        run.predict("学", acrostic="子")


def test_the_cli_prints_a_couplet_a_line_after_the_prefix(zh_run):
    r = cli("predict", "子曰：\n学而", "--form", "五绝", "--num-samples", "2", "--run", zh_run)
    assert r.exit_code == 0, r.output
    first, second = r.stdout.split("\n\n")
    for poem in (first, second):
        lines = poem.splitlines()
        assert lines[0] == "子曰：" and lines[1].startswith("学而") and len(lines) == 3
        check("".join(lines[1:]), 5, 4)


@pytest.mark.parametrize("spelling", ["五言绝句", "五絕", "五言絕句", " 五 绝 "])
def test_forms_go_by_their_usual_names(zh_run, spelling):
    check(gru_lm.load(zh_run).predict(form=spelling), 5, 4)


def test_ling_is_a_chinese_character():
    assert is_hanzi("〇") and is_hanzi("字") and is_hanzi("𠀀") and not is_hanzi("，")


def test_a_byte_level_run_is_told_forms_need_characters(workdir):
    run = train_tiny("zhb", *ZH, "data.preset=bytes")
    one_line_error(cli("predict", "--form", "五绝", "--run", run),
                   "reads its text with data.preset=bytes; use a run trained with "
                   "data.preset=raw")
