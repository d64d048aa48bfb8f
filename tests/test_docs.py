"""The docs stay true mechanically: every `gru-lm ...` command they show parses (the command
and its options exist), every config key they name exists, every error they show is the
one the code prints, and the layout table lists every module in its layer order.

Documented errors are regenerated from the code with GRU_LM_REGEN_DOCS=1 pytest
tests/test_docs.py (the blocks are rewritten in place), never pasted by hand."""

from __future__ import annotations

import os
import re
import shlex

import pytest
from conftest import ROOT, cli

from gru_lm.config import SECTIONS

DOCS = [ROOT / "README.md", ROOT / "README.zh-CN.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`(gru-lm [^`\n]+)`")
KEY = re.compile(r"\b(data|model|train|run)\.([a-z][a-z0-9_]*)\b(?![./(])")
NOT_KEYS = {"py", "pt", "yaml", "json", "jsonl", "txt", "png", "svg", "pdf", "md", "bin", "onnx",
            "safetensors"}


SHELL = re.compile(r"(?:^|\|\s*)(?:[A-Z_]+=\S+\s+)*(gru-lm\s[^|]*)")


def _commands(text: str) -> list[str]:
    """Every gru-lm command shown: in code blocks (after a `$ ` prompt, environment
    assignments or a pipe, or bare) and inline."""
    out = []
    for block in FENCE.findall(text):
        for line in block.splitlines():
            out += SHELL.findall(line.removeprefix("$ ").strip())
    out += INLINE.findall(text)
    return out


def _args(command: str) -> list[str]:
    """The arguments of one `gru-lm ...` line: up to a pipe, a redirect or a comment,
    without the `...` that stands for "and so on"."""
    command = re.split(r"\s(?:\||>|2>|&&|#)\s", command + " ")[0]
    try:
        words = shlex.split(command)
    except ValueError:  # an unclosed quote in prose: keep what splits on spaces
        words = command.split()
    return [w for w in words[1:] if w not in ("...", "…") and not w.endswith("...")]


def _parse(args: list[str]) -> None:
    """Check a command line against the CLI without running it: the command path exists and
    every option is one the command (or a group on its path) takes."""
    from typer.main import get_command

    from gru_lm.cli import app

    cmd = get_command(app)
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    rest = list(args)
    while hasattr(cmd, "commands"):
        words = [w for w in rest if not w.startswith("-")]
        if not words or words[0] not in cmd.commands:
            assert not words, f"no command {words[0]!r}"
            break
        rest = rest[rest.index(words[0]) + 1:]
        cmd = cmd.commands[words[0]]
        known |= {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    known |= {"-h", "--help"}
    for word in rest:
        if word == "--":
            break
        if word.startswith("-") and len(word) > 1 and not word[1].isdigit():
            assert word.split("=")[0] in known, f"no option {word!r} for {cmd.name}"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_documented_command_parses(doc):
    text = doc.read_text()
    failing = {c.removeprefix("$ ") for c, _ in _error_examples(text)}  # (tested below)
    for command in _commands(text):
        if command.strip() in failing:
            continue
        try:
            _parse(_args(command))
        except Exception as e:  # click's errors: NoSuchOption, UsageError...
            pytest.fail(f"{doc.name}: `{command}` does not parse: {e}")


def test_the_docs_show_commands():
    assert sum(len(_commands(d.read_text())) for d in DOCS) > 40


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_documented_config_key_exists(doc):
    text = doc.read_text()
    for command, shown in _error_examples(text):  # (they misspell keys on purpose)
        text = text.replace("\n".join([command, *shown]), "")
    unknown = sorted({f"{s}.{k}" for s, k in KEY.findall(text)
                      if k not in NOT_KEYS and k not in SECTIONS[s].model_fields})
    assert not unknown, f"{doc.name} names config keys that do not exist: {unknown}"


def _error_examples(text: str):
    """(command, its documented lines) for each documented command that fails: a `$ gru-lm`
    line followed by `error:` lines."""
    for block in FENCE.findall(text):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ gru-lm ") and i + 1 < len(lines) and \
                    lines[i + 1].startswith("error:"):
                shown = []
                for follow in lines[i + 1:]:
                    if follow.startswith("$ "):
                        break
                    shown.append(follow)
                yield line, shown


def test_documented_errors_are_what_the_code_prints(workdir):
    regenerate = os.environ.get("GRU_LM_REGEN_DOCS") == "1"
    found = 0
    for doc in DOCS:
        text = original = doc.read_text()
        for command, shown in _error_examples(original):
            found += 1
            r = cli(*_args(command.removeprefix("$ ")))
            actual = r.output.rstrip("\n").splitlines()
            if regenerate:
                text = text.replace("\n".join([command, *shown]),
                                    "\n".join([command, *actual]))
            else:
                assert actual == shown, (f"{doc.name}: `{command}` prints\n" + "\n".join(actual)
                                         + "\n(GRU_LM_REGEN_DOCS=1 rewrites the block)")
        if text != original:
            doc.write_text(text)
    assert found >= 3


def test_the_layout_table_lists_every_module_in_layer_order():
    from test_layout import LAYERS

    table = (ROOT / "docs" / "development.md").read_text()
    listed = re.findall(r"^\| `gru_lm/([a-z_0-9]+)\.py`", table, re.M)
    modules = [m for m in LAYERS if m not in ("__init__", "__main__")]
    assert listed == modules, "docs/development.md's layout table: " + ", ".join(
        m for m in modules if m not in listed) + " missing, or out of layer order"


# ---------------------------------------------------------------- the Chinese README

TERMS = ["门控循环单元", "重置门", "更新门", "困惑度", "梯度裁剪", "顺序分区", "随机采样"]


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else None]


def _table_figures(section: str) -> list[str]:
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [n for line in rows for n in re.findall(r"\d[\d,.]*", line)]


def test_the_chinese_readme_keeps_step_with_the_english_one():
    """README.zh-CN.md is linked both ways, uses the book's Chinese terms, shows the same two
    quick-start commands and the same figures in its results table as README.md."""
    en = (ROOT / "README.md").read_text(encoding="utf-8")
    zh = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    assert "(README.zh-CN.md)" in en.split("\n## ")[0] and "(README.md)" in zh.split("\n## ")[0]
    assert [t for t in TERMS if t not in zh] == []

    def make_commands(section: str) -> list[str]:
        return re.findall(r"^(make \w+)", FENCE.findall(section)[0], re.M)

    assert make_commands(_section(zh, "## 快速上手")) == make_commands(
        _section(en, "## Quick start")) == ["make test", "make train"]
    figures = _table_figures(_section(en, "## Results"))
    assert len(figures) > 20 and _table_figures(_section(zh, "## 结果")) == figures


# ---------------------------------------------------------------- the Chinese pages

CHINESE_PAGES = ["README.zh-CN.md", *(str(p.relative_to(ROOT)) for p in
                                      sorted((ROOT / "docs").glob("*.zh-CN.*")))]


def _prose(page: str) -> str:
    """The text a Markdown renderer joins lines of: a page's Markdown (a notebook's markdown
    cells), without its fenced code, whose line breaks are real."""
    import json

    text = (ROOT / page).read_text(encoding="utf-8")
    if page.endswith(".ipynb"):
        text = "\n\n".join("".join(c["source"]) for c in json.loads(text)["cells"]
                           if c["cell_type"] == "markdown")
    return FENCE.sub("", text)


def _wide(c: str) -> bool:
    import unicodedata

    return unicodedata.east_asian_width(c) in "WF"


@pytest.mark.parametrize("page", CHINESE_PAGES)
def test_no_line_break_between_two_chinese_characters(page):
    """A line break inside a paragraph renders as a space; between two Chinese characters
    (or full-width marks) that space is a stray gap, so a Chinese paragraph is one line."""
    text = _prose(page)
    breaks = [text[max(0, m.start() - 12):m.end() + 12].replace("\n", "⏎")
              for m in re.finditer(r"(?<=.)\n(?=.)", text)
              if _wide(text[m.start() - 1]) and _wide(text[m.end()])]
    assert not breaks, f"{page}: {len(breaks)} line break(s) between Chinese characters: " \
        f"{breaks[:3]}"


def test_the_chinese_pages_use_the_books_terms():
    """The terms of 《动手学深度学习》's Chinese edition, not their near-synonyms."""
    wrong = {"时间机器": "时光机器", "字表": "词表", "参照": "基线", "从零实现": "从零开始实现"}
    for page in CHINESE_PAGES:
        text = _prose(page)
        found = [f"{w} (the book says {right})" for w, right in wrong.items() if w in text]
        assert not found, f"{page}: {found}"
