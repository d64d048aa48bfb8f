"""Configs: every shipped YAML loads; errors name every bad key at once."""

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gru_lm.config import load_config, validate
from gru_lm.errors import ConfigError, GruLmError
from gru_lm.models import build_model
from gru_lm.yamlconf import apply_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path):
    cfg = load_config(path)
    build_model(cfg.model, 28)


def test_expected_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"gru.yaml", "lstm.yaml", "gru-scratch.yaml", "tiny.yaml", "d2l-gru-scratch.yaml",
            "d2l-gru.yaml", "d2l-lstm.yaml"} <= names


def test_overrides_go_through_validation():
    cfg = load_config(None, ["train.lr=0.5", "model.num_hiddens=512", "train.max_steps=3",
                             "train.sample_prefixes=[a, b]"])
    assert cfg.train.lr == 0.5 and cfg.model.num_hiddens == 512
    assert cfg.train.sample_prefixes == ["a", "b"]


def test_all_problems_reported_at_once_with_dotted_keys():
    with pytest.raises(ConfigError) as info:
        validate({"train": {"lr": 0, "num_steps": 0, "optimzer": "sgd", "max_steps": 1},
                  "model": {"dropout": 2}, "data": {"val_fraction": 0.6,
                                                    "test_fraction": 0.5}})
    msg = str(info.value)
    for part in ("train.lr: 0 is invalid", "train.num_steps: 0 is invalid",
                 "train.optimzer: unknown key; did you mean 'train.optimizer'?",
                 "model.dropout: 2", "must be <= 1"):
        assert part in msg, msg
    assert "5 problems:" in msg


def test_unknown_choice_names_the_allowed_values():
    with pytest.raises(ConfigError, match="train.optimizer: 'lion' is invalid.*'sgd'"):
        validate({"train": {"optimizer": "lion", "epochs": 1}})


def test_unknown_section_suggests_a_near_miss():
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        validate({"trian": {}})


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [1, 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: YAML syntax error"):
        load_config(p)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("dir", "is a directory"),
    ("", "is empty"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_bad_config_paths(tmp_path, content, message):
    p = tmp_path / "c.yaml"
    if content == "dir":
        p.mkdir()
    elif content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_stop_condition_required():
    with pytest.raises(ConfigError, match="set at least one of epochs, max_steps"):
        validate({"train": {"lr": 1}})


@given(st.lists(st.text(max_size=30), max_size=4))
def test_override_parsing_raises_only_config_errors(items):
    try:
        validate(apply_overrides({}, items))
    except GruLmError:
        pass


# ---------------------------------------------------------------- base: one recipe, written once


def test_base_is_resolved_below_the_file_and_its_overrides(tmp_path):
    (tmp_path / "recipe.yaml").write_text(
        "model: {num_hiddens: 64, dropout: 0.2}\ntrain: {lr: 0.01, max_steps: 7}\n")
    (tmp_path / "mid.yaml").write_text("base: recipe.yaml\ntrain: {lr: 0.02}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.yaml").write_text("base: ../mid.yaml\nmodel: {name: lstm}\n")
    cfg = load_config(tmp_path / "sub" / "top.yaml", ["train.max_steps=9"])
    assert (cfg.model.name, cfg.model.num_hiddens, cfg.model.dropout) == ("lstm", 64, 0.2)
    assert (cfg.train.lr, cfg.train.max_steps) == (0.02, 9)


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "makes a cycle (a.yaml -> "
     "b.yaml -> a.yaml)"),
    ({"a.yaml": "base: a.yaml\n"}, "makes a cycle"),
    ({"a.yaml": "base: nothing.yaml\n"}, "nothing.yaml does not exist"),
    ({"a.yaml": "base: [1, 2]\n"}, "base: must be the path of another config file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "train: {lrr: 1}\n"}, "train.lrr: unknown key"),
])
def test_bad_bases_are_one_line_errors(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(tmp_path / "a.yaml")


def test_a_base_that_is_a_symlink_loop_a_folder_or_a_pipe_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: loop.yaml\n")
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="base: loop.yaml is a symbolic link that leads back "
                       "to itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a.yaml").write_text("base: folder\n")
    with pytest.raises(ConfigError, match="base: folder is a folder"):
        load_config(tmp_path / "a.yaml")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "a.yaml").write_text("base: fifo\n")
    with pytest.raises(ConfigError, match=r"base: fifo is not a regular file \(a pipe"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("text, line, key", [
    ("train: {lr: 0.1}\nmodel: {name: lstm}\ntrain: {max_steps: 5}\n", 3, "'train'"),
    ("base: a.yaml\nbase: b.yaml\n", 2, "'base'"),
    ("train:\n  lr: 0.1\n  lr: 0.2\n", 3, "'lr'"),
    # on one line, in a flow mapping: the key, not its line, is what counts
    ("train: {lr: 0.5, lr: 0.02}\n", 1, "'lr'"),
    ("{base: a.yaml, base: b.yaml}\n", 1, "'base'"),
])
def test_a_key_stated_twice_is_refused_with_its_line(tmp_path, text, line, key):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'c.yaml'}:{line}:")
    assert f"key {key} is given twice (first on line" in str(e.value)
    assert "\n" not in str(e.value)


def test_merge_keys_bring_an_anchor_s_keys_and_the_mapping_s_own_win(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "x-small: &small {num_hiddens: 16, num_layers: 2}\n"
        "x-short: &short\n  max_steps: 5\n  lr: 0.02\n"
        "model:\n  <<: *small\n  name: lstm\n  num_hiddens: 24\n"
        "train:\n  <<: *short\n  lr: 0.05\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.model.name, cfg.model.num_hiddens, cfg.model.num_layers) == ("lstm", 24, 2)
    assert (cfg.train.max_steps, cfg.train.lr) == (5, 0.05)
    # the mapping's own keys are still checked for duplicates
    (tmp_path / "c.yaml").write_text("x-d: &d {lr: 1}\ntrain: {<<: *d, max_steps: 5, "
                                     "max_steps: 6}\n")
    with pytest.raises(ConfigError, match="key 'max_steps' is given twice"):
        load_config(tmp_path / "c.yaml")


def test_a_section_given_as_a_mapping_merges_into_the_file_s_section(tmp_path):
    from gru_lm.api import config_sources

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["train={lr: 0.5, max_steps: 5}"])
    assert (cfg.train.lr, cfg.train.max_steps) == (0.5, 5)
    assert (cfg.train.batch_size, cfg.train.num_steps) == (8, 16)  # the file's, kept
    sources = config_sources(tiny, "train={lr: 0.5, max_steps: 5}")
    assert sources["train.lr"] == sources["train.max_steps"] == "override"
    assert sources["train.batch_size"] == str(tiny)


def test_an_override_s_problem_is_called_an_override_s(tmp_path):
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"tiny.yaml: override train.lr: -1 is invalid"):
        load_config(tiny, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"override model.foo: unknown key"):
        load_config(tiny, ["model={foo: 1}"])
    with pytest.raises(ConfigError, match=r"'base=x.yaml': base: names the file a config "
                       "file builds on, so only a config file may give it"):
        load_config(tiny, ["base=x.yaml"])


def test_a_key_given_twice_in_an_override_is_said_as_a_file_says_it():
    for item, key in (("train={lr: 0.5, lr: 0.2}", "'lr'"),
                      ("model={num_layers: 2, name: lstm, num_layers: 3}", "'num_layers'")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [item])
        assert str(e.value) == (f"bad override: {item!r}: key {key} is given twice; the second "
                                "would silently replace the first: state it once")


def test_a_bad_part_of_an_override_s_value_is_called_the_override_s():
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(tiny, ["model.softmax=adaptive", "model.cutoffs=[5.5]"])
    assert str(e.value) == (f"{tiny}: override model.cutoffs.0: 5.5 is invalid: Input should "
                            "be a valid integer")
    with pytest.raises(ConfigError, match=r"override model.cutoffs.1: 'x' is invalid"):
        load_config(tiny, ["model={softmax: adaptive, cutoffs: [5, x]}"])
    # (the file's own problem stays the file's)
    with pytest.raises(ConfigError, match=r"^tiny.yaml: train.lr: -1 is invalid"):
        validate(apply_overrides({"train": {"lr": -1, "max_steps": 1}}, ["model.cutoffs=null"]),
                 source="tiny.yaml", overrides=["model.cutoffs=null"])


# ---------------------------------------------------------------- one corpus


def test_a_layer_that_names_two_corpora_is_refused_in_one_line(tmp_path):
    (tmp_path / "both.yaml").write_text("data:\n  dataset: timemachine\n  path: my.txt\n"
                                        "train:\n  max_steps: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "both.yaml")
    assert str(e.value) == (
        f"{tmp_path / 'both.yaml'}: data: dataset 'timemachine' and path 'my.txt' both name the "
        "corpus, and one is read: keep one, e.g. data.dataset=null to read the file "
        "(data.path=null reads the dataset)")
    download = ["data.url=https://x/b.txt", f"data.sha1={'a' * 40}"]
    for overrides, named in ((["data.dataset=tang", "data.path=my.txt"], "dataset 'tang' and "
                              "path 'my.txt' both"),
                             (["data.path=a.txt", *download],
                              "path 'a.txt' and url 'https://x/b.txt' both")):
        with pytest.raises(ConfigError, match=f"config: data: {named} name the corpus"):
            load_config(None, overrides)
    with pytest.raises(ConfigError, match="data.dataset=null to read the file"):
        validate({"data": {"dataset": "tang", "path": "p.txt"}})


def test_a_file_or_download_named_above_replaces_the_dataset_below(tmp_path):
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    # the defaults, a file, a file over its base, a saved config: a path named above reads it
    assert load_config(None, ["data.path=my.txt"]).data.dataset is None
    cfg = load_config(tiny, ["data.path=my.txt"])
    assert (cfg.data.dataset, cfg.data.path, cfg.data.max_tokens) == (None, Path("my.txt"), 5000)
    (tmp_path / "child.yaml").write_text(f"base: {tiny}\ndata:\n  path: my.txt\n")
    assert load_config(tmp_path / "child.yaml").data.dataset is None
    saved = load_config(tiny).to_dict()
    assert validate(apply_overrides(saved, ["data={path: my.txt}"])).data.dataset is None
    download = ["data.url=https://x/b.txt", f"data.sha1={'a' * 40}"]
    url = load_config(tmp_path / "child.yaml", download)
    assert (url.data.dataset, url.data.path, url.data.url) == (None, None, "https://x/b.txt")
    # a dataset named above replaces a file below; a null names nothing
    assert load_config(tmp_path / "child.yaml", ["data.dataset=tang"]).data.path is None
    assert load_config(tmp_path / "child.yaml", ["data.dataset=null"]).data.path == Path("my.txt")
    assert load_config(None).data.dataset == "timemachine"
    from gru_lm.api import config_sources

    assert config_sources(tiny, "data.path=my.txt")["data.dataset"] == "override"


def test_a_run_written_before_two_corpora_were_refused_reads_its_file(tmp_path):
    # (`--config configs/tiny.yaml data.path=my.txt` wrote the default dataset beside the
    # file it read; such a run's config.yaml, checkpoint and export still load, as the file)
    from gru_lm.rundir import RunDir

    old = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").to_dict()
    old["data"].update(dataset="timemachine", path="my.txt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = RunDir(tmp_path).read_config()
    assert (cfg.data.dataset, cfg.data.path) == (None, Path("my.txt"))
    old["data"].update(path=None, url="https://x/b.txt", sha1="a" * 40)
    assert validate(old).data.dataset is None
    del old["data"]["cache_dir"]  # (written by a person, not out whole: refused)
    with pytest.raises(ConfigError, match="both name the corpus"):
        validate(old)


def test_every_documented_data_path_command_loads():
    """The docs' and README's `data.path=...` examples read the file they name."""
    root = Path(__file__).resolve().parents[1]
    found = 0
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            words = line.removeprefix("$ ").split()
            if line.startswith("$ gru-lm") and any(w.startswith("data.path=") for w in words):
                config = words[words.index("--config") + 1] if "--config" in words else None
                if config is not None and not (root / config).exists():
                    continue  # (a file of the reader's, e.g. my.yaml)
                overrides = [w.strip("'") for w in words if w.startswith(("data.", "'data."))]
                cfg = load_config(None if config is None else root / config, overrides)
                assert cfg.data.path is not None and cfg.data.dataset is None, line
                found += 1
    assert found


def test_an_override_with_thousands_of_dotted_parts_is_one_line():
    with pytest.raises(ConfigError, match="a config key is section.key"):
        load_config(None, ["train" + ".x" * 5000 + "=1"])


def test_the_held_out_configs_state_only_what_differs():
    root = Path(__file__).resolve().parents[1] / "configs"
    recipe = load_config(root / "recipe.yaml").to_dict()
    for name in ("gru", "lstm", "gru-scratch"):
        text = (root / f"{name}.yaml").read_text()
        lines = [x for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]
        assert lines == ["base: recipe.yaml", "model:", f"  name: {name}"], name
        cfg = load_config(root / f"{name}.yaml").to_dict()
        cfg["model"]["name"] = recipe["model"]["name"]
        assert cfg == recipe


def test_config_show_says_where_each_value_came_from(workdir):
    from conftest import cli

    r = cli("config", "show", "--config", "configs/lstm.yaml", "train.lr=0.005")
    assert r.exit_code == 0, r.output
    lines, section = {}, ""
    for line in r.stdout.splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.rstrip(":")
        elif line.startswith("  "):
            lines[f"{section}.{line.split(':')[0].strip()}"] = line
    assert "from configs/lstm.yaml" in lines["model.name"]
    assert "from configs/recipe.yaml" in lines["model.num_hiddens"]
    assert "from override" in lines["train.lr"]
    assert "from" not in lines["train.momentum"]  # at its default
