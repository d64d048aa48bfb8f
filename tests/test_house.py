"""Lists that must follow their source are derived from it, or checked against it here: a
new API name, evaluate option or model family cannot drift out of step unnoticed."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import typer

import gru_lm
from gru_lm import api, scorers
from gru_lm.cli import app
from gru_lm.models import list_models

PACKAGE = Path(__file__).resolve().parents[1] / "gru_lm"


def test_the_package_exports_the_api_names():
    """gru_lm/__init__.py keeps its own copy of the API's names (so that `import gru_lm` need
    not import the API): it must be api.__all__, and every name must resolve."""
    assert set(gru_lm._API) == set(api.__all__)
    assert set(api.LAZY) <= set(api.__all__)
    for name in api.__all__:
        assert getattr(gru_lm, name) is getattr(api, name)


def test_every_public_name_of_the_api_modules_is_exported():
    """A class or function added to the API (gru_lm/api.py, gru_lm/trained.py) is in
    api.__all__, or has a name starting with _."""
    for module in (api, inspect.getmodule(api.Run)):
        assert module is not None
        defined = {n for n, v in vars(module).items() if not n.startswith("_") and
                   (inspect.isclass(v) or inspect.isfunction(v)) and
                   v.__module__ == module.__name__}
        assert defined <= set(api.__all__), f"{module.__name__}: {defined - set(api.__all__)}"


def test_scorer_names_reserved_are_evaluates_own_options():
    """scorers.RESERVED keeps a scorer from taking a name evaluate already has: its options
    on the command line (both spellings) and the named arguments of gru_lm.evaluate."""
    command = typer.main.get_command(app).commands["evaluate"]  # type: ignore[attr-defined]
    methods = {m.replace("-", "_") for m in scorers.options()}  # (their flags' names)
    cli_names = {p.name for p in command.params if p.name not in methods}
    cli_flags = {o.removeprefix("--") for p in command.params if p.name not in methods
                 for o in p.opts if o.startswith("--")}
    api_names = {n for n, p in inspect.signature(api.evaluate).parameters.items()
                 if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    assert scorers.RESERVED == cli_names | cli_flags | api_names


def test_no_module_is_named_like_an_api_name():
    """A submodule gru_lm.NAME, once imported, is the package's attribute NAME: it would hide
    the API function of that name (gru_lm.gates was the gates module after `gru-lm gates`)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert not modules & set(gru_lm._API)


def _strings(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_gates_names_no_model_family():
    """Each family traces its own gates (RecurrentLM.gate_trace); gatereport.py shows
    whatever it is given, so a new family edits no line of it. (gates.py before: named so,
    the module hid gru_lm.gates, the API function, once it was imported.)"""
    source = PACKAGE / "gatereport.py"
    families = {*list_models(), "gru", "lstm", "rnn", "mogrifier"}
    assert not _strings(source) & families
    calls = {n.func.id for n in ast.walk(ast.parse(source.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"hasattr", "isinstance", "getattr"}
