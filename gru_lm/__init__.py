"""gru-lm: character-level recurrent language models, trained and compared honestly.

The Python API (gru_lm/api.py), importable from here without loading torch until it is used:

    import gru_lm
    run = gru_lm.train("configs/tiny.yaml")     # a live perplexity figure in Jupyter
    print(run.predict("time traveller"))
    run.evaluate("test")                         # a table in a notebook
"""

import os

# Idle OpenMP threads sleep instead of spinning (unless the user chose): two trainings on
# shared cores then each keep most of their speed instead of a few percent (measured in
# benchmarks/concurrency.py). Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# api.__all__, copied so that `import gru_lm` (and `gru-lm --help`) need not import the API;
# tests/test_house.py checks that the two agree.
_API = ("Comparison", "Continuations", "CorpusInfo", "Decoding", "Evaluation", "Exported",
        "Gates", "Imported", "ModelInfo", "RecipeInfo", "Run", "RunInfo", "compare",
        "config_sources", "continue_text", "corpus_info", "evaluate", "export", "gates",
        "import_corpus", "list_models", "list_recipes", "load", "plot", "resolve_config",
        "runs", "train")
__all__ = ["GruLmError", "__version__", *_API]


def __getattr__(name: str):
    """gru_lm.train and the rest, imported on first use (PEP 562): `import gru_lm` and
    `gru-lm --help` stay fast."""
    if name in _API:
        from gru_lm import api

        return getattr(api, name)
    if name == "GruLmError":
        from gru_lm.errors import GruLmError

        return GruLmError
    raise AttributeError(f"module 'gru_lm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
