"""Config files as plain data: YAML read safely (a key stated twice, size and alias bombs,
syntax errors at file:line:column), `base:` chains resolved, and `key.sub=value` overrides
applied; gru_lm/config.py validates the result."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import yaml

from gru_lm.errors import ConfigError
from gru_lm.utils import flatten, missing_reason

MAX_NODES = 100_000  # YAML nodes after expanding aliases
ECHO = 80  # characters of user input quoted in an error
MAX_CONFIG_BYTES = 1 << 20
# The recipes that ship inside the package (a clone's configs/ is a link to this folder), so
# `--config tang` works wherever gru-lm is installed.
RECIPES_DIR = Path(__file__).resolve().parent / "configs"


def recipes() -> dict[str, Path]:
    """The shipped recipes by name (the file name without .yaml), in name order."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """A recipe in one line: the first line of its file, a comment (tests hold every shipped
    recipe to one sentence there)."""
    first = Path(path).read_text(encoding="utf-8").partition("\n")[0]
    return first.lstrip("#").strip() if first.startswith("#") else ""


def locate_config(config: str | Path) -> Path:
    """The file a --config value names: a path that exists wins; otherwise a bare name (with
    or without .yaml) of a shipped recipe; otherwise the path, for read_yaml to say what is
    missing."""
    path = Path(config)
    if path.exists() or path.is_symlink() or path.parent != Path("."):
        return path
    return recipes().get(path.name.removesuffix(".yaml"), path)


def _missing_config(path: Path) -> str:
    """What to do about a --config that names no file: the shipped recipes by name."""
    names = recipes()
    same = path.name.removesuffix(".yaml")
    if same in names:  # e.g. configs/gru.yaml outside a clone
        return f"the shipped recipe of that name is --config {same}"
    return (f"pass an existing YAML file or a shipped recipe's name ({', '.join(names)}; "
            "gru-lm config list says what each is)")


def short(value: Any, limit: int = ECHO) -> str:
    """repr() of user input, cut to `limit` characters so an error stays one readable line."""
    text = repr(value[:limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def problem_text(source: str, problems: list[str]) -> str:
    """One line for one problem; a list for several."""
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def check_size(raw: Any, source: str) -> None:
    """Refuse YAML whose aliases expand to more than MAX_NODES nodes ("billion laughs"),
    counted without expanding: each shared node's size is computed once."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        if id(node) not in sizes:
            sizes[id(node)] = MAX_NODES + 1  # a node that contains itself counts as too big
            items = list(node.items()) if isinstance(node, dict) else node
            total = 1
            for item in items:
                total += size(item[1]) if isinstance(node, dict) else size(item)
                if total > MAX_NODES:
                    break
            sizes[id(node)] = total
        return sizes[id(node)]

    if size(raw) > MAX_NODES:
        raise ConfigError(f"{source}: the YAML expands to more than {MAX_NODES:,} values "
                          "(aliases of aliases?); a config is a few dozen keys, write it out")


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping states a key twice (`key` names it, `first` the line of the first)."""

    fix = "the second would silently replace the first: state it once"

    def __init__(self, key: Any, first: int, mark: yaml.Mark):
        self.key, self.first = key, first
        super().__init__(None, None, f"{self.what} (first on line {first}); {self.fix}", mark)

    @property
    def what(self) -> str:
        return f"key {short(self.key, 40)} is given twice"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that states a key twice: the plain loader
    keeps the last silently, and the first section's values would be lost without a word."""

    MERGE = "tag:yaml.org,2002:merge"

    def construct_mapping(self, node, deep=False):
        # Only the mapping's own keys are checked, by value, wherever they stand (two on one
        # line in a flow mapping count too); the keys a merge (`<<: *defaults`) brings in may
        # be replaced by the mapping's own, as YAML means them to be.
        seen: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == self.MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the plain loader says what is wrong
                    continue
                if first is not None:
                    raise DuplicateKey(key, first, key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            self.flatten_mapping(node)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML text as Python data (safe types only), refusing a key stated twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with file:line:column on syntax errors."""
    path = Path(path)
    if not path.exists():
        shown = str(path) if str(path).isprintable() else repr(str(path))  # (one line)
        raise ConfigError(f"config file {shown} {missing_reason(path)}; {_missing_config(path)}")
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory; pass a YAML file inside it")
    try:
        with open(path, "rb") as f:  # a device or a pipe (<(cmd)) is read up to the limit
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES:,} bytes; a config "
                              "is a few dozen keys (see configs/gru.yaml)")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        raw = load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = "" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error: "
        raise ConfigError(f"{where}: {what}{exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a number past 4,300 digits, deep nesting
        raise ConfigError(f"{path}: not a usable config ({type(exc).__name__}: "
                          f"{str(exc)[:100] or 'nested too deep'}); a config is a few dozen "
                          "keys (see configs/gru.yaml)") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty; start from configs/tiny.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections (data:, "
                          f"model:, ...: see configs/gru.yaml); got {type(raw).__name__}")
    # Top-level keys that start with x- hold YAML anchors for merge keys (`<<: *name`), as in
    # Docker Compose files: they are read, and set nothing themselves.
    return {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a copy of `raw`."""
    out = copy.deepcopy(raw)
    problems = []
    named: dict[str, Any] = {}  # dotted key -> value, of every override
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            problems.append(f"{short(item)}: an override has the form key.sub=value, "
                            "e.g. train.lr=0.5")
            continue
        if key.split(".")[0] == "base":
            problems.append(f"{short(item)}: base: names the file a config file builds on, "
                            "so only a config file may give it (write `base: FILE` at its "
                            "top); an override sets a key, e.g. train.lr=0.5")
            continue
        if key.count(".") >= MAX_KEY_PARTS:
            problems.append(f"{short(key)}: a config key is section.key (e.g. train.lr); this "
                            f"one has {key.count('.') + 1:,} dotted parts")
            continue
        try:
            parsed = load_yaml(value) if value.strip() else None
        except DuplicateKey as e:  # (said as a file says it, less the line: an override has one)
            problems.append(f"{short(item)}: {e.what}; {e.fix}")
            continue
        except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: 4,300+ digits
            parsed = value
        if isinstance(parsed, float) and not math.isfinite(parsed):
            problems.append(f"{key[:ECHO]}: {short(value)} is not a finite number")
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"{key[:ECHO]}: {short(part)} is a value, not a section")
                break
            node = child
        else:
            _merge_into(node, parts[-1], parsed)
            named.update(flatten({key: parsed}))
    if problems:
        raise ConfigError(problem_text("bad override", problems))
    keep_one_choice(out, named)
    check_size(out, "overrides")
    return out


def _merge_into(node: dict[str, Any], key: str, value: Any) -> None:
    """node[key] = value, except that a mapping given for a section (train={lr: 0.5}) merges
    into the section's keys rather than replacing them all with their defaults."""
    old = node.get(key)
    if isinstance(value, dict) and isinstance(old, dict):
        for k, v in value.items():
            _merge_into(old, k, v)
    else:
        node[key] = value


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted keys a list of overrides sets: `train.lr=0.5` sets train.lr, and
    `train={lr: 0.5, max_steps: 5}` sets train.lr and train.max_steps; naming one of a
    choice (CHOICES: data.path=my.txt) sets the others too (data.dataset is no longer read)."""
    named: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            parsed = load_yaml(value) if value.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError):
            parsed = None
        named.update(flatten({key.strip(): parsed}))
    replaced = {section: {k: None for group in groups for k in group}
                for section, groups in CHOICES.items()}
    return [*named, *(k for k in keep_one_choice(replaced, named) if k not in named)]


MAX_BASES = 16  # how deep `base:` may chain
# Keys that make one choice between them, by section: the corpus is a dataset, a file or a
# download (with its SHA-1). A layer (a file over its `base:`, overrides over the file) that
# names one replaces what the layers below named, so `--config tiny data.path=my.txt` reads
# my.txt; one layer that names two is refused (DataConfig).
CHOICES: dict[str, tuple[tuple[str, ...], ...]] = {
    "data": (("dataset",), ("path",), ("url", "sha1"))}


def keep_one_choice(lower: dict[str, Any], upper: dict[str, Any]) -> list[str]:
    """Drop from `lower` (a config as nested dicts) the keys of each choice (CHOICES) that
    `upper` ({dotted key: value}, the layer above) did not name when it names another
    alternative (a value other than null); the dotted keys dropped."""
    dropped = []
    for section, groups in CHOICES.items():
        values = lower.get(section)
        named = [g for g in groups if any(upper.get(f"{section}.{k}") is not None for k in g)]
        if not named or not isinstance(values, dict):
            continue
        for group in groups:
            for k in group:
                if group not in named and f"{section}.{k}" not in upper and k in values:
                    del values[k]
                    dropped.append(f"{section}.{k}")
    return dropped
MAX_KEY_PARTS = 8  # dotted parts of an override's key (every key is section.key)


def resolve_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict]:
    """A config file with its `base:` resolved: the base file's keys (a path relative to this
    file's folder, itself resolved the same way), then this file's on top. Returns the merged
    dict and, per dotted key, the file it came from. Cycles, missing files and a `base:`
    that is not a path are refused in one line. `path` may name a shipped recipe."""
    path = Path(path) if _seen else locate_config(path)
    raw = read_yaml(path)
    base = raw.pop("base", None)
    here = {f"{section}.{key}": str(path) for section, values in raw.items()
            if isinstance(values, dict) for key in values}
    if base is None:
        return raw, here
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: must be the path of another config file, e.g. "
                          "base: recipe.yaml; got " + short(base))
    target = Path(os.path.normpath(path.parent / base))  # (resolved only to find cycles)
    if not target.exists():  # (a symbolic-link loop too: named alike on every Python)
        raise ConfigError(f"{path}: base: {base} {missing_reason(target)} (looked for "
                          f"{target}); give the path of a YAML config file, relative to this "
                          "file's folder")
    try:
        chain, resolved = (*_seen, path.resolve()), target.resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 says "Symlink loop" as RuntimeError
        raise ConfigError(f"{path}: base: {base} cannot be followed ({e}); point it at a "
                          "config file, not a symbolic link that leads back to itself") from None
    if resolved in chain:
        cycle = " -> ".join(str(p.name) for p in (*chain, target))
        raise ConfigError(f"{path}: base: {base} makes a cycle ({cycle}); a base must not "
                          "lead back to the file")
    if len(chain) > MAX_BASES:
        raise ConfigError(f"{path}: base: chains more than {MAX_BASES} files; flatten them")
    if not target.is_file():
        what = "is a folder" if target.is_dir() else "is not a regular file (a pipe or a device)"
        raise ConfigError(f"{path}: base: {base} {what} (looked for {resolved}); give the "
                          "path of a YAML config file, relative to this file's folder")
    merged, sources = resolve_yaml(target, chain)
    for key in keep_one_choice(merged, flatten(raw)):
        sources.pop(key, None)
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged, {**sources, **here}
