"""Typed run configuration: the sections and their keys (ranges, marks read by code), a YAML
file with `key.sub=value` overrides (gru_lm/yamlconf.py) validated once by pydantic, and the
resolved config written back as described YAML."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from gru_lm.errors import ConfigError
from gru_lm.utils import atomic_write_text
from gru_lm.yamlconf import (
    ECHO,
    apply_overrides,
    check_size,
    override_keys,
    problem_text,
    resolve_yaml,
    short,
)

# Every number has a range: floats are finite (pydantic refuses inf/nan), counts fit a 64-bit
# integer, and sizes stop where a run could no longer start (memory is checked by the models).
BIG = 10**12  # steps, epochs, intervals: far beyond any run, far below int64
MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
# The temperature of every sample unless told otherwise (predict, the API, the server, the
# trainer's and compare's samples: gru_lm/decoding.py). Measured on configs/lstm.yaml's best
# checkpoint, 20 samples of 300 characters after "time traveller": greedy repeats itself (95%
# of its 20-character windows are repeats); at 0.6 98.3% of the words are the book's and 1.4%
# of the windows repeat; at 1.0 only 82% are words.
DEFAULT_TEMPERATURE = 0.6
MAX_HIDDENS = 16384
MAX_NGRAM_ORDER = 8  # the Kneser-Ney model counts contexts of up to 7 tokens


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


_WRITTEN_OUT = frozenset({"dataset", "path", "url", "sha1", "cache_dir"})  # (in every dump)


class DataConfig(_Section):
    dataset: str | None = Field("timemachine", description="registered dataset name (the "
                                "default one only when neither path nor url is given)")
    path: Path | None = Field(None, description="a local UTF-8 text file instead of a dataset")
    url: str | None = Field(None, description="download URL of a custom corpus (needs sha1)")
    sha1: str | None = Field(None, description="SHA-1 of the file behind `url`")
    cache_dir: Path = Field(Path("data"), description="where downloads are cached")
    preset: Literal["d2l", "raw", "bytes"] = Field(
        "d2l", description="preprocessing preset: d2l (letters and spaces, lowercase), raw "
        "(every character), bytes (the UTF-8 bytes: one vocabulary for every text)")
    lowercase: bool = Field(False, description="lowercase the text (raw preset)")
    script: Literal["as-is", "simplified", "traditional"] = Field(
        "as-is", description="Chinese text in simplified or traditional characters, converted "
        "by OpenCC (raw and bytes presets): the corpus, evaluate --text and every prefix")
    min_freq: int = Field(0, ge=0, le=BIG, description="tokens rarer than this map to <unk>")
    reserved_tokens: list[str] = Field(default_factory=list, max_length=1000,
                                       description="extra special tokens")
    max_tokens: int | None = Field(None, ge=2, le=2**62, description="keep only the first N tokens")
    train_fraction: float = Field(0.9, gt=0, le=1, description="share of tokens for training")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share for validation")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="share for the test split")

    @property
    def text_name(self) -> str:
        """The corpus as a person names it: the dataset, or the file or URL given instead."""
        return self.dataset or "" if self.path is None and self.url is None \
            else str(self.path or self.url)

    @model_validator(mode="before")
    @classmethod
    def _one_corpus_named(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # (the default dataset is what is read when no corpus is named; a file or a URL
        # given without a dataset is not "both")
        if "dataset" not in data and (data.get("path") is not None or data.get("url") is not None):
            return {**data, "dataset": None}
        # A config written out whole (a run's config.yaml, a checkpoint's, an export's: every
        # key) before two corpora were refused may hold the default dataset beside the file
        # or URL it read: it is read as it was then (a file first, then a URL).
        if _WRITTEN_OUT <= data.keys() and data.get("path") is not None:
            return {**data, "dataset": None, "url": None, "sha1": None}
        if _WRITTEN_OUT <= data.keys() and data.get("url") is not None:
            return {**data, "dataset": None}
        return data

    @field_validator("reserved_tokens")
    @classmethod
    def _tokens(cls, v: list[str]) -> list[str]:
        for t in v:
            if not t:
                raise ValueError("an empty reserved token matches nothing; remove it")
            if len(t) > 100:
                raise ValueError(f"the reserved token {t[:20]!r}... is over 100 characters")
        return v

    @field_validator("sha1")
    @classmethod
    def _sha1_hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 40 or any(c not in "0123456789abcdefABCDEF" for c in v)):
            raise ValueError("must be 40 hexadecimal characters")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        corpora = {k: v for k in ("dataset", "path", "url") if (v := getattr(self, k)) is not None}
        if len(corpora) > 1:
            what = {"dataset": "the dataset", "path": "the file", "url": "the download"}
            (a, b), named = list(corpora)[:2], [f"{k} {short(str(v))}" for k, v in corpora.items()]
            raise ValueError(f"{', '.join(named[:-1])} and {named[-1]} "
                             f"{'both' if len(named) == 2 else 'all'} name the corpus, and "
                             f"one is read: keep one, e.g. data.{a}=null to read {what[b]} "
                             f"(data.{b}=null reads {what[a]})")
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if total > 1 + 1e-9:
            raise ValueError(
                f"train_fraction + val_fraction + test_fraction = {total:g} must be <= 1"
            )
        if self.url is not None and self.sha1 is None:
            raise ValueError("`url` needs `sha1` so the download can be verified")
        if self.preset == "d2l" and self.script != "as-is":
            raise ValueError(f"script={self.script}: the d2l preset keeps only the letters a-z, "
                             "so there are no Chinese characters to convert; set preset=raw")
        if self.preset == "bytes" and (self.min_freq or self.reserved_tokens or self.lowercase):
            raise ValueError("the bytes preset's vocabulary is the 256 byte values, fixed: "
                             "drop min_freq, reserved_tokens and lowercase")
        return self


def marked(section: type[BaseModel], mark: str, value: Any = True) -> tuple[str, ...]:
    """The keys of a config section whose field carries json_schema_extra {mark: value}."""
    return tuple(k for k, f in section.model_fields.items()
                 if isinstance(f.json_schema_extra, dict) and
                 f.json_schema_extra.get(mark, not value) == value)


class ModelConfig(_Section):
    name: str = Field("gru", description="registered model name (see `gru-lm models`)")
    num_hiddens: int = Field(256, ge=1, le=MAX_HIDDENS, description="hidden units per layer")
    num_layers: int = Field(1, ge=1, le=16, description="stacked recurrent layers")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout between layers and on output")
    locked_dropout: bool = Field(
        False, description="one dropout mask per sequence, shared by all steps (variational)"
    )
    weight_drop: float = Field(
        0.0, ge=0, lt=1, description="DropConnect on the recurrent weights W_h* (AWD-LSTM)"
    )
    # option=True: a key only some models take (each model's `options` names the ones it
    # does; MODEL_OPTIONS lists them all, read from these marks).
    embed_dropout: float = Field(
        0.0, ge=0, lt=1, description="drop whole characters from the input embedding",
        json_schema_extra={"option": True}
    )
    embed_dim: int | None = Field(
        None, ge=1, le=65536,
        description="input embedding size (default: torch.nn models a vocab_size-wide "
        "lookup, at most 256 wide; scratch models the book's one-hot ids)",
        json_schema_extra={"option": True}
    )
    tie_weights: bool = Field(
        False, description="torch.nn models: the output layer reuses the input embedding "
        "(needs embed_dim = num_hiddens)", json_schema_extra={"option": True}
    )
    bidirectional: bool = Field(False, description="refused: a language model must not peek")
    init: Literal["auto", "torch", "d2l", "xavier", "orthogonal"] = Field(
        "auto", description="weight init; auto = d2l for scratch models, torch for nn models"
    )
    forget_bias: float | None = Field(None, ge=-100, le=100,
                                      description="initial LSTM forget-gate bias",
                                      json_schema_extra={"option": True})
    reset_after: bool = Field(False, description="gru-scratch: reset gate after W_hh (nn.GRU)",
                              json_schema_extra={"option": True})
    rounds: int | None = Field(None, ge=0, le=16,
                               description="mogrifier: rounds of x and h gating each other "
                               "before each step (default 4; 0: exactly an LSTM)",
                               json_schema_extra={"option": True})
    rank: int | None = Field(None, ge=0, le=4096,
                             description="mogrifier: rank of the rounds' matrices (default "
                             "24; 0: full rank)", json_schema_extra={"option": True})
    softmax: Literal["full", "adaptive"] = Field(
        "full", description="output layer: full (one matrix over the vocabulary) or adaptive "
        "(frequent tokens in a small head, rarer ones in clusters of narrower rows: for "
        "vocabularies of thousands; scoring and sampling use the whole distribution)")
    cutoffs: list[StrictInt] | None = Field(
        None, max_length=16, description="adaptive: the frequency ranks where the clusters "
        "start (default 250, 1000, 4000; those past the vocabulary are dropped)")

    @field_validator("cutoffs")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or v[0] < 1
                              or any(b <= a for a, b in zip(v, v[1:], strict=False))):
            raise ValueError("must be increasing positive ranks, e.g. [250, 1000, 4000]")
        return v

    @model_validator(mode="after")
    def _cutoffs_need_adaptive(self) -> ModelConfig:
        if self.cutoffs is not None and self.softmax != "adaptive":
            raise ValueError("cutoffs: only the adaptive softmax has clusters; set "
                             "softmax=adaptive or drop cutoffs")
        return self

    @field_validator("bidirectional")
    @classmethod
    def _no_bidirectional(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "bidirectional models are refused: the backward direction reads the characters "
                "the model must predict, so its perplexity is meaningless and its samples are "
                "garbage; set model.bidirectional=false"
            )
        return v


# Model keys that only some models take (the fields marked as options above); each model lists
# the ones it takes in its `options`.
MODEL_OPTIONS = marked(ModelConfig, "option")


def model_needs_checks(m: ModelConfig) -> bool:
    """Whether the model's own checks (models.check_model_config, which loads the model code
    and torch) could refuse anything in `m`: the Mogrifier has checks of its own, every other
    model refuses only options set away from their defaults. So `config show` of a plain config
    stays quick and imports no torch."""
    return m.name == "mogrifier" or any(
        getattr(m, k) != ModelConfig.model_fields[k].default for k in MODEL_OPTIONS)


# Marks on TrainConfig's fields, read by code instead of lists kept beside them: FIXED, what a
# resume cannot change (the weights, batches and optimizer state were built from it);
# NOT_RECIPE, what does not change what a run learns (runs differing only there are seeds of
# one recipe: compare groups them).
FIXED: dict[str, Any] = {"fixed": True}
NOT_RECIPE: dict[str, Any] = {"recipe": False}


class TrainConfig(_Section):
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="optimizer",
                                                       json_schema_extra=FIXED)
    lr: float = Field(0.003, gt=0, le=1000, description="learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, le=1000, description="weight decay")
    epochs: int | None = Field(None, ge=1, le=BIG, description="stop after this many epochs")
    max_steps: int | None = Field(None, ge=1, le=BIG, description="stop after this many steps")
    time_budget_s: float | None = Field(None, gt=0, le=1e8,
                                        description="stop after this many seconds")
    batch_size: int = Field(32, ge=1, le=2**20, description="sequences per batch",
                            json_schema_extra=FIXED)
    num_steps: int = Field(35, ge=1, le=2**20, description="time steps per window (TBPTT "
                           "length)", json_schema_extra=FIXED)
    sampler: Literal["random", "sequential"] = Field("sequential", description="batching",
                                                     json_schema_extra=FIXED)
    grad_clip: float | None = Field(1.0, gt=0, le=1e6,
                                    description="clip the global grad norm; null=off")
    lr_schedule: Literal["none", "cosine", "plateau"] = Field("none", description="lr schedule")
    warmup_steps: int = Field(0, ge=0, le=BIG, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a share of lr")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="plateau: lr multiplier")
    plateau_patience: int = Field(2, ge=0, le=10**6, description="plateau: evals without gain")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an EMA of the weights (e.g. 0.999); evaluated too"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, le=10**6, description="stop after this many evals without a better val ppl"
    )
    eval_interval: int = Field(100, ge=1, le=BIG, description="steps between evaluations")
    ngram_order: int = Field(5, ge=1, le=MAX_NGRAM_ORDER,
                             description="order of the Kneser-Ney reference")
    eval_batch_size: int = Field(32, ge=1, le=2**20, description="parallel streams when evaluating")
    eval_warmup: int = Field(
        100, ge=0, le=10**6, description="tokens each evaluation stream reads before it "
        "scores, so that parallel streams score as one stream would")
    eval_max_tokens: int | None = Field(
        None, ge=2, le=2**62,
        description="score only the first N tokens of val and test (big corpora); null=all"
    )
    log_interval: int = Field(10, ge=1, le=10**6, description="steps between display updates",
                              json_schema_extra=NOT_RECIPE)
    tensorboard: bool = Field(
        False, description="also write metrics as TensorBoard events in RUN/tensorboard "
        "(needs the tensorboard extra)", json_schema_extra=NOT_RECIPE
    )
    sample_interval: int = Field(500, ge=1, le=BIG, description="steps between samples",
                                 json_schema_extra=NOT_RECIPE)
    sample_prefixes: list[str] | None = Field(
        None, max_length=64,
        description="sample prefixes (default: 'time traveller' and 'traveller' on The Time "
        "Machine; on any other text, the first words of its training split and of its middle)",
        json_schema_extra=NOT_RECIPE
    )
    sample_length: int = Field(50, ge=1, le=10000, description="characters per sample",
                               json_schema_extra=NOT_RECIPE)
    sample_temperature: float | None = Field(
        DEFAULT_TEMPERATURE, ge=1e-6, le=1e6, description="temperature of the samples "
        "written while training (seeded by train.seed); null: greedy, as the book",
        json_schema_extra=NOT_RECIPE)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of every random number generator",
                      json_schema_extra=FIXED | NOT_RECIPE)
    init_from: Path | None = Field(
        None, description="start from this run's (or checkpoint's) weights, with a fresh "
        "optimizer and schedule (fine-tuning); model and vocabulary must match",
        json_schema_extra=FIXED)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="device",
                                                          json_schema_extra=NOT_RECIPE)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: torch.nn models run under autocast; scratch models give "
        "every GEMM bf16-rounded operands with fp32 accumulation (state and weights stay fp32)"
    )
    threads: int | None = Field(
        None, ge=1, le=1024,
        description="torch CPU threads (default: the cores this process may use)",
        json_schema_extra=NOT_RECIPE
    )
    collective_timeout_s: float = Field(
        1800, ge=1, le=1e6, description="several processes: how long one waits inside a "
        "collective for the others (a frozen peer) before the run stops; it must cover the "
        "longest wait of a live one (process 0's final evaluation)",
        json_schema_extra=NOT_RECIPE)

    @property
    def reading(self) -> tuple[int, int, int]:
        """How evaluation reads a split: (streams, num_steps, warm-up), metrics.read_streams'
        arguments."""
        return self.eval_batch_size, self.num_steps, self.eval_warmup

    @model_validator(mode="after")
    def _needs_a_stop(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None and self.time_budget_s is None:
            raise ValueError("set at least one of epochs, max_steps or time_budget_s")
        return self


class RunConfig(_Section):
    name: str | None = Field(None, description="run folder name (default <config>-<time>)")
    runs_dir: Path = Field(Path("runs"), description="parent folder of run directories")
    checkpoint_interval: int | None = Field(
        None, ge=1, le=BIG, description="steps between last.pt saves (default: every eval)"
    )


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1))
    run: RunConfig = Field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def recipe(self) -> dict[str, Any]:
        """What a run is, as flat dotted keys: the config without the run section and the
        keys marked NOT_RECIPE (the seed, and how the run is shown or how fast it runs)."""
        shown = {f"{name}.{k}" for name, section in SECTIONS.items()
                 for k in marked(section, "recipe", False)}
        return {f"{section}.{k}": v for section, values in self.to_dict().items()
                if section != "run" for k, v in values.items() if f"{section}.{k}" not in shown}


def recipe_key(recipe: dict[str, Any]) -> str:
    """A recipe (Config.recipe) as one comparable string: runs with equal keys are seeds of
    one recipe."""
    return json.dumps(recipe, sort_keys=True)


SECTIONS: dict[str, type[_Section]] = {"data": DataConfig, "model": ModelConfig,
                                       "train": TrainConfig, "run": RunConfig}


def _model_at(loc: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = Config
    for part in loc:
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return cls


def _format_errors(err: ValidationError, overridden: frozenset[str] = frozenset()
                   ) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        key = ".".join(str(p)[:ECHO] for p in loc) or "<top>"
        # (an override's key or a part of its value: model.cutoffs=[5.5] is wrong at
        # model.cutoffs.0)
        if any(".".join(map(str, loc[:i])) in overridden for i in range(1, len(loc) + 1)):
            key = f"override {key}"
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            hint = ""
            if parent is not None:
                close = difflib.get_close_matches(str(loc[-1])[:ECHO], list(parent.model_fields),
                                                  n=1)
                if close:
                    hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?"
                allowed = ", ".join(parent.model_fields)
                hint += f" (allowed: {allowed})"
            problems.append(f"{key}: unknown key{hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
            problems.append(f"{key}: {short(e['input'])} is invalid: {msg}")
        else:
            problems.append(f"{key}: {msg}")
    return problems


def validate(raw: dict[str, Any], source: str = "config",
             overrides: list[str] | None = None) -> Config:
    """Validate a raw config dict, raising one ConfigError that lists every problem; a
    problem with a key that `overrides` set is called an override's, not the file's."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with sections "
                          f"{', '.join(SECTIONS)}; got {type(raw).__name__}")
    check_size(raw, source)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        overridden = frozenset(override_keys(overrides or []))
        raise ConfigError(problem_text(source, _format_errors(err, overridden))) from None
    return cfg


def load_config(path: Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (its `base:` resolved; the defaults when `path` is None) and apply
    overrides."""
    raw = resolve_yaml(path)[0] if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, source=str(path) if path is not None else "config",
                    overrides=overrides)


def _flow(value: Any) -> str:
    """One YAML scalar or flow list, as it would be written in a config file."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def described_yaml(cfg: Config, sources: dict[str, str] | None = None) -> str:
    """The config as YAML that loads back to `cfg`, each key followed by its description and,
    where the value is not the default, the default and (`sources`, dotted key -> where it
    was set: a file or an override) where it comes from."""
    defaults = Config()
    sources = sources or {}
    lines = []
    for section, section_cls in SECTIONS.items():
        lines.append(f"{section}:")
        values = getattr(cfg, section).model_dump(mode="json")
        default_values = getattr(defaults, section).model_dump(mode="json")
        rows = [(f"  {key}: {_flow(value)}", key, value) for key, value in values.items()]
        width = max(len(r[0]) for r in rows)
        for text, key, value in rows:
            note = section_cls.model_fields[key].description or ""
            if value != default_values[key]:
                where = sources.get(f"{section}.{key}")
                note += (f" [default: {_flow(default_values[key])}"
                         f"{'; from ' + where if where else ''}]")
            lines.append(f"{text.ljust(width)}  # {note}" if note else text)
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
