"""The command groups `gru-lm data` (download, import, info) and `gru-lm config` (list,
show)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gru_lm.cliargs import ConfigOpt, OfflineOpt, Overrides, in_range, offline_flag
from gru_lm.terminal import console, example, handle_errors
from gru_lm.views import show_corpus, show_recipes

data_app = typer.Typer(help="Download and inspect corpora.", no_args_is_help=True)
config_app = typer.Typer(help="List the shipped recipes; show configuration keys and values.",
                         no_args_is_help=True)


# ---------------------------------------------------------------- data


@data_app.command("download", epilog=example(
    "gru-lm data download", "GRU_LM_DATA_DIR=/mnt/corpora gru-lm data download --offline"))
@handle_errors
def data_download(
    dataset: Annotated[str, typer.Option(
        help="Registered dataset name: timemachine, text8, enwik8, or chinese-poetry's tang, "
        "songci, tang300, lunyu.")] = "timemachine",
    cache_dir: Annotated[Path, typer.Option(help="Download cache folder.")] = Path("data"),
    offline: OfflineOpt = False,
) -> None:
    """Download a dataset into the cache (verified by SHA-1, or SHA-256 file by file)."""
    from gru_lm.download import fetch, find_local, get_dataset

    spec = get_dataset(dataset)
    found = find_local(spec, cache_dir)
    if found is not None:
        console.print(f"{dataset}: {found[0]} (found in {found[1]}, {spec.digest_name} "
                      "verified; nothing downloaded)", highlight=False)
        return
    path = fetch(spec, cache_dir, offline=offline_flag(offline))
    console.print(f"{dataset}: downloaded to {path} ({spec.digest_name} verified)",
                  highlight=False)


@data_app.command("import", epilog=example(
    "npm pack chinese-poetry@2.0.1 && gru-lm data import chinese-poetry-2.0.1.tgz",
    "gru-lm data import chinese-poetry-2.0.1.tgz --cache-dir /mnt/corpora/cache"))
@handle_errors
def data_import(
    archive: Annotated[str, typer.Argument(
        help="npm pack chinese-poetry@2.0.1's .tgz (or another tar, a zip or a folder holding "
        "the files).", show_default=False)],
    cache_dir: Annotated[Path, typer.Option(help="Download cache folder.")] = Path("data"),
) -> None:
    """Import chinese-poetry's files from an archive, for machines that cannot reach GitHub.

    Every file is recognised by its pinned SHA-256 and put where a download would put it; a
    damaged archive imports nothing."""
    from gru_lm.api import import_corpus

    done = import_corpus(archive, cache_dir)
    ready = ", ".join(done.complete) or "none"
    console.print(f"{archive}: {done.files} of the {done.total} pinned files (SHA-256 verified) "
                  f"now in {done.folder}/; corpora ready offline: {ready}"
                  + (f"; still missing files: {', '.join(done.incomplete)}"
                     if done.incomplete else ""), highlight=False)


@data_app.command("info", epilog=example(
    "gru-lm data info", "gru-lm data info --config configs/gru.yaml data.path=my.txt "
    "data.preset=raw"))
@handle_errors
def data_info(config: ConfigOpt = None, overrides: Overrides = None,
              offline: OfflineOpt = False,
              top: Annotated[int, typer.Option(help="How many frequent tokens to show.")] = 8,
              ) -> None:
    """Show corpus statistics: characters, tokens, vocabulary, splits."""

    from gru_lm.api import corpus_info

    in_range("--top", top, 1, 1000)
    info = corpus_info(config, *(overrides or []), offline=offline_flag(offline))
    show_corpus(info, top)


# ---------------------------------------------------------------- config


@config_app.command("list", epilog=example("gru-lm config list",
                                           "gru-lm train --config tang"))
@handle_errors
def config_list() -> None:
    """List the recipes that ship with gru-lm (train one with --config NAME)."""
    from gru_lm.api import list_recipes

    show_recipes(list_recipes())


@config_app.command("show", epilog=example(
    "gru-lm config show", "gru-lm config show --config configs/gru.yaml train.lr=0.005"))
@handle_errors
def config_show(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Print the resolved config as YAML, with what each key means.

    Defaults, then the file (its `base:` first), then the overrides; a value that differs
    from the default shows the default and where it was set. The output is a valid config
    file."""
    from gru_lm.api import config_sources, resolve_config
    from gru_lm.config import described_yaml

    cfg = resolve_config(config, *(overrides or []))
    sources = config_sources(config, *(overrides or []))
    console.print(f"# resolved from {config or 'the defaults'}"
                  f"{' + ' + ' '.join(overrides) if overrides else ''}", highlight=False,
                  markup=False)
    console.print(described_yaml(cfg, sources), highlight=False, markup=False, end="")
