"""The API's argument checks: a function's arguments checked against its annotations before
it runs, one GruLmError line for a wrong one (the CLI calls the same functions, so both share
one set of checks)."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Unpack

from pydantic import ConfigDict, TypeAdapter, ValidationError

from gru_lm.errors import GruLmError
from gru_lm.yamlconf import short


def checked(fn):
    """`fn` with its arguments checked against its annotations before it runs (pydantic,
    strict: "5" is not an int, 2.5 is not an int, b"x" is not a str): a wrong one is one
    GruLmError line naming the function, the argument and what it takes, as the CLI's
    errors are. The values are passed on as given. The CLI calls these functions, so both
    share one set of checks."""
    sig = inspect.signature(fn)
    where = fn.__qualname__
    adapters: dict[str, Any] = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not adapters:
            adapters.update(_adapters(fn, sig))
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise GruLmError(f"gru_lm.{where}: {e}; see help(gru_lm.{where})") from None
        for name, value in bound.arguments.items():
            if name not in adapters:
                continue
            kind = sig.parameters[name].kind
            named = (((name, v) for v in value) if kind is inspect.Parameter.VAR_POSITIONAL
                     else value.items() if kind is inspect.Parameter.VAR_KEYWORD
                     else [(name, value)])
            for key, v in named:
                adapter = adapters[name]
                wanted = sig.parameters[name].annotation
                if isinstance(adapter, dict):  # **options: Unpack[a TypedDict]
                    if key not in adapter:
                        raise GruLmError(f"gru_lm.{where}: no argument {key}=; it takes "
                                         f"{', '.join(adapter)}; see help(gru_lm.{where})")
                    adapter, wanted = adapter[key]
                try:
                    adapter.validate_python(v, strict=True)
                except ValidationError:
                    raise GruLmError(
                        f"gru_lm.{where}: {key}={short(v, 40)} is {_a(type(v).__name__)}, not "
                        f"{wanted}; see help(gru_lm.{where})"
                    ) from None
        return fn(*args, **kwargs)

    return wrapper


def _adapters(fn, sig) -> dict[str, Any]:
    """A pydantic TypeAdapter for each annotated argument of `fn` (its annotations are text:
    this module has `from __future__ import annotations`); for **options: Unpack[a
    TypedDict], {key: (adapter, its type's name)} of the TypedDict's keys."""
    config = ConfigDict(arbitrary_types_allowed=True)
    out: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if p.annotation is p.empty or name in ("self", "decoding"):  # (decoding_of checks it)
            continue
        hint = eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str) \
            else p.annotation  # (annotations of this module's own signatures only)
        if typing.get_origin(hint) is Unpack:
            (typed,) = typing.get_args(hint)
            out[name] = {key: (TypeAdapter(t, config=config), _type_name(t))
                         for key, t in typing.get_type_hints(typed).items()}
        else:
            out[name] = TypeAdapter(hint, config=config)
    return out


def _type_name(t: Any) -> str:
    """`float | None`, `bool`: a type as it is written."""
    return t.__name__ if isinstance(t, type) else str(t)


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"
