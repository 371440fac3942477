"""The one place the order of a method's stages is written: prepare -> calibrate -> [train] -> convert.

``qbert run`` (:func:`qbert.pipeline.run.run_seed`), the Python API (:mod:`qbert.api`), the precision search
and re-export of finished runs all go through :func:`run_stages` (the API's ``prepare`` / ``convert`` through
its two halves, :func:`prepared` and :func:`converted`, with the user's own training loop between them).

Calibration comes before training: the QAT of Bondarenko et al. starts from the ranges static PTQ calibrates
(``w8a8_qat``, ``w4a8_qat``: calibrate sets them and makes them trainable), and Q-BERT's activation ranges start
there too; Q8BERT's ranges come from training alone (its recipe declares no calibrate stage). Convert freezes
what training learned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from qbert.errors import QbertError
from qbert.recipes import Quantized, Recipe, Training


def prepared(recipe: Recipe, model: Any, ctx: Any) -> Quantized:
    """``prepare`` then ``calibrate``: quantizers in with their starting ranges (a QAT recipe: ready to train)."""
    return recipe.calibrate(recipe.prepare(model, ctx), ctx)


def converted(recipe: Recipe, q: Quantized, ctx: Any) -> Quantized:
    """``convert``: what is evaluated and exported (ranges frozen, codes decoded, integer modules in)."""
    return recipe.convert(q, ctx)


def run_stages(recipe: Recipe, model: Any, ctx: Any, *,
               train: Callable[[Quantized, Training], dict[str, Any]] | None = None,
               timings: dict[str, float] | None = None) -> tuple[Quantized, dict[str, Any] | None]:
    """Every stage of ``recipe`` on ``model``; a recipe that trains (QAT) calls ``train(q, recipe.training(...))``
    between calibrate and convert. Returns the converted value and what training returned (None without).
    ``timings`` (when given) gets ``quantize`` (the stages' seconds) and ``qat`` (training's)."""
    if recipe.trains and train is None:
        raise QbertError(f"recipe {recipe.name} trains with quantizers in place: use qbert.prepare(...), train "
                         "q.model, then qbert.convert(q); or qbert.run(config) for the whole pipeline", key="recipe")
    timings = {} if timings is None else timings
    start = time.perf_counter()
    q = prepared(recipe, model, ctx)
    trained, training_seconds = None, 0.0
    if recipe.trains:
        began = time.perf_counter()
        trained = train(q, recipe.training(q, ctx.config.finetune))
        training_seconds = time.perf_counter() - began
        timings["qat"] = round(training_seconds, 2)
    q = converted(recipe, q, ctx)
    timings["quantize"] = round(time.perf_counter() - start - training_seconds, 2)
    return q, trained
