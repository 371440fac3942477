"""AdaRound (Nagel et al. 2020) as used in Bondarenko et al. 2021, Table 7: W4A32 post-training
quantization with learned rounding.

Every weight gets a symmetric per-tensor 4-bit grid from the MSE estimator (as W4A32 PTQ); then
each linear layer, in forward order, learns its rounding (:mod:`qbert.quant.adaround`) on the
calibration sequences, with its input taken from the model whose earlier layers are already
rounded and its target from the floating-point model. The embedding tables (a lookup: the output
is the table itself, so the reconstruction objective is nearest rounding) keep nearest rounding.

The paper used 1024 sequences and 10^4 iterations per layer; the defaults here (256 sequences,
1,000 iterations of 256 tokens) finish in a few minutes per model on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Literal

import torch
from pydantic import Field

from recipes.ptq import LowBitWeights, StaticQuantParams, StaticQuantRecipe


class AdaRoundParams(StaticQuantParams):
    """Bit widths, calibration data and optimisation settings of AdaRound."""

    name: Literal["adaround"] = "adaround"
    weight_bits: int = Field(4, ge=2, le=8, description="Bits of every weight.")
    activation_bits: int | None = Field(None, ge=2, le=16, description="Activation bits; null = floating point.")
    embedding_bits: int | None = Field(None, ge=2, le=8, description="Word embedding bits; null = weight_bits.")
    sequences: int = Field(256, gt=0, description="Calibration sequences (training split, seeded; paper: 1024).")
    iterations: int = Field(1000, gt=0, description="Optimisation steps per layer (paper: 10^4).")
    batch_tokens: int = Field(256, gt=0, description="Tokens per optimisation step.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the rounding variables.")
    reg_weight: float = Field(0.01, gt=0, description="lambda: weight of the rounding regulariser.")
    warmup: float = Field(0.2, ge=0, lt=1, description="Fraction of iterations without the regulariser.")


class _Captured(Exception):
    """Stops a forward pass once the layer of interest has seen its input."""


def _valid_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token rows of ``x`` (``[batch, length, d]`` -> valid tokens; ``[batch, d]`` as is)."""
    if x.dim() == 3:
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def capture(model: torch.nn.Module, module: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
            with_output: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (and outputs) of ``module`` over ``batches``, valid tokens only, stopping each forward
    pass at the module."""
    inputs, outputs = [], []
    current: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.append(_valid_rows(args[0], current["mask"]).float())
        if with_output:
            outputs.append(_valid_rows(out, current["mask"]).float())
        raise _Captured

    handle = module.register_forward_hook(hook)
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            with contextlib.suppress(_Captured):  # the hook stops the forward pass once it has the layer's input
                model(**batch)
    finally:
        handle.remove()
    return torch.cat(inputs), (torch.cat(outputs) if with_output else None)


class AdaRound(LowBitWeights, StaticQuantRecipe):
    """W4A32 PTQ with learned rounding of every linear layer."""

    name = "adaround"
    Params = AdaRoundParams
    source = "Nagel et al. 2020 (AdaRound), as in Bondarenko et al. 2021 Table 7 (W4A32 AdaRound)"

    def quantize(self, model, ctx):
        from qbert.pipeline.quantize import quantize_ptq
        from qbert.quant.sites import enumerate_sites

        float_model = copy.deepcopy(model).eval()
        self._inst, self._report = quantize_ptq(
            model, self.site_plan(enumerate_sites(model)), ctx,
            round_weights=lambda inst: self.round_weights(inst, float_model, ctx),
        )
        return model

    def round_weights(self, inst: Any, float_model: torch.nn.Module, ctx: Any) -> dict[str, Any]:
        from qbert.pipeline.batching import model_inputs, pad_batch
        from qbert.pipeline.calibrate import calibration_batches
        from qbert.quant.adaround import AdaRoundSettings, adaround_layer
        from qbert.quant.sites import weight_modules

        p: AdaRoundParams = self.params  # type: ignore[assignment]
        settings = AdaRoundSettings(iterations=p.iterations, batch_tokens=p.batch_tokens, lr=p.lr,
                                    weight=p.reg_weight, warmup=p.warmup)
        chunk = 32
        drawn = calibration_batches(ctx.train_features, -(-p.sequences // chunk), chunk, ctx.seed)
        flat = [f for b in drawn for f in b][: p.sequences]
        batches = [model_inputs(pad_batch(flat[i:i + chunk], ctx.tokenizer.pad_token_id), ctx.device, False)
                   for i in range(0, len(flat), chunk)]
        generator = torch.Generator().manual_seed(ctx.seed)
        quantized_modules, float_modules = weight_modules(inst.model), weight_modules(float_model)
        inst.model.eval()
        start = time.perf_counter()
        layers: dict[str, Any] = {}
        for site, q in inst.weights().items():
            module = quantized_modules[site]
            if not isinstance(module, torch.nn.Linear):
                continue  # embedding tables: nearest rounding
            ctx.log.info("adaround %s", site)
            _, target = capture(float_model, float_modules[site], batches, with_output=True)
            x_q, _ = capture(inst.model, module, batches, with_output=False)
            original = inst.weight_tensors[site]
            result = adaround_layer(original, module.bias, q.scale.view(-1, 1), q.qmin, q.qmax, x_q, target,
                                    settings, generator)
            with torch.no_grad():
                original.copy_(result.codes * q.scale.view(-1, 1))
            layers[site] = {
                "tokens": len(x_q), "nearest_mse": result.nearest_error, "adaround_mse": result.adaround_error,
                "changed": round(result.changed, 4), "rounded_up": round(result.rounded_up, 4),
                "seconds": round(result.seconds, 2),
            }
        improved = sum(v["adaround_mse"] < v["nearest_mse"] for v in layers.values())
        return {"sequences": len(flat), "iterations": p.iterations, "batch_tokens": p.batch_tokens,
                "layers_improved": f"{improved}/{len(layers)}", "seconds": round(time.perf_counter() - start, 2),
                "layers": layers}
