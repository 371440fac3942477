"""The calibrate stage: N seeded batches of B training sequences through the model, no gradients.

Quantizers in the ``estimate`` state observe what passes; padding positions are masked out of
their statistics by the quantizers themselves (see :mod:`qbert.quant.sites`) unless
``calibrate.padding`` says to observe them.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from qbert.pipeline.batching import model_inputs, pad_batch
from qbert.progress import SILENT, Reporter


def calibration_batches(
    features: list[dict[str, Any]], batches: int, batch_size: int, seed: int
) -> list[list[dict[str, Any]]]:
    """``batches`` batches of ``batch_size`` distinct training features, drawn with ``seed``.

    With fewer features than needed, draws repeat only after every feature was used once.
    """
    if not features:
        raise ValueError("calibration needs training examples; the training split is empty")
    rng = random.Random(seed)
    needed = batches * batch_size
    order: list[int] = []
    while len(order) < needed:
        block = list(range(len(features)))
        rng.shuffle(block)
        order.extend(block)
    chosen = order[:needed]
    return [[features[i] for i in chosen[b * batch_size : (b + 1) * batch_size]] for b in range(batches)]


def run_calibration(
    model: torch.nn.Module, batches: list[list[dict[str, Any]]], *, pad_token_id: int, device: torch.device,
    pad_to: int | None = None, reporter: Reporter = SILENT, description: str = "calibrate",
) -> dict[str, Any]:
    """Forward every batch in fp32 eval mode (padded to the longest sequence, or to ``pad_to``); returns
    what was run (for metrics.json)."""
    model.eval()
    start = time.perf_counter()
    tokens = positions = 0
    with torch.inference_mode(), reporter.bar(description, len(batches)) as advance:
        for batch_features in batches:
            batch = pad_batch(batch_features, pad_token_id, pad_to)
            tokens += int(batch["attention_mask"].sum())
            positions += batch["attention_mask"].numel()
            model(**model_inputs(batch, device, with_targets=False))
            advance(1)
    return {
        "batches": len(batches),
        "batch_size": len(batches[0]) if batches else 0,
        "sequences": sum(len(b) for b in batches),
        "tokens": tokens,
        "padding": positions - tokens,
        "seconds": round(time.perf_counter() - start, 3),
    }
