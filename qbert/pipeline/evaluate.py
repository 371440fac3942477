"""The evaluate stage: batched, dynamically padded inference, then the task's official metrics."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parametrize

from qbert.pipeline.batching import model_inputs, pad_batch, sorted_batches
from qbert.pipeline.finetune import autocast
from qbert.progress import SILENT, Reporter
from qbert.tasks import EvalOutput, Task
from qbert.tasks.features import encode_cached


def predict(
    model: torch.nn.Module, features: list[dict[str, Any]], *, question_answering: bool, batch_size: int,
    pad_token_id: int, device: torch.device, precision: str = "fp32", reporter: Reporter = SILENT,
) -> Any:
    """Model outputs per feature in the features' order.

    Classification/regression: an array of logits ``[n_features, n_labels]``. Question answering:
    a list of ``(start_logits, end_logits)`` arrays, each trimmed to its feature's length.
    """
    model.eval()
    lengths = [len(f["input_ids"]) for f in features]
    results: list[Any] = [None] * len(features)
    batches = list(sorted_batches(lengths, batch_size))
    # parametrize.cached: fake-quantized weights are computed once per evaluation, not once per batch
    with torch.inference_mode(), parametrize.cached(), reporter.bar("evaluate", len(batches)) as advance:
        for indices in batches:
            batch = pad_batch([features[i] for i in indices], pad_token_id)
            with autocast(device, precision):
                out = model(**model_inputs(batch, device, with_targets=False))
            if question_answering:
                starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
                for row, i in enumerate(indices):
                    results[i] = (starts[row, : lengths[i]], ends[row, : lengths[i]])
            else:
                logits = out.logits.float().cpu().numpy()
                for row, i in enumerate(indices):
                    results[i] = logits[row]
            advance(1)
    return results if question_answering else np.stack(results)


def evaluate(
    model: torch.nn.Module, task: Task, tokenizer: Any, examples: list[Any], *, batch_size: int,
    max_len: int, device: torch.device, precision: str = "fp32", clamp: bool = False, reporter: Reporter = SILENT,
    features: Path | None = None, split: str = "dev",
) -> tuple[EvalOutput, dict[str, Any]]:
    """Score ``model`` on ``examples``; returns the task's output and timing facts. ``clamp``: regression
    predictions are clamped to the task's label range first. ``features``: the tokenized-features cache
    (:mod:`qbert.tasks.features`; ``split`` names its file), None tokenizes every time."""
    encoded = encode_cached(task.encode_eval, tokenizer, examples, max_len, features, f"{task.name}-{split}")
    start = time.perf_counter()
    outputs = predict(
        model, encoded, question_answering=task.head == "question_answering", batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id, device=device, precision=precision, reporter=reporter,
    )
    seconds = time.perf_counter() - start
    if clamp and task.label_range is not None:
        outputs = np.clip(outputs, *task.label_range)
    result = task.score(examples, encoded, outputs)
    result.outputs = outputs
    return result, {"examples": len(examples), "features": len(encoded), "seconds": round(seconds, 3)}


def evaluate_splits(
    model: torch.nn.Module, task: Task, tokenizer: Any, data: Any, *, batch_size: int, max_len: int,
    device: torch.device, precision: str = "fp32", clamp: bool = False, reporter: Reporter = SILENT,
    features: Path | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, EvalOutput]]:
    """Every evaluation split of ``task`` that the data has and that has examples (``data``: the config's
    data section): the metrics (x100, 4 decimals; later splits' names carry the split as a suffix), the
    timing facts and the outputs, by split. A missing later split (MNLI without dev_mismatched) has no
    metrics: :meth:`~qbert.tasks.base.Task.missing_splits` says why."""
    metrics: dict[str, float] = {}
    facts: dict[str, dict[str, Any]] = {}
    outputs: dict[str, EvalOutput] = {}
    present = task.present_splits(data)
    for i, split in enumerate(task.eval_splits):
        if split not in present:
            continue
        examples = task.load(split, data)
        if not examples:
            continue
        output, info = evaluate(model, task, tokenizer, examples, batch_size=batch_size, max_len=max_len,
                                device=device, precision=precision, clamp=clamp, reporter=reporter,
                                features=features, split=split)
        suffix = "" if i == 0 else f"_{split}"
        metrics.update({f"{name}{suffix}": round(value, 4) for name, value in output.metrics.items()})
        facts[split], outputs[split] = info, output
    return metrics, facts, outputs


def agreement(reference: EvalOutput, other: EvalOutput) -> dict[str, Any]:
    """How closely ``other`` reproduces ``reference`` on the same examples: the share of equal
    per-example predictions and the largest absolute difference of the raw outputs."""
    pairs = list(zip(reference.predictions, other.predictions, strict=True))
    equal = sum(a.get("prediction") == b.get("prediction") for a, b in pairs)
    if isinstance(reference.outputs, np.ndarray):
        largest = float(np.abs(reference.outputs - other.outputs).max()) if len(reference.outputs) else 0.0
    else:  # question answering: (start, end) logits per feature
        largest = max((float(np.abs(a - b).max()) for ra, rb in zip(reference.outputs, other.outputs, strict=True)
                       for a, b in zip(ra, rb, strict=True)), default=0.0)
    return {"equal_predictions": round(equal / len(pairs), 6) if pairs else 1.0, "examples": len(pairs),
            "max_abs_output_diff": largest}
