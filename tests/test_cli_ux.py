"""The CLI as people expect it (issue 15): help, completion, config show, sampling flags,
prefix files, compare's table, the progress bar, own text, plots, gates figures, TensorBoard."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import typer
import yaml
from conftest import cli, one_line_error, reseed, train_tiny

from gru_lm.cli import app
from gru_lm.config import described_yaml, load_config, validate


def _commands(group, path: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command of the app, as the words that call it (read from the Typer app, so a
    new command is checked without being listed here)."""
    out = []
    for name, cmd in group.commands.items():
        if getattr(cmd, "commands", None) is not None:  # a group (data, config)
            out += _commands(cmd, (*path, name))
        else:
            out.append([*path, name])
    return out


COMMANDS = _commands(typer.main.get_command(app))


# ---------------------------------------------------------------- help and completion


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_short_help_with_examples_and_plain_metavars(command):
    r = cli(*command, "-h")
    assert r.exit_code == 0, r.output
    assert "Examples" in r.output and f"$ gru-lm {' '.join(command)}" in r.output
    assert not re.search(r"<(bool|int|float|path|str|list)", r.output), r.output


def _summaries(group_words: list[str]) -> dict[str, str]:
    """The Commands panel of `gru-lm WORDS --help` on a wide terminal: name -> its rows."""
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, [*group_words, "--help"], env={"COLUMNS": "250"}).output
    panel = out.split("Commands")[1].split("╰")[0]
    rows: dict[str, str] = {}
    name = ""
    for line in panel.splitlines()[1:]:
        cells = line.strip("│ ").split(None, 1)
        if not cells:
            continue
        if line.startswith("│ ") and not line.startswith("│  "):  # a row that names a command
            name = cells[0]
            rows[name] = cells[1] if len(cells) > 1 else ""
        else:  # (a row that goes on: a summary broken by a line break)
            rows[name] += "\n" + line.strip("│ ")
    return rows


@pytest.mark.parametrize("group", [[], ["data"], ["config"]], ids=lambda g: " ".join(g) or "root")
def test_every_summary_in_a_help_list_is_whole_sentences_on_one_line(group):
    command = typer.main.get_command(app)
    for word in group:
        command = command.commands[word]
    rows = _summaries(group)
    assert set(rows) == set(command.commands)
    for name, summary in rows.items():
        assert "\n" not in summary and summary.endswith("."), (name, summary)
        # (the whole first paragraph of its docstring, not a cut one)
        sub = command.commands[name]
        first = (sub.short_help or sub.help or "").split("\n\n")[0].strip()
        assert "\n" not in first, (name, first)


def test_metavars_name_what_to_give():
    out = cli("evaluate", "-h").output
    assert re.search(r"--split\s+val\|test\|train", out)
    assert re.search(r"--run\s+DIR", out) and re.search(r"--ngram-order\s+INT", out)
    assert re.search(r"--dynamic\s+Also", out)  # a flag takes no value, so shows none


def test_root_help_offers_completion_and_completion_works():
    assert "--install-completion" in cli("-h").output
    from typer.testing import CliRunner

    from gru_lm.cli import app

    env = {"_GRU_LM_COMPLETE": "complete_bash", "COMP_WORDS": "gru-lm evaluate --split ",
           "COMP_CWORD": "3"}
    r = CliRunner().invoke(app, [], env=env, prog_name="gru-lm")
    assert r.output.split() == ["val", "test", "train"]
    env.update(COMP_WORDS="gru-lm tr", COMP_CWORD="1")
    assert CliRunner().invoke(app, [], env=env, prog_name="gru-lm").output.split() == ["train"]


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--split", "dev"], "error: Invalid value for '--split': 'dev' is not one of "
     "'val', 'test', 'train' (see gru-lm evaluate -h)"),
    (["compare", "--seeds", "x"], "error: Invalid value for '--seeds'"),
    (["trian"], "error: No such command 'trian'. Did you mean 'train'? (see gru-lm -h)"),
    (["train", "--bogus"], "error: No such option: --bogus (see gru-lm train -h)"),
])
def test_usage_errors_are_one_line(args, message):
    r = cli(*args)
    assert r.exit_code == 2 and r.output.startswith(message) and r.output.count("\n") == 1


# ---------------------------------------------------------------- config show


def test_config_show_prints_a_valid_config_with_descriptions_and_defaults():
    r = cli("config", "show", "--config", "configs/gru.yaml", "train.lr=0.005")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("# resolved from configs/gru.yaml + train.lr=0.005\n")
    assert re.search(r"num_hiddens: 512 +# hidden units per layer "
                     r"\[default: 256; from configs/recipe.yaml\]", r.output)
    assert re.search(r"num_layers: 1 +# stacked recurrent layers\n", r.output)  # a default
    shown = validate(yaml.safe_load(r.output))
    assert shown == load_config(Path("configs/gru.yaml"), ["train.lr=0.005"])


def test_described_yaml_round_trips_every_default():
    cfg = load_config(None)
    assert validate(yaml.safe_load(described_yaml(cfg))) == cfg


def test_config_show_errors_are_one_line(tmp_path):
    one_line_error(cli("config", "show", "train.lr=-1"), "train.lr")


# ---------------------------------------------------------------- predict


def test_sampling_is_the_default_and_greedy_takes_no_sampling_option():
    from gru_lm.decoding import DEFAULT_SEED, DEFAULT_TEMPERATURE, Decoding
    from gru_lm.errors import GruLmError

    how = Decoding.of()
    assert (how.temperature, how.seed) == (DEFAULT_TEMPERATURE, DEFAULT_SEED)
    assert "--seed N" in how.note and "--greedy" in how.note
    assert Decoding.of(temperature=0.9, seed=3).note == ""  # nothing defaulted
    assert Decoding.of(greedy=True).temperature is None and Decoding.of(greedy=True).greedy
    for kwargs in ({"temperature": 0.5}, {"top_k": 5}, {"top_p": 0.9}, {"num_samples": 3},
                   {"seed": 7}):
        with pytest.raises(GruLmError, match="--greedy takes"):
            Decoding.of(greedy=True, **kwargs)


def test_default_predict_repeats_itself_and_differs_from_greedy(tiny_run):
    tiny_run()
    first = cli("predict", "time traveller")
    assert first.exit_code == 0, first.output
    assert "sampled at temperature 0.6" in first.stderr and "--greedy" in first.stderr
    assert cli("predict", "time traveller").stdout == first.stdout  # seed 0 by default
    greedy = cli("predict", "time traveller", "--greedy")
    assert greedy.stdout != first.stdout and "sampled" not in greedy.stderr
    assert cli("predict", "time traveller", "--seed", "0").stdout == first.stdout
    one_line_error(cli("predict", "time traveller", "--greedy", "--seed", "1"),
                   "--greedy takes", "--seed")


def test_several_samples_differ_and_a_seed_repeats_them(tiny_run):
    tiny_run()
    r = cli("predict", "time traveller", "--num-samples", "3", "--seed", "0")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and len(set(lines)) == 3
    assert cli("predict", "time traveller", "--num-samples", "3", "--seed", "0"
               ).stdout.splitlines() == lines
    other = cli("predict", "time traveller", "--seed", "5").stdout
    assert other != cli("predict", "time traveller", "--seed", "0").stdout


def test_prefix_from_a_file_or_stdin(tiny_run, tmp_path):
    tiny_run()
    expected = cli("predict", "the time machine").stdout
    f = tmp_path / "prefix.txt"
    f.write_text("the time machine\n")
    assert cli("predict", "--prefix-file", f).stdout == expected
    from typer.testing import CliRunner

    from gru_lm.cli import app

    r = CliRunner().invoke(app, ["predict", "--prefix-file", "-"], input="the time machine\n")
    assert r.exit_code == 0 and r.stdout == expected
    one_line_error(cli("predict", "x", "--prefix-file", f), "not both")
    one_line_error(cli("predict"), "give a prefix to continue")
    one_line_error(cli("predict", "--prefix-file", tmp_path / "nope.txt"), "does not exist")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00abc")
    one_line_error(cli("predict", "--prefix-file", tmp_path / "bin"), "not UTF-8 text")
    one_line_error(cli("predict", "--prefix-file", "/dev/null"), "the prefix is empty")


# ---------------------------------------------------------------- compare


def _members(names: list[str], template: Path) -> list[Path]:
    out = []
    for seed, name in enumerate(names):
        dest = Path("runs/cmp") / name
        shutil.copytree(template, dest)
        out.append(reseed(dest, seed))
    return out


def test_compare_table_fits_80_columns(tiny_run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    template = tiny_run()
    runs = _members(["a-much-longer-config-name-s0", "a-much-longer-config-name-s1", "b-s0"],
                    template)
    b_config = runs[2] / "config.yaml"  # another recipe: b is a row of its own
    b_config.write_text(b_config.read_text().replace("lr: 0.01", "lr: 0.02"))
    r = cli("compare", "--runs", *runs, "--out", "runs/cmp-out")
    assert r.exit_code == 0, r.output
    table = [line for line in r.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert len(table) == 8 and all(len(line) <= 80 for line in table), r.stdout
    assert table[4].startswith("│   ensemble ")  # the two seeds of a, averaged
    assert table[6].startswith("│ all runs, weighted on val ")  # every run: two recipes
    assert "…" not in r.stdout
    row_b = next(line for line in table if "│ b " in line)
    assert "±" not in row_b  # one seed: no spread to show
    assert re.search(r"\d\.\d{3} ± \d\.\d{3}", r.stdout)  # two seeds: mean ± std
    assert "params" not in r.stdout and "stopped by" not in r.stdout
    wide = cli("compare", "--runs", *runs, "--out", "runs/cmp-wide", "--wide").stdout
    assert "params" in wide and "stopped by" in wide


@pytest.mark.parametrize("rate", [1e3, 3e4, 1.126e5, 9.99e5, 4.2e6, 7.7e7, 1e8])
def test_compare_table_keeps_every_name_whole_at_any_speed(rate, monkeypatch, capsys):
    """The measured speed is injected: from a slow CPU (10^3 tok/s) to a GPU (10^8) the
    80-column table keeps every model name whole and every line within 80 columns."""
    from gru_lm.report import Comparison, ResultRow
    from gru_lm.views import show_comparison

    monkeypatch.setenv("COLUMNS", "80")
    iv = {"low": 15.2, "high": 16.5}
    names = ["a-much-longer-config-name", "gru-scratch", "lstm"]
    rows = [ResultRow(model=n, kind="seeds", name="lstm", seeds=3, params=None,
                      val_ppl_mean=15.859, val_ppl_ci95=iv, test_ppl_mean=16.123,
                      test_ppl_ci95=iv, val_bpc_mean=4.0, stopped_by=[],
                      tokens_per_s_mean=rate * (1 + i)) for i, n in enumerate(names)]
    show_comparison(Comparison(rows=rows, comparisons=[], verdicts=[], references={},
                                 members=[], out=Path("runs/cmp")))
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line[:1] in "┏┃┡│└"]
    assert all(len(line) <= 80 for line in table), out
    assert "…" not in out
    for n in names:
        assert any(f"│ {n} " in line for line in table), (n, out)


def test_rate_fits_five_characters():
    from gru_lm.display import rate

    shown = [rate(x) for x in (0.4, 999, 9_999, 12_345, 112_581, 999_400, 1_126_000, 7.7e7,
                                 9.99e8, 3e11)]
    assert shown[:7] == ["0", "999", "9,999", "12.3k", "113k", "999k", "1.13M"]
    assert all(len(s) <= 5 for s in shown), shown


def test_compare_counts_members_and_quiet_hides_training(workdir):
    r = cli("compare", "configs/tiny.yaml", "--seeds", "2", "--out", "runs/c1")
    assert r.exit_code == 0, r.output
    assert "member 1/2: tiny-s0" in r.output
    assert re.search(r"member 2/2: tiny-s1, about \d+ s left", r.output)
    q = cli("compare", "configs/tiny.yaml", "--out", "runs/c2", "-q")
    assert q.exit_code == 0 and "member" not in q.output and "step " not in q.output
    assert "comparison (mean ± 95% CI over seeds)" in q.output


# ---------------------------------------------------------------- the progress bar


def test_progress_bar_shows_total_eta_and_train_ppl():
    from rich.console import Console

    from gru_lm.config import TrainConfig
    from gru_lm.display import Reporter, progress_where
    from gru_lm.trainer import TrainProgress

    t = TrainConfig(max_steps=2500, time_budget_s=600)
    assert progress_where(t, 1250, 93.4, 2500) == "step 1,250/2,500 93/600 s"
    assert progress_where(TrainConfig(epochs=1), 7, 1.0, None) == "step 7"
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=150)
    with Reporter(console).live(t, 2500) as update:
        update(TrainProgress(step=1250, elapsed_s=93.0, train_time_s=90.0, tokens_seen=10**6,
                             interval_nll=100.0, interval_tokens=100))
    out = buf.getvalue()
    assert "step 1,250/2,500" in out and "train ppl 2.72" in out and "eta" in out
    assert "loss ppl" not in out


# ---------------------------------------------------------------- your own text


def test_own_text_is_named_and_described(workdir):
    Path("mine.txt").write_text("Le café est très bon. Ça va? " * 300, encoding="utf-8")
    r = cli("data", "info", "data.path=mine.txt")
    assert r.exit_code == 0, r.output
    assert "corpus: mine.txt" in r.output and "data.path mine.txt" in r.output
    assert "non-ASCII characters such as accented letters" in r.output
    assert "data.preset=raw keeps the text" in r.output
    assert re.search(r"into [\d,]+ spaces, dropping [\d,]+, and lowercased", r.output)
    assert "preprocessing" not in cli("data", "info", "data.path=mine.txt",
                                      "data.preset=raw").output


def test_prefixes_that_do_not_fit_the_corpus_become_its_first_characters(workdir):
    Path("cats.txt").write_text("the cat sat on the mat. " * 400)  # no 'v' for "traveller"
    run = train_tiny("cats", "data.path=cats.txt",
                     "train.sample_prefixes=[time traveller, traveller]")
    samples = (run / "samples.txt").read_text()
    assert "traveller" not in samples
    assert samples.splitlines()[:2] == [  # as long as the prefixes they replace
        "step 30: the cat sat on" + samples.splitlines()[0][23:],
        "step 30: the cat " + samples.splitlines()[1][17:]]
    assert samples.splitlines()[1].startswith("step 30: the cat s")
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "cats2", "data.path=cats.txt",
            "train.max_steps=10", "train.sample_prefixes=[time traveller]")
    assert r.exit_code == 0, r.output
    assert "corpus cats.txt: 9,600 characters" in r.output
    assert "train.sample_prefixes[0] does not fit this corpus" in r.output
    assert "'the cat sat on' instead" in r.output
    # unset, the prefixes are the text's own first words: nothing to replace, no note
    own = train_tiny("cats3", "data.path=cats.txt")
    assert (own / "samples.txt").read_text().startswith("step 30: the cat")
    assert "does not fit" not in cli("train", "--config", "configs/tiny.yaml", "--name",
                                     "cats4", "data.path=cats.txt", "train.max_steps=10").output


# ---------------------------------------------------------------- plots and gates


def test_plot_overlays_runs_in_the_format_of_the_suffix(tiny_run):
    a, b = tiny_run("a"), tiny_run("b")
    r = cli("plot", a, b, "--out", "both.svg")
    assert r.exit_code == 0 and "wrote both.svg" in r.output
    svg = Path("both.svg").read_text()
    for text in ("a val", "b train", "best ", "uniform 27", "unigram ", "5-gram Kneser-Ney"):
        assert text in svg, text
    assert cli("plot", a, "--out", "a.pdf").exit_code == 0
    assert Path("a.pdf").read_bytes().startswith(b"%PDF")
    assert cli("plot", a).exit_code == 0 and (a / "curves.png").is_file()
    one_line_error(cli("plot", a, "--out", "a.jpg"), "a.jpg", ".png, .svg or .pdf")
    one_line_error(cli("plot", a, a, "--out", "x.png"), "given twice")


def test_plot_says_when_a_run_has_one_evaluation(tiny_run):
    run = tiny_run()
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    r = cli("plot", run, "--out", "one.png")
    assert r.exit_code == 0
    assert "has one evaluation (step 10): drawn as points" in r.stderr


def test_gates_figure_names_gates_model_run_and_mean_row(tiny_run):
    run = tiny_run("gated")
    r = cli("gates", "time traveller", "--run", run, "--png", "g.svg", "--units", "3")
    assert r.exit_code == 0, r.output
    svg = Path("g.svg").read_text()
    for text in ("update gate Z", "reset gate R", "mean of all", "gru-scratch gates, layer 0, "
                 "run gated", "Z (0 to 1)"):
        assert text in svg, text
    one_line_error(cli("gates", "time", "--run", run, "--png", "g.gif"), ".png, .svg or .pdf")


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_events_hold_the_metrics(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_tiny("tb", "train.tensorboard=true")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = acc.Scalars("val_ppl")
    assert [e.step for e in events] == [r["step"] for r in records] == [10, 20, 30]
    assert [e.value for e in events] == pytest.approx([r["val_ppl"] for r in records])
    assert {"train_ppl", "tokens_per_s", "lr"} <= set(acc.Tags()["scalars"])


def test_tensorboard_without_the_package_is_refused_before_training(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    r = cli("train", "--config", "configs/tiny.yaml", "-q", "train.tensorboard=true")
    one_line_error(r, "train.tensorboard needs the tensorboard package",
                   "pip install 'gru-lm[tensorboard]'")


def test_brackets_in_errors_and_samples_are_printed_as_they_are(workdir):
    one_line_error(cli("train", "--config", "[bold]x.yaml"), "config file [bold]x.yaml does not")
    Path("br.txt").write_text("[a] [b] [/c] " * 500)
    r = cli("train", "--config", "configs/tiny.yaml", "--name", "br", "data.path=br.txt",
            "data.preset=raw", "train.max_steps=10", "train.sample_prefixes=['[a] ']")
    assert r.exit_code == 0, r.output
    assert "step 10: [a] " in r.output


@pytest.mark.slow  # (trains in a process on a pseudo-terminal)
def test_training_on_a_terminal_shows_the_bar_and_finishes(workdir):
    """On a terminal the live bar runs (and must not loop on its own output, as it did when
    rich redirected sys.stdout into the console that writes to sys.stdout)."""
    import os
    import pty
    import select
    import subprocess
    import time

    main, child = pty.openpty()
    env = {**os.environ, "COLUMNS": "150", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gru_lm", "train", "--config", "configs/tiny.yaml",
         "train.max_steps=200", "train.eval_interval=100", "train.log_interval=5",
         "train.threads=1"], stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    out, deadline = b"", time.monotonic() + 120  # the run takes a few seconds
    while time.monotonic() < deadline:
        if not select.select([main], [], [], 1.0)[0]:
            continue
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    else:
        proc.kill()
    proc.wait(timeout=30)
    os.close(main)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.decode("utf-8", "replace"))
    assert proc.returncode == 0, text[-2000:]
    assert re.search(r"step \d+/200 train ppl \d", text) and "eta" in text
    assert "done " in text and "200 steps" in text
