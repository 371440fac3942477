"""``qbert export RUN_FOLDER``: write export formats for a finished seed without training it again.

A post-training method is deterministic given the fine-tuned checkpoint its ``metrics.json`` names,
the resolved config and the seed, so the method's prepare -> calibrate -> convert is derived again
from them (seconds) and checked against the run's own report (the calibrated activation ranges, GOBO's
per-matrix error) before anything is written; the new artefacts are added to the run's record.
Methods that train with quantizers (QAT) did not keep their trained weights: name the formats in
``export.formats`` when running them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qbert.errors import QbertError


def export_run(seed_folder: str | Path, formats: list[str], out: str | Path | None = None) -> dict[str, Any]:
    """Write ``formats`` for the finished seed in ``seed_folder`` (into ``<seed>/export/<format>`` or
    ``out/<format>``); returns what was written, by format."""
    import torch

    from qbert.config import load_config
    from qbert.models import load_finetuned, load_tokenizer, resolve_model
    from qbert.pipeline.export import EXPORT_FORMATS, card_facts, export_seed
    from qbert.pipeline.run import evaluate_onnx, split_evaluator, stage_context
    from qbert.pipeline.stages import run_stages
    from qbert.recipes import get_recipe
    from qbert.records import read_record
    from qbert.runs import atomic_write_json
    from qbert.tasks import get_task

    folder = Path(seed_folder)
    record = read_record(folder)
    if record is None or not (folder / "config.yaml").is_file():
        raise QbertError(f"{folder} is not a finished seed folder (runs/<name>/<hash>/seed=<n> with metrics.json "
                         "and config.yaml)", key="RUN_FOLDER")
    config = load_config(folder / "config.yaml")
    recipe_cls = get_recipe(config.recipe.name)
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise QbertError(f"unknown format {fmt!r} (available: {', '.join(EXPORT_FORMATS)})", key="--format")
        if fmt not in recipe_cls.export_formats:
            raise QbertError(f"recipe {config.recipe.name} cannot write {fmt!r} (it writes: "
                             f"{', '.join(recipe_cls.export_formats) or 'nothing'})", key="--format")
    if recipe_cls.trains:
        raise QbertError(f"recipe {config.recipe.name} trained with quantizers and its trained weights were not "
                         "kept; rerun it with export.formats set (e.g. export.formats=[hf])", key="RUN_FOLDER")
    checkpoint = record.checkpoint
    if not checkpoint or not (Path(checkpoint) / "config.json").is_file():
        raise QbertError(f"the checkpoint this run used ({checkpoint}) is gone (cache cleared?); rerun the config",
                         key="RUN_FOLDER")
    seed = record.seed if record.seed is not None else config.seeds[0]
    source = resolve_model(checkpoint)
    tokenizer = load_tokenizer(source)
    task = get_task(config.task, config)
    device = torch.device("cpu")
    ctx = stage_context(config, seed, task, tokenizer, device)
    recipe = recipe_cls(config.recipe, config)
    q, _ = run_stages(recipe, load_finetuned(checkpoint).to(device), ctx)
    _same_as_the_run(q.report, record.recipe_report, folder)

    card = card_facts(config, seed, record.metrics, folder)
    written = export_seed(q, formats, folder, card, root=Path(out) if out is not None else None)
    raw = record.model_dump(mode="json")  # as qbert writes a record: every field
    raw["exports"] = {**record.exports, **written}
    if "onnx" in written:  # as the pipeline does: the file on onnxruntime beside the simulated model
        evaluate_all = split_evaluator(config, task, tokenizer, q.device or device, folder)
        metrics, _, outputs = evaluate_all(q.model)
        if metrics != record.metrics:
            raise QbertError(f"the derived model scores {metrics}, the run recorded {record.metrics} (the "
                             "code or the data changed since); rerun the config instead", key=str(folder))
        raw["onnx"] = evaluate_onnx(folder / written["onnx"]["path"], outputs, evaluate_all)
    atomic_write_json(folder / "metrics.json", raw)
    return written


def _same_as_the_run(rebuilt: dict[str, Any], recorded: dict[str, Any], folder: Path) -> None:
    """The derived quantization must be the run's: the same calibrated ranges / clustering error."""
    for key in ("activation_ranges", "l1", "outliers"):
        if key in recorded and rebuilt.get(key) != recorded[key]:
            raise QbertError(f"deriving the quantization again gave other {key.replace('_', ' ')} than the run "
                             "recorded (the code or the data changed since); rerun the config instead",
                             key=str(folder))
