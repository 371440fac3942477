"""qbert from Python: the pipeline's stages as functions over a model you already have.

::

    import qbert
    q = qbert.quantize(model, "peg", calibration="mrpc", tokenizer=tokenizer)
    qbert.evaluate(q, "mrpc")            # {'f1': ..., 'accuracy': ...}
    qbert.export(q, "integer", "out/")   # what was written
    qbert.run("configs/mrpc_peg.yaml")   # what `qbert run` does

``quantize`` runs a post-training recipe's prepare -> calibrate -> convert on any supported
(BERT-family) HuggingFace model; quantization-aware recipes go through ``prepare``, your own training
of ``q.model``, and ``convert``. The stages are the same code the CLI runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbert.errors import QbertError

if TYPE_CHECKING:
    from qbert.config import ExperimentConfig
    from qbert.pipeline.context import StageContext
    from qbert.pipeline.run import ExperimentResult
    from qbert.recipes import Quantized, Recipe

Calibration = Any
"""A task name (its training split, from ``data_dir`` or ``$QBERT_DATA_DIR``), a list of texts, a list
of ``(text, text_pair)`` tuples, or a list of tokenized features (dicts with ``input_ids``)."""


def _load_model(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """A model object and its tokenizer from a model, a fine-tuned folder, or a finished run's seed folder."""
    from qbert.models import load_finetuned, load_tokenizer, resolve_model

    if isinstance(model, (str, Path)):
        source = resolve_model(str(model))
        model = load_finetuned(source.location)
        if tokenizer is None:
            tokenizer = load_tokenizer(source)
    if tokenizer is None:
        folder = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if folder and Path(folder).is_dir():
            tokenizer = load_tokenizer(resolve_model(folder))
    return model, tokenizer


def _config(model: Any, recipe: Any, task: str | None, settings: dict[str, Any]) -> ExperimentConfig:
    from qbert.config import parse_config
    from qbert.recipes import RecipeParams

    if isinstance(recipe, str):
        recipe = {"name": recipe}
    elif isinstance(recipe, RecipeParams):
        recipe = recipe.model_dump()
    data = {"model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or "minilm-l6"),
            "recipe": recipe, "finetune": {"epochs": 0, "max_seq_len": settings.pop("max_seq_len")}}
    if task is not None:
        data["task"] = task
    data.update({k: v for k, v in settings.items() if v is not None})
    return parse_config(data, source="qbert.quantize")


def _features(calibration: Calibration, tokenizer: Any, config: ExperimentConfig) -> list[dict[str, Any]] | None:
    if calibration is None:
        return None
    if isinstance(calibration, str):
        from qbert.tasks import get_task

        task = get_task(config.task, config)
        examples = task.load("train", config.data)
        if not examples:
            raise QbertError(f"the {config.task} train split has no examples", key="calibration")
        return task.encode_train(tokenizer, examples, config.finetune.max_seq_len)
    items = list(calibration)
    if not items:
        raise QbertError("calibration is empty: give texts, text pairs or tokenized features", key="calibration")
    if isinstance(items[0], dict):
        if "input_ids" not in items[0]:
            raise QbertError("tokenized calibration features need input_ids (and attention_mask)",
                             key="calibration")
        return items
    if tokenizer is None:
        raise QbertError("calibration texts need a tokenizer: pass tokenizer=", key="tokenizer")
    pairs = isinstance(items[0], (tuple, list))
    first = [i[0] for i in items] if pairs else [str(i) for i in items]
    second = [i[1] for i in items] if pairs else None
    encoded = tokenizer(first, second, truncation=True, max_length=config.finetune.max_seq_len)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(items))]


def _context(config: ExperimentConfig, tokenizer: Any, features: list[dict[str, Any]] | None, seed: int,
             device: Any) -> StageContext:
    from qbert.pipeline.context import StageContext

    return StageContext(config, seed, tokenizer, device, load_train=(lambda: features) if features else None)


def _recipe(config: ExperimentConfig) -> Recipe:
    from qbert.recipes import get_recipe

    return get_recipe(config.recipe.name)(config.recipe, config)


def _device(model: Any) -> Any:
    import torch

    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def prepare(
    model: Any, recipe: Any, *, calibration: Calibration = None, tokenizer: Any = None, task: str | None = None,
    estimator: dict[str, Any] | None = None, calibrate: dict[str, Any] | None = None, data_dir: str | None = None,
    data: dict[str, Any] | None = None, max_seq_len: int = 128, seed: int = 0, reference: str | None = None,
) -> Quantized:
    """The recipe's ``prepare`` and ``calibrate`` stages: quantizers in place with their starting ranges (QAT:
    ready for your training loop over ``q.model``; learned-range QAT initialises its ranges from
    ``calibration``). Continue with :func:`convert`."""
    from qbert.pipeline.stages import prepared

    model, method, ctx = _setup(model, recipe, calibration, tokenizer, task, estimator, calibrate, data_dir,
                                data, max_seq_len, seed, reference)
    return prepared(method, model, ctx)


def _setup(model, recipe, calibration, tokenizer, task, estimator, calibrate, data_dir, data, max_seq_len, seed,
           reference):
    """The model, the recipe and its stage context from the API's arguments."""
    model, tokenizer = _load_model(model, tokenizer)
    if isinstance(calibration, str) and task is None:
        task = calibration
    data = {**(data or {}), **({"dir": str(data_dir)} if data_dir else {})}
    settings = {"estimator": estimator, "calibrate": calibrate, "max_seq_len": max_seq_len, "data": data or None,
                "reference": reference}
    config = _config(model, recipe, task, settings)
    ctx = _context(config, tokenizer, _features(calibration, tokenizer, config), seed, _device(model))
    return model, _recipe(config), ctx


def convert(q: Quantized, *, calibration: Calibration = None, seed: int = 0) -> Quantized:
    """The recipe's ``convert`` stage on a prepared (and, for QAT, trained) value: ranges frozen, codes
    decoded, integer modules in, with the settings ``q`` was prepared with. The model is put in eval mode."""
    if q.config is None:
        raise QbertError("this value was not made by qbert.prepare or a recipe (it has no config)", key="quantized")
    from qbert.pipeline.stages import converted

    ctx = _context(q.config, q.tokenizer, _features(calibration, q.tokenizer, q.config), seed, _device(q.model))
    q.model.eval()
    return converted(_recipe(q.config), q, ctx)


def quantize(
    model: Any, recipe: Any, *, calibration: Calibration = None, tokenizer: Any = None, task: str | None = None,
    estimator: dict[str, Any] | None = None, calibrate: dict[str, Any] | None = None, data_dir: str | None = None,
    data: dict[str, Any] | None = None, max_seq_len: int = 128, seed: int = 0, reference: str | None = None,
) -> Quantized:
    """Quantize ``model`` with a post-training ``recipe``: prepare -> calibrate -> convert.

    ``model``: a HuggingFace BERT-family model object, a fine-tuned ``save_pretrained`` folder, or a
    finished run's seed folder. ``recipe``: a name (``"peg"``), a mapping (``{"name": "peg", "groups":
    3}``) or a recipe's parameter object. ``calibration``: see :data:`Calibration` (recipes that
    calibrate need it; GOBO, dynamic_int8 and fp32 do not). ``estimator`` and ``calibrate`` are the
    config sections of the same names (e.g. ``{"weights": "mse"}``, ``{"batches": 16, "batch_size": 1}``);
    ``seed`` draws the calibration batches; ``data`` is the config's data section (``max_train_samples``,
    ``dir``; ``data_dir`` is a shortcut for the folder); ``reference="bondarenko2021"`` sets the calibration
    choices as that paper's code makes them (:mod:`qbert.reference`). Returns the
    :class:`~qbert.recipes.Quantized` value. A model object is quantized in place (as torchao's
    ``quantize_``); deep-copy it first to keep it.
    """
    from qbert.pipeline.stages import run_stages

    model, method, ctx = _setup(model, recipe, calibration, tokenizer, task, estimator, calibrate, data_dir,
                                data, max_seq_len, seed, reference)
    return run_stages(method, model, ctx)[0]  # a recipe that trains is refused: it needs qbert.prepare / convert


def to_integer(q: Quantized) -> Quantized:
    """``q`` with every linear layer whose input and weight are quantized (8 bits or fewer) on integer
    GEMMs (int8 x int8 -> int32, ``torch._int_mm``), in place; ``report["gemms"]`` says which layers
    are integer and why the others are not. Needs a recipe with uniform quantizers."""
    from qbert.quant.integer_model import integer_gemms

    if q.instrumented is None:
        raise QbertError(f"recipe {q.recipe} has no uniform quantizers to run on integer GEMMs", key="quantized")
    gemms = integer_gemms(q.instrumented)
    return q.but(arithmetic="integer", report={"gemms": gemms})


def load(folder: str | Path) -> Quantized:
    """The runnable model of a qbert export: the folder (or a finished run's seed folder that wrote one).

    An integer export (``export.formats: [integer]``): weights are de-quantized from their codes, every
    quantizer gets its stored grid, and every eligible linear layer runs on integer GEMMs, as
    :func:`to_integer`. A packed GOBO export (``[packed]``): the model with every coded matrix decoded
    (GOBO's arithmetic is FP32). A TorchScript export (``dynamic_int8``'s ``model.torchscript.pt``): that
    module. An ONNX export (``[onnx]``, when the folder has none of those): the file on onnxruntime with the
    session settings it records (:class:`~qbert.quant.onnx_export.OnnxModel`). ``q.tokenizer`` is the
    folder's tokenizer when it has one."""
    from qbert.quant import packing
    from qbert.quant.integer import instrumented_from_integer
    from qbert.quant.integer_model import integer_gemms
    from qbert.recipes import Quantized

    folder = Path(folder)
    for script in (folder / "model.torchscript.pt", folder / "export" / "torchscript" / "model.torchscript.pt"):
        if script.is_file():
            return _load_torchscript(script)
    candidates = [folder / "model.safetensors", folder / "export" / "integer" / "model.safetensors",
                  folder / "export" / "packed" / "model.safetensors"]
    path = next((p for p in candidates if p.is_file()), None)
    if folder.is_file():
        path, folder = folder, folder.parent
    onnx_file = next((p for p in (folder / "model.onnx", folder / "export" / "onnx" / "model.onnx") if p.is_file()),
                     None)
    if path is not None and path.suffix == ".onnx":
        path, onnx_file = None, path
    if path is None and onnx_file is not None:
        return _load_onnx(onnx_file)
    if path is None:
        raise QbertError(f"{folder} holds no qbert export (model.safetensors written by export.formats: "
                         "[integer] or [packed], model.torchscript.pt by [torchscript], model.onnx by [onnx]); "
                         "write one with: "
                         "qbert export RUN_FOLDER --format integer", key="folder")
    if _file_format(path) == packing.FORMAT:
        return Quantized(model=packing.load_packed(path), recipe="gobo", arithmetic="decoded",
                         tokenizer=_folder_tokenizer(path.parent), report={"loaded_from": str(path)})
    try:
        inst, metadata = instrumented_from_integer(path)
    except ValueError as exc:
        raise QbertError(str(exc), key="folder") from None
    gemms = integer_gemms(inst)
    return Quantized(model=inst.model, recipe=metadata.get("recipe", "unknown"), arithmetic="integer",
                     instrumented=inst, tokenizer=_folder_tokenizer(path.parent),
                     report={"gemms": gemms, "loaded_from": str(path)})


def _file_format(path: Path) -> str | None:
    """The ``format`` a qbert safetensors file records in its metadata (None when unreadable: the reader
    that follows says why)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError):
        return None


def _folder_tokenizer(folder: Path) -> Any:
    """The tokenizer an export wrote beside its model file, or None."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _load_onnx(path: Path) -> Quantized:
    from qbert.quant.onnx_export import OnnxModel
    from qbert.recipes import Quantized

    model = OnnxModel(path)
    meta = model.session.get_modelmeta().custom_metadata_map
    return Quantized(model=model, recipe=meta.get("qbert.recipe", "unknown"), arithmetic="onnx",
                     tokenizer=_folder_tokenizer(path.parent),
                     report={"loaded_from": str(path), "session_config": model.session_config})


def _load_torchscript(path: Path) -> Quantized:
    from qbert.quant.torchscript import TorchScriptModel
    from qbert.recipes import Quantized

    model = TorchScriptModel(path)
    return Quantized(model=model, recipe=model.info.get("recipe", "unknown"),
                     arithmetic=model.info.get("arithmetic", "integer"), tokenizer=_folder_tokenizer(path.parent),
                     report={"loaded_from": str(path)})


def evaluate(
    quantized: Any, task: str, *, tokenizer: Any = None, data_dir: str | None = None, batch_size: int = 64,
    max_seq_len: int = 128, max_eval_samples: int | None = None,
) -> dict[str, float]:
    """The task's official metrics for ``quantized`` (a :class:`~qbert.recipes.Quantized` value or a plain
    model) on every evaluation split present (later splits' metrics carry the split's name)."""
    from qbert.config import parse_config
    from qbert.pipeline.evaluate import evaluate_splits
    from qbert.tasks import get_task

    model = getattr(quantized, "model", quantized)
    tokenizer = tokenizer or getattr(quantized, "tokenizer", None)
    model, tokenizer = _load_model(model, tokenizer)
    if tokenizer is None:
        raise QbertError("evaluation needs a tokenizer: pass tokenizer=", key="tokenizer")
    config = parse_config({"task": task, "finetune": {"epochs": 0, "max_seq_len": max_seq_len},
                           "data": {"dir": str(data_dir) if data_dir else None, "max_eval_samples": max_eval_samples}},
                          source="qbert.evaluate")
    device = getattr(quantized, "device", None) or _device(model)
    metrics, _, _ = evaluate_splits(model, get_task(task, config), tokenizer, config.data, batch_size=batch_size,
                                    max_len=max_seq_len, device=device)
    return metrics


def export(quantized: Quantized, format: str, folder: str | Path) -> dict[str, Any]:
    """Write ``quantized`` as ``format`` (``integer``, ``packed``) into ``folder``; returns what was written
    (path, size, the bit-exactness check)."""
    from qbert.pipeline.export import export as export_stage

    return export_stage(quantized, format, folder)


def run(config: Any, overrides: list[str] | None = None, *, runs_dir: str | Path | None = None,
        force: bool = False) -> ExperimentResult:
    """Every seed of an experiment through the pipeline, as ``qbert run`` does: ``config`` is a YAML
    path, a mapping, or an :class:`~qbert.config.ExperimentConfig`; returns per-seed outcomes and the
    summary."""
    from qbert.pipeline.run import run_experiment

    return run_experiment(_experiment(config, overrides, "qbert.run"), root=runs_dir, force=force)


def search(config: Any, target: str = "loss<=1.0", overrides: list[str] | None = None, *, seed: int | None = None,
           holdout: float = 0.5, probe: int = 256, margin: float = 0.0, confidence: float | None = 0.9,
           sites: str = "activations", high_bits: int | str | None = 16,
           runs_dir: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """The fewest sites of a post-training config's plan to raise to ``high_bits`` so that its headline metric
    stays within ``target`` of FP32, as ``qbert search`` does (:mod:`qbert.precision_search`): the chosen sites, the
    sensitivity ranking, every evaluation, and the held-out scores. ``sites``: ``activations`` or ``all``;
    ``high_bits``: 9-16, or ``"fp"`` (None) to leave the chosen sites in floating point; ``confidence``: of the
    search part's bootstrap loss bound (0 or None: the point estimate)."""
    from qbert.precision_search import (
        SearchSettings,
        check_searchable,
        parse_confidence,
        parse_high_bits,
        parse_target,
        run_search,
    )

    config = _experiment(config, overrides, "qbert.search")
    check_searchable(config)
    if sites not in ("activations", "all"):
        raise QbertError(f"sites {sites!r}: activations or all", key="sites")
    settings = SearchSettings(parse_target(target), config.seeds[0] if seed is None else seed, holdout=holdout,
                              probe=probe, margin=margin, high_bits=parse_high_bits(high_bits),
                              confidence=parse_confidence(confidence),
                              kinds=("activation",) if sites == "activations" else ("activation", "weight"))
    return run_search(config, settings, root=runs_dir, force=force)


def _experiment(config: Any, overrides: list[str] | None, source: str) -> Any:
    from qbert.config import ExperimentConfig, apply_overrides, load_config, parse_config

    if isinstance(config, (str, Path)):
        return load_config(config, overrides or [])
    if isinstance(config, dict):
        return parse_config(apply_overrides(config, overrides or []), source=source)
    if not isinstance(config, ExperimentConfig):
        raise QbertError("config must be a YAML path, a mapping or an ExperimentConfig", key="config")
    return config
