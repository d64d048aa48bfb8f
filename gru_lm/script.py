"""Chinese script conversion (data.script): a text read in simplified or traditional
characters, through OpenCC's phrase-level dictionaries (t2s, s2t), so 全唐诗, printed in
traditional characters, trains a model that reads and writes the characters a reader types."""

from __future__ import annotations

import functools

from gru_lm.errors import DataError

SCRIPTS = ("as-is", "simplified", "traditional")
_CONFIGS = {"simplified": "t2s", "traditional": "s2t"}
OTHER = {"simplified": "traditional", "traditional": "simplified"}


@functools.cache
def _converter(script: str):
    try:
        import opencc
    except ImportError:  # (a dependency of gru-lm: an environment installed without it)
        raise DataError(f"data.script={script} needs OpenCC: pip install opencc") from None
    return opencc.OpenCC(_CONFIGS[script])


def convert(text: str, script: str) -> str:
    """`text` in `script` (as-is: unchanged)."""
    if script == "as-is":
        return text
    if script not in _CONFIGS:
        raise DataError(f"unknown script '{script}'; choose one of {', '.join(SCRIPTS)}")
    return _converter(script).convert(text)


def covering_script(missing: list[str], known: set[str] | dict[str, int],
                    share: float = 1.0) -> tuple[str, str]:
    """The script in which the characters of `missing` (at least `share` of them; all by
    default) become ones `known` has, and those characters (("", "") when neither script
    does): what a prefix written in the other script should have been."""
    for script in ("traditional", "simplified"):
        converted = [convert(c, script) for c in missing]
        covered = sum(c != m and all(ch in known for ch in c)
                      for c, m in zip(converted, missing, strict=True))
        if missing and covered >= share * len(missing):
            return script, "".join(converted)
    return "", ""
