"""PyTorch dynamic quantization of every linear layer: int8 weights, activations quantized per batch
at run time, real int8 kernels (the PyTorch tutorial "Dynamic quantization on BERT").

Weights are int8, symmetric per tensor; activations are quantized on the fly from each batch's
range (on x86, with ``reduce_range``: 7 bits of activation precision). Embeddings, LayerNorm,
softmax and GELU stay in FP32. Runs on the CPU. The report gives, like the tutorial's table, the
model size in MB and the evaluation time of the FP32 and the int8 model on the same evaluation
features, measured one after the other in this process.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from qbert.recipes.base import Quantized, Recipe, RecipeParams


class DynamicInt8Params(RecipeParams):
    """Dynamic int8 quantization has no parameters."""

    name: Literal["dynamic_int8"] = "dynamic_int8"


class DynamicInt8(Recipe):
    """Every nn.Linear to int8 with PyTorch dynamic quantization (int8 weights per tensor, inputs
    quantized per batch at run time); embeddings, LayerNorm, softmax and GELU stay in FP32."""

    name = "dynamic_int8"
    Params = DynamicInt8Params
    source = "PyTorch tutorial: Dynamic quantization on BERT (seed 003)"
    fp32_evaluation = "dynamic int8 kernels take fp32 inputs"
    export_formats = ("torchscript",)

    def convert(self, q: Quantized, ctx: Any) -> Quantized:
        """Every nn.Linear to PyTorch's dynamic int8 module (CPU kernels). With evaluation data at hand
        the FP32 and the int8 model are timed on it one after the other, as the tutorial does."""
        import torch

        from qbert.quant.size import state_dict_megabytes

        model = q.model.to("cpu").eval()
        features = ctx.eval_features()
        fp32_mb = state_dict_megabytes(model)
        fp32_seconds = ctx.time_inference(model)
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; it is still the tutorial's API
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            int8_mb = state_dict_megabytes(quantized)
            int8_seconds = ctx.time_inference(quantized)
        report: dict[str, Any] = {
            "engine": torch.backends.quantized.engine,
            "threads": torch.get_num_threads(),
            "size_mb": {"fp32": round(fp32_mb, 2), "int8": round(int8_mb, 2)},
        }
        if features:
            report.update({
                "eval_seconds": {"fp32": round(fp32_seconds, 3), "int8": round(int8_seconds, 3)},
                "speedup": round(fp32_seconds / int8_seconds, 3),
                "timed_split": ctx.eval_split,
                "timed_features": len(features),
            })
        return q.but(model=quantized, arithmetic="integer", device=torch.device("cpu"), report=report)
