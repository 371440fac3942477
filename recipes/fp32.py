"""The FP32 baseline: fine-tune and evaluate, no quantization."""

from __future__ import annotations

from typing import Literal

from qbert.recipes.base import Recipe, RecipeParams


class Fp32Params(RecipeParams):
    """The FP32 baseline has no parameters."""

    name: Literal["fp32"] = "fp32"


class Fp32(Recipe):
    """Full-precision baseline, the reference row of every table."""

    name = "fp32"
    Params = Fp32Params
    source = "baseline of all seed papers (Q8BERT, GOBO, Bondarenko et al. 2021)"
    export_formats = ("hf", "onnx")
