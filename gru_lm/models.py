"""The models by name: the registry filled by the families (scratch.py, torchnn.py) and
build_model, which checks a config against the model and the machine's memory before a
weight is allocated. A new family is one module plus its import below and its place in
FAMILIES.
"""

from __future__ import annotations

import torch

from gru_lm import mogrifier, scratch, torchnn  # (their classes register on import)
from gru_lm.config import ModelConfig
from gru_lm.errors import ConfigError
from gru_lm.recurrent import (  # noqa: F401  (the interface, for callers of gru_lm.models)
    _REGISTRY,
    LayerWeights,
    RecurrentLM,
    State,
    count_parameters,
    detach_state,
    register_model,
    state_to,
    time_major_loss,
)
from gru_lm.utils import available_memory

# The families in the order `gru-lm models` lists them (a new family: import it above and
# name it here).
FAMILIES = (scratch, torchnn, mogrifier)


def _in_family_order() -> None:
    """The registry in FAMILIES' order (a family may import another, registering it first)."""
    order = [f.__name__ for f in FAMILIES]
    ordered = sorted(_REGISTRY.items(), key=lambda kv: order.index(kv[1].__module__))
    _REGISTRY.clear()
    _REGISTRY.update(ordered)


_in_family_order()


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_class(name: str) -> type[RecurrentLM]:
    if name not in _REGISTRY:
        raise ConfigError(f"model.name: unknown model '{name}'; choose one of "
                          f"{', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_model_config(cfg: ModelConfig) -> type[RecurrentLM]:
    """The model class `cfg` names, once its keys are checked against what that model takes
    (an option of another model, a mogrifier rank past full rank): what `config show` and
    `train` both refuse."""
    cls = model_class(cfg.name)
    problems = cls.check_config(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cls


def build_model(cfg: ModelConfig, vocab_size: int) -> RecurrentLM:
    """Build the registered model named by `cfg.name` for a vocabulary of `vocab_size`."""
    cls = check_model_config(cfg)
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"a vocabulary of {vocab_size:,} tokens is out of range; "
                          f"1..{MAX_VOCAB:,} are supported")
    check_memory(cfg, cls, vocab_size)
    return cls(cfg, vocab_size)


MAX_VOCAB = 2**20


TRAINING_COPIES = 5  # weights, gradients, two Adam moments, the EMA


def check_memory(cfg: ModelConfig, cls: type[RecurrentLM], vocab_size: int) -> None:
    """Count the parameters on the meta device (no memory) and refuse a model whose training
    copies would not fit, before a single weight is allocated."""
    with torch.device("meta"):
        params = count_parameters(cls(cfg, vocab_size))
    need, have = params * 4 * TRAINING_COPIES, available_memory()  # fp32 copies
    if need > have:
        raise ConfigError(
            f"model.num_hiddens={cfg.num_hiddens} x model.num_layers={cfg.num_layers} with "
            f"{vocab_size:,} tokens makes {params:,} parameters; training needs about "
            f"{need / 2**30:,.1f} GiB but this machine has {have / 2**30:,.1f} GiB free; "
            "lower model.num_hiddens or model.num_layers")
