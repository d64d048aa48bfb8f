"""Any text at all: readable samples by default, unknown prefix characters, the byte-level
preset, and fine-tuning one run from another."""

from __future__ import annotations

from pathlib import Path

from conftest import cli, one_line_error, train_tiny

# ---------------------------------------------------------------- unknown characters


def test_unknown_prefix_characters_are_listed_or_skipped(workdir):
    run = train_tiny("raw", "data.preset=raw")
    one_line_error(cli("predict", "the time ☃ machine", "--run", run), "☃",
                   "--unknown skip")
    r = cli("predict", "the time ☃☃ machine", "--run", run, "--unknown", "skip")
    assert r.exit_code == 0, r.output
    assert "dropped 2 character(s)" in r.stderr
    assert r.stdout.startswith("the time  machine")
    one_line_error(cli("predict", "☃☃", "--run", run, "--unknown", "skip"),
                   "empty after", "dropping unknown characters")
