"""The experiment config: pydantic schema, safe YAML loading, ``key.path=value`` overrides, errors.

Every default lives in the schema. Unknown keys, wrong types and impossible combinations fail before
any work starts, as a :class:`~qbert.errors.QbertError` naming the file, the dotted key and the
nearest valid key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from qbert.errors import QbertError
from qbert.quant.spec import EstimatorName
from qbert.recipes import RECIPES, available, get_recipe
from qbert.recipes.base import RecipeParams
from qbert.schema import Section
from qbert.yamlio import MAX_YAML_BYTES, load_yaml_text, yaml_error_line

TaskName = Literal["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "squad"]
RangeEstimatorName = EstimatorName
"""The estimator names (one list, in :mod:`qbert.quant.spec`)."""


class DataConfig(Section):
    """Where task data comes from and how much of it is used."""

    dir: str | None = Field(
        None,
        description="Folder in the GLUE layout (<dir>/glue/<TASK>/*.tsv, <dir>/squad/*-v1.1.json). "
        "Unset: $QBERT_DATA_DIR, else the HuggingFace hub when online.",
    )
    max_train_samples: int | None = Field(
        None, gt=0, description="Use only the first N training examples (after any split)."
    )
    max_eval_samples: int | None = Field(
        None, gt=0, description="Evaluate only the first N evaluation examples (after any split)."
    )
    train_from_eval: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="For tasks whose training file is missing: this fraction of the evaluation "
        "file's groups (SQuAD articles, GLUE rows) in file order becomes the training set and the "
        "rest is evaluated. The two parts never share an article.",
    )


MAX_NAME = 100
"""Longest run name (a folder name; file systems stop at 255 bytes, with the hash and seed beside it)."""

MAX_SEEDS = 1000
"""Most seeds in one config (each is a full fine-tune and quantization)."""


class FinetuneConfig(Section):
    """The fine-tune stage: AdamW with linear warmup then linear decay."""

    epochs: float = Field(
        3.0, ge=0, le=1000, description="Passes over the training set (may be fractional). 0: no fine-tuning, "
        "`model` is already fine-tuned for the task (`finetune: null` is the same).",
    )
    lr: float = Field(2.0e-5, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(16, gt=0, description="Training examples (SQuAD: windows) per step.")
    max_seq_len: int = Field(128, ge=8, le=4096, description="Truncation length (SQuAD: window length).")
    doc_stride: int = Field(128, gt=0, description="SQuAD: tokens shared by consecutive windows of a context.")
    warmup: float = Field(0.1, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay, not applied to biases and norms.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables.")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16 = autocast (CPU and CUDA). auto = bf16 where the device computes it natively "
        "(CUDA with bf16; an x86 CPU with AVX512-BF16 or AMX), else fp32: decided when the run starts, so the "
        "saved config and its hash hold the choice.",
    )
    group_by_length: bool = Field(True, description="Length-grouped batches (less padding).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present.")
    threads: int | None = Field(None, gt=0, description="CPU threads for torch; null = all cores.")


class EstimatorConfig(Section):
    """Range estimators for quantizers (used by the quantization recipes)."""

    weights: RangeEstimatorName = Field("minmax", description="Range estimator for weight quantizers.")
    activations: RangeEstimatorName = Field("running_minmax", description="Range estimator for activations.")
    momentum: float = Field(0.9, gt=0, lt=1, description="running_minmax: weight of the old range in the EMA.")
    mse_search: Literal["grid", "golden"] = Field(
        "grid", description="mse: grid search over clipping ratios, or golden-section search."
    )
    mse_candidates: int = Field(100, ge=2, description="mse: grid size (golden: the smallest ratio is 1/N).")
    percentile: float = Field(99.99, gt=50, lt=100, description="percentile: upper percentile (lower = 100 - p).")


class CalibrateConfig(Section):
    """Calibration data for static activation ranges: N batches from the training split."""

    batches: int = Field(16, gt=0, description="Calibration batches drawn (seeded) from the training split.")
    batch_size: int = Field(1, gt=0, description="Sequences per calibration batch.")
    upstream_quantized: bool = Field(
        False, description="Estimate each activation range with the sites before it already fake-quantized at their "
        "ranges so far (the reference code's calibration, layer by layer); false: the floating-point network with "
        "quantized weights.",
    )
    padding: Literal["excluded", "included", "max_length"] = Field(
        "excluded", description="Padded positions in range statistics: excluded (batches padded to their longest "
        "sequence, padding masked out); included (the same batches, padding observed like any token: the reference "
        "code's PTQ); max_length (every sequence padded to finetune.max_seq_len and observed: its QAT initialisation).",
    )
    permutation_ranges: Literal["all", "ema", "last"] = Field(
        "all", description="PEG permutation: each dimension's range over all calibration batches, an EMA of the "
        "per-batch ranges (estimator.momentum, the reference code's intent), or the last batch's (what it does).",
    )


class EvaluateConfig(Section):
    """The evaluate stage."""

    batch_size: int = Field(64, gt=0, description="Evaluation examples (SQuAD: windows) per batch.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = autocast at evaluation.")
    save_predictions: bool = Field(True, description="Write per-example predictions next to metrics.")
    n_best: int = Field(20, gt=0, description="SQuAD: start and end candidates searched per window.")
    max_answer_len: int = Field(30, gt=0, description="SQuAD: longest answer span in tokens.")
    clamp_regression: bool = Field(
        False, description="Clamp regression predictions to the task's label range (STS-B: [0, 5]), as the reference "
        "code's quantized BERT does.",
    )
    integer: bool = Field(
        False, description="Also evaluate the model with its linear layers on integer GEMMs (int8 x int8 -> int32), "
        "recorded beside the simulated metrics with their agreement (recipes with uniform quantizers).",
    )


class ExportConfig(Section):
    """Artefacts written after evaluation."""

    formats: list[str] = Field(default_factory=list, description="Export formats to write.")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        # the formats some recipe declares it can write (each has an exporter in qbert.pipeline.export, which a
        # test checks): the config asks the recipes, not the exporters, so reading it loads no export code
        known = sorted({fmt for name in available() for fmt in get_recipe(name).export_formats})
        for fmt in formats:
            if fmt not in known:
                raise ValueError(f"unknown export format {fmt!r} (available: {', '.join(known)})")
        return formats


def _default_recipe() -> RecipeParams:
    return get_recipe("fp32").Params()


class LogConfig(Section):
    """What a run records about itself beyond its results; never part of the config hash."""

    tensorboard: bool = Field(
        True, description="TensorBoard event files per seed (training loss, learning rate; QAT: the learned ranges "
        "of a few sites) under seed=N/tensorboard/, when the tensorboard package is installed (pip install "
        "'qbert[viz]'); false: none.",
    )
    every: int | None = Field(
        None, gt=0, description="Write the training loss to run.log every N steps (default: about 20 lines per "
        "training, at least every 50 steps).",
    )


class ExperimentConfig(Section):
    """One experiment: a model fine-tuned on a task, quantized by a recipe, for every seed."""

    name: str = Field("experiment", max_length=MAX_NAME, description="Run folder name (sanitised).")
    model: str = Field("minilm-l6", description="Hub id, local HF folder, or alias (minilm-l6, tiny-random).")
    task: TaskName = Field("mrpc", description="GLUE task or squad.")
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1, description="One run per seed.")
    data: DataConfig = Field(default_factory=DataConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    recipe: SerializeAsAny[RecipeParams] = Field(default_factory=_default_recipe)
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    reference: Literal["bondarenko2021"] | None = Field(
        None, description="Set the implementation choices as a paper's reference code makes them (calibration with "
        "upstream quantizers, padding, golden-section MSE, PEG permutation ranges, the STS-B mixed-precision and "
        "clamp settings, fp32 QAT); keys the config sets itself win. See qbert/reference.py.",
    )

    @model_validator(mode="before")
    @classmethod
    def _reference_preset(cls, data: Any) -> Any:
        from qbert.reference import apply_reference

        return apply_reference(data) if isinstance(data, dict) else data

    @field_validator("name")
    @classmethod
    def _sanitise_name(cls, name: str) -> str:
        clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
        if not clean:
            raise ValueError("must contain letters or digits")
        return clean

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        bad = [s for s in seeds if not 0 <= s < 2**32]
        if bad:
            raise ValueError(f"seed {bad[0]} is out of range: seeds are integers 0 <= seed < 2**32")
        if len(seeds) > MAX_SEEDS:
            raise ValueError(f"{len(seeds):,} seeds is more than {MAX_SEEDS:,}; give fewer seeds per config")
        return seeds

    @field_validator("finetune", mode="before")
    @classmethod
    def _no_finetuning(cls, value: Any) -> Any:
        # `finetune: null` = start from a model already fine-tuned for the task. The section's other keys
        # keep their defaults: max_seq_len (and doc_stride) still set how calibration and evaluation
        # data are tokenized, so `finetune: {epochs: 0, max_seq_len: 256}` is the longer spelling.
        return {"epochs": 0} if value is None else value

    @field_validator("recipe", mode="wrap")
    @classmethod
    def _recipe_params(cls, value: Any, handler: Any) -> RecipeParams:
        if isinstance(value, RecipeParams):
            return value
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ValueError("must be a mapping such as {name: fp32}")
        return get_recipe(value.get("name", "fp32")).Params.model_validate(value)

    @model_validator(mode="after")
    def _recipe_fits(self) -> ExperimentConfig:
        if self.task == "squad" and self.finetune.doc_stride >= self.finetune.max_seq_len - 16:
            raise ValueError(
                f"finetune.doc_stride ({self.finetune.doc_stride}) must be well below "
                f"finetune.max_seq_len ({self.finetune.max_seq_len}) for squad (e.g. 128 with 384)"
            )
        recipe = get_recipe(self.recipe.name)
        if self.evaluate.clamp_regression and self.task != "stsb":
            raise ValueError(f"evaluate.clamp_regression: task {self.task} is not a regression task (only stsb is); "
                             "remove evaluate.clamp_regression")
        if self.evaluate.integer and "integer" not in recipe.export_formats:
            able = ", ".join(sorted(n for n in available() if "integer" in get_recipe(n).export_formats))
            raise ValueError(f"evaluate.integer: recipe {self.recipe.name} has no uniform quantizers to run on integer "
                             f"GEMMs (recipes that do: {able}); remove evaluate.integer")
        for fmt in self.export.formats:
            if fmt not in recipe.export_formats:
                able = ", ".join(sorted(n for n in available() if fmt in get_recipe(n).export_formats))
                raise ValueError(
                    f"export.formats: recipe {self.recipe.name} cannot write {fmt!r} (recipes that can: {able}); "
                    f"remove it from export.formats"
                )
        recipe.check(self)
        return self

    @property
    def skips_finetuning(self) -> bool:
        """Whether ``model`` is used as an already fine-tuned model (``finetune.epochs: 0``)."""
        return self.finetune.epochs == 0

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as plain data (what is saved and hashed)."""
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """Identity of the experiment: everything that changes its result, i.e. the resolved config but its
        name and seeds (one folder per seed), without keys added later that are at their neutral value
        (:data:`HASH_NEUTRAL`), so results written before a key existed stay findable."""
        return stable_hash(hashed_data(self.resolved()))


HASH_NEUTRAL: dict[str, Any] = {
    "evaluate.integer": False,
    "evaluate.clamp_regression": False,
    "calibrate.upstream_quantized": False,
    "calibrate.padding": "excluded",
    "calibrate.permutation_ranges": "all",
    "recipe.pooler": False,
    "recipe.precision": None,
    "recipe.quant_noise": None,
    "recipe.placement": None,
    "reference": None,
}
"""Keys added to the schema after results were first hashed (dotted; ``recipe.<field>`` for any recipe's
parameter), each with the value that reproduces the behaviour from before the key existed. The hash
leaves a key out while it has that value, so adding a key never orphans earlier results. Every key
added to a section or to an existing recipe's parameters must be registered here
(``tests/test_config.py`` compares the schema with the keys hashed when this rule began)."""


UNHASHED = ("name", "seeds", "log")
"""Top-level sections that do not change a result: the run's name, its seeds (a folder each), its logging."""


def hashed_data(resolved: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`ExperimentConfig.config_hash` hashes, from a resolved config."""
    data = copy.deepcopy(resolved)
    for key in UNHASHED:
        data.pop(key, None)
    for dotted, neutral in HASH_NEUTRAL.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and node[last] == neutral:
            del node[last]
    return data


def stable_hash(data: Any, length: int = 12) -> str:
    """Hash of plain data that does not depend on key order."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ---------------------------------------------------------------- YAML files


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely, rejecting duplicate keys, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        what = "not a regular file (a folder, device or pipe)" if path.exists() else "config file not found"
        raise QbertError(f"{what} (give the path to a .yaml file, e.g. configs/default.yaml)", source=str(path))
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise QbertError(
                f"{path.stat().st_size:,} bytes is too large for a config (at most {MAX_YAML_BYTES:,}; "
                "is this the right file?)",
                source=str(path),
            )
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except QbertError as exc:
        raise QbertError(exc.message, source=str(path)) from None
    except yaml.YAMLError as exc:
        raise QbertError(yaml_error_line(exc), source=str(path)) from None
    except UnicodeDecodeError:
        raise QbertError("not a UTF-8 text file", source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QbertError("the top level must be a mapping of config keys", source=str(path))
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into the key path and the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
        raise QbertError(
            f"override {text!r} is not key.path=value (e.g. finetune.lr=3e-5)", source="command line"
        )
    try:
        value = load_yaml_text(raw) if raw.strip() else None
    except QbertError as exc:
        raise QbertError(f"{exc.message} in override {key}", source="command line") from None
    except yaml.YAMLError as exc:
        raise QbertError(f"{yaml_error_line(exc)} in override {text!r}", source="command line") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in a copy of the raw config mapping."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise QbertError(
                    f"cannot set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a mapping",
                    source="command line",
                )
            node = child
        node[keys[-1]] = value
    return data


def _valid_keys(data: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema accepts in the mapping at ``loc`` (for 'did you mean')."""
    model: type[BaseModel] | None = ExperimentConfig
    node = data
    for part in loc:
        if model is None:
            return []
        if model is ExperimentConfig and part == "recipe":
            name = node.get("recipe", {}).get("name", "fp32") if isinstance(node, dict) else "fp32"
            recipe = RECIPES.get(name) if name in available() else None
            model = recipe.Params if recipe else RecipeParams
        else:
            field = model.model_fields.get(part)
            annotation = getattr(field, "annotation", None)
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        node = node.get(part) if isinstance(node, dict) else None
    return list(model.model_fields) if model else []


def _unknown_key(bad: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.5)
    return "unknown key (" + (f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}") + ")"


def _format_validation_error(exc: ValidationError, data: dict[str, Any], source: str) -> QbertError:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        parent, bad = loc[:-1], str(loc[-1])
        message = _unknown_key(bad, _valid_keys(data, parent))
    else:
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "literal_error" and isinstance(err.get("input"), str):
            choices = re.findall(r"'([^']+)'", err["ctx"].get("expected", "")) if err.get("ctx") else []
            close = difflib.get_close_matches(err["input"], choices, n=1, cutoff=0.5)
            message = f"{err['input']!r} is not valid: {message}" + (
                f" (did you mean {close[0]!r}?)" if close else ""
            )
        elif err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), dict):
            message = f"{message}, got {_brief(err['input'])}"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return QbertError(message, source=source, key=key or None)


def _brief(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a huge value never floods an error line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 14]}... ({len(text):,} chars)"


def schema_error(exc: ValidationError, schema: type[BaseModel], source: str) -> QbertError:
    """One line for a file validated against ``schema`` (sweep files, table specs): an unknown key first,
    with the nearest valid key, else the first problem."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = tuple(err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model: Any = schema
        for part in loc[:-1]:
            field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
            annotation = getattr(field, "annotation", None)
            args = getattr(annotation, "__args__", ()) or ()
            nested = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
            model = nested[0] if nested else model
        valid = list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
        message = _unknown_key(str(loc[-1]), valid)
    return QbertError(message, source=source, key=".".join(str(p) for p in loc) or None)


def parse_config(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validate raw config data, turning pydantic's errors into one-line :class:`QbertError`."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(exc, data, source) from None


SWEEP_KEYS = ("config", "vars", "grid", "set", "parts")
"""Top-level keys that make a YAML file a sweep file rather than an experiment config."""

_KIND_USE = {"config": "qbert run", "sweep": "qbert sweep", "table": "qbert table"}
_KIND_NAME = {"config": "an experiment config", "sweep": "a sweep file", "table": "a table spec"}


def file_kind(data: dict[str, Any]) -> str:
    """What a YAML mapping is: ``table`` (a table spec has ``rows``), ``sweep`` (any of SWEEP_KEYS) or
    ``config`` (an experiment config)."""
    if "rows" in data:
        return "table"
    if any(key in data for key in SWEEP_KEYS):
        return "sweep"
    return "config"


def expect_kind(data: dict[str, Any], path: str | Path, *allowed: str) -> None:
    """Refuse a file of another kind than ``allowed`` with the command that takes it."""
    kind = file_kind(data)
    if kind not in allowed:
        wanted = " or ".join(_KIND_NAME[k] for k in allowed)
        raise QbertError(f"this is {_KIND_NAME[kind]}, not {wanted}: use `{_KIND_USE[kind]} {path}`", source=str(path))


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, override and validate an experiment config file.

    The run name defaults to the file's stem. Relative ``data.dir`` paths are taken relative to the
    current directory, as on the command line.
    """
    path = Path(path)
    data = read_yaml(path)
    expect_kind(data, path, "config")
    data.setdefault("name", path.stem)
    source = str(path) + (" + command-line overrides" if overrides else "")
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_config(data, source)
