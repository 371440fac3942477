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

import copy
from typing import Any, Literal

from pydantic import Field
from qbert.recipes.ptq import LowBitWeights, StaticQuantParams, StaticQuantRecipe


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


class AdaRound(LowBitWeights, StaticQuantRecipe):
    """W4A32 PTQ with learned rounding of every linear layer."""

    name = "adaround"
    Params = AdaRoundParams
    source = "Nagel et al. 2020 (AdaRound), as in Bondarenko et al. 2021 Table 7 (W4A32 AdaRound)"

    def prepare(self, model, ctx):
        float_model = copy.deepcopy(model).eval()  # the reconstruction targets come from the float model
        return super().prepare(model, ctx).but(reference=float_model)

    def calibrate(self, q, ctx):
        """Learned rounding of every linear layer, then the activation calibration (when activations are
        quantized)."""
        rounding = self.round_weights(q.instrumented, q.reference, ctx)
        return super().calibrate(q.but(reference=None, report={"rounding": rounding}), ctx)

    def round_weights(self, inst: Any, float_model: Any, ctx: Any) -> dict[str, Any]:
        import torch

        from qbert.quant.adaround import AdaRoundSettings, adaround_model
        from qbert.quant.sites import weight_modules

        p: AdaRoundParams = self.params  # type: ignore[assignment]
        settings = AdaRoundSettings(iterations=p.iterations, batch_tokens=p.batch_tokens, lr=p.lr,
                                    weight=p.reg_weight, warmup=p.warmup)
        chunk = 32
        drawn = ctx.calibration_batches(-(-p.sequences // chunk), chunk)
        flat = [f for b in drawn for f in b][: p.sequences]
        batches = ctx.model_batches([flat[i:i + chunk] for i in range(0, len(flat), chunk)])
        generator = torch.Generator().manual_seed(ctx.seed)
        modules = weight_modules(inst.model)
        layers = sum(isinstance(modules[site], torch.nn.Linear) for site in inst.weights())
        with ctx.reporter.bar("adaround layers", layers) as advance:
            rounded = adaround_model(inst, float_model, batches, settings, generator, ctx.log,
                                     on_layer=lambda _: advance(1))
        return {"sequences": len(flat), "iterations": p.iterations, "batch_tokens": p.batch_tokens, **rounded}
