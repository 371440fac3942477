"""Q-BERT (Shen et al. 2020): Hessian-aware mixed precision and group-wise weight quantization, then
quantization-aware fine-tuning; the Q-BERT rows of Bondarenko et al. 2021 Table 6 and of GOBO Table III.

1. **Sensitivity** (with ``mixed``): for each encoder layer, the top eigenvalue of the Hessian of the training loss
   with respect to the layer's six weight matrices, by power iteration on Hessian-vector products
   (:mod:`qbert.quant.hessian`), on ``hessian.batches`` training batches of ``hessian.batch_size`` drawn with the
   seed, from the fine-tuned FP32 model in eval mode; Q-BERT's sensitivity ``Omega = |mean| + std`` over the
   batches.
2. **Bits**: without ``mixed``, every encoder weight at ``weight_bits``. With ``mixed: {bits: [2, 3], average:
   2.5}``, every layer starts at the lowest bits; then, most sensitive layer first, each is raised one level while
   the encoder's weight bits (averaged over its weights) stay within ``average``; further levels the same way.
   The report lists each layer's eigenvalues, Omega and bits.
3. **Grids**: encoder (and pooler) weights symmetric and group-wise: ``groups`` groups of consecutive output rows
   per matrix share a range (Q-BERT: 128), ranged from the current weights at every training step (min-max);
   the embedding tables at ``embedding_bits`` (8, as GOBO Table III's Q-BERT rows) per tensor; the last fully
   connected layer (the classifier) in FP32 (Bondarenko Table 6's note); every activation at
   ``activation_bits`` per tensor, asymmetric, its range initialised by calibration and then an exponential moving
   average of each training batch's min and max (``estimator.momentum``), frozen at evaluation.
4. **QAT** from the fine-tuned FP32 checkpoint: the fine-tune loop with the quantizers in place (``lr``,
   ``batch_size``, ``epochs``: the recipe's, else the finetune section's).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from qbert.recipes.base import Quantized
from qbert.recipes.ptq import Rule, calibrate_ranges
from qbert.recipes.qat import QatParams, QatRecipe, quantizer_ranges

from qbert.quant.spec import QuantSpec, SiteOverride


class MixedBits(BaseModel):
    """Hessian-guided bit allocation over the encoder layers."""

    model_config = ConfigDict(extra="forbid")

    bits: list[int] = Field(description="The bit widths layers may get, e.g. [2, 3].", min_length=2)
    average: float = Field(gt=0, description="Budget: the highest average bits of the encoder's weights.")

    @model_validator(mode="after")
    def _valid(self) -> MixedBits:
        if any(b < 2 or b > 8 for b in self.bits) or len(set(self.bits)) != len(self.bits):
            raise ValueError("mixed.bits: distinct widths from 2 to 8, e.g. [2, 3]")
        if not min(self.bits) <= self.average <= max(self.bits):
            raise ValueError(f"mixed.average: between {min(self.bits)} and {max(self.bits)} (the widths in bits)")
        return self


class HessianSettings(BaseModel):
    """Where the Hessian spectrum is measured."""

    model_config = ConfigDict(extra="forbid")

    batches: int = Field(4, gt=0, description="Training batches, each giving one top eigenvalue per layer.")
    batch_size: int = Field(8, gt=0, description="Sequences per batch.")
    iterations: int = Field(20, gt=0, description="Most power iterations per eigenvalue.")
    tol: float = Field(1e-3, gt=0, description="Stop when the eigenvalue changes by less than this, relatively.")


class QBertParams(QatParams):
    """Q-BERT: bits (uniform or Hessian-guided), group-wise weights, 8-bit embeddings and activations."""

    name: Literal["q_bert"] = "q_bert"
    weight_bits: int = Field(8, ge=2, le=8, description="Bits of every encoder weight (without `mixed`).")
    mixed: MixedBits | None = Field(None, description="Hessian-guided per-layer bits; null = weight_bits everywhere.")
    hessian: HessianSettings = Field(default_factory=HessianSettings, description="The spectrum's batches.")
    groups: int = Field(128, gt=0, description="Groups of output rows per weight matrix sharing a range "
                        "(must divide each matrix's rows).")
    embedding_bits: int = Field(8, ge=2, le=8, description="Bits of the three embedding tables (per tensor).")
    activation_bits: int | None = Field(8, ge=2, le=16, description="Activation bits; null = floating point.")
    layer_bits: dict[int, int] | None = Field(
        None, description="Bits per encoder layer, e.g. {0: 3, 1: 2, ...} (what `mixed` chooses; set it to pin an "
        "allocation); layers not named take weight_bits.")

    @model_validator(mode="after")
    def _one_allocation(self) -> QBertParams:
        if self.mixed is not None and self.layer_bits is not None:
            raise ValueError("set either mixed (the Hessian chooses the bits) or layer_bits (you do), not both")
        if self.layer_bits and any(b < 2 or b > 8 for b in self.layer_bits.values()):
            raise ValueError("layer_bits: bits from 2 to 8")
        return self


def allocate_bits(omega: dict[int, float], sizes: dict[int, int], bits: list[int], average: float) -> dict[int, int]:
    """Per-layer bits: every layer at the lowest width, then, most sensitive (largest ``omega``) first, each layer
    raised one width while the size-weighted average of the bits stays within ``average``; repeated per width."""
    widths = sorted(bits)
    chosen = {layer: widths[0] for layer in omega}
    total = sum(sizes.values())
    ranking = sorted(omega, key=lambda layer: (-omega[layer], layer))
    for level in widths[1:]:
        for layer in ranking:
            if chosen[layer] >= level:
                continue
            trial = {**chosen, layer: level}
            if sum(trial[i] * sizes[i] for i in trial) / total <= average + 1e-9:
                chosen = trial
    return chosen


class QBert(QatRecipe):
    """Q-BERT: group-wise weights at Hessian-allocated (or uniform) bits, 8-bit embeddings and activations, QAT."""

    name = "q_bert"
    Params = QBertParams
    source = "Shen et al. 2020 (Q-BERT); Bondarenko et al. 2021 Table 6 (Q-BERT W8A8 QAT row); GOBO Table III"

    def weight_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=True, granularity="per_channel", groups=self.params.groups,
                         estimator="minmax")

    def activation_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=False, estimator="running_minmax")

    def recipe_rules(self, sites: list[Any]) -> list[Rule]:
        params: QBertParams = self.params  # type: ignore[assignment]
        embeddings = SiteOverride(bits=params.embedding_bits, granularity="per_tensor")
        rules: list[Rule] = [("embeddings.*.weight", embeddings, "recipe.embedding_bits")]
        rules += [(f"layer.{layer}.*.weight", SiteOverride(bits=bits), "recipe.layer_bits")
                  for layer, bits in sorted((params.layer_bits or {}).items())]
        if any(s.name == "head.output.weight" for s in sites):
            rules.append(("head.output.weight", None, "recipe"))  # the last fully connected layer in FP32
        return rules

    def prepare(self, model: Any, ctx: Any) -> Quantized:
        """The Hessian allocation (with ``mixed``), then quantizers in on the plan of the chosen bits."""
        self.set_dropout(model)
        recipe, report = self, {"training": self.training_settings()}
        if self.params.mixed is not None:  # the plan of the bits the Hessian chose
            layer_bits, report["sensitivity"] = self.allocate(model, ctx)
            recipe = type(self)(self.params.model_copy(update={"mixed": None, "layer_bits": layer_bits}), self.config)
        return recipe.instrumented(model, ctx).but(report=report)

    def calibrate(self, q: Quantized, ctx: Any) -> Quantized:
        """Activation ranges calibrated as static PTQ does, then every quantizer re-ranging while it trains
        (weights from themselves, activations by their EMA)."""
        report = calibrate_ranges(q.instrumented, ctx) if self.activation_bits else {}
        q.instrumented.set_state("estimate_train")
        return q.but(report=report)

    def allocate(self, model: Any, ctx: Any) -> tuple[dict[int, int], dict[str, Any]]:
        """Each encoder layer's bits from its Hessian spectrum on training batches, and the report."""
        import time

        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from qbert.quant.hessian import block_spectra
        from qbert.quant.sites import weight_modules

        settings: QBertParams = self.params  # type: ignore[assignment]
        start = time.perf_counter()
        modules = weight_modules(model)
        layers = sorted({int(name.split(".")[1]) for name in modules if name.startswith("layer.")})
        blocks = {layer: [m.weight for name, m in modules.items() if name.startswith(f"layer.{layer}.")]
                  for layer in layers}
        batches = ctx.model_batches(ctx.calibration_batches(settings.hessian.batches, settings.hessian.batch_size),
                                    with_targets=True)
        was_training = model.training
        model.eval()  # no dropout: every product differentiates the same function
        try:
            # fp32, and attention by its math kernel (the fused CPU kernels have no second derivative)
            with torch.autocast(ctx.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
                spectra = block_spectra(lambda batch: model(**batch).loss, batches, blocks,
                                        settings.hessian.iterations, settings.hessian.tol, seed=ctx.seed)
        finally:
            model.train(was_training)
        sizes = {layer: sum(p.numel() for p in blocks[layer]) for layer in layers}
        omega = {layer: spectra[layer].omega for layer in layers}
        bits = allocate_bits(omega, sizes, settings.mixed.bits, settings.mixed.average)
        average = sum(bits[i] * sizes[i] for i in layers) / sum(sizes.values())
        ctx.log.info("q_bert: Hessian spectra of %d layers on %d batches in %.1f s; Omega %s; bits %s (average %.3f)",
                     len(layers), settings.hessian.batches, time.perf_counter() - start,
                     ", ".join(f"{omega[i]:.4g}" for i in layers), ", ".join(str(bits[i]) for i in layers), average)
        return bits, {
            "layers": {str(layer): {**spectra[layer].as_dict(), "bits": bits[layer]} for layer in layers},
            "ranking": sorted(layers, key=lambda layer: (-omega[layer], layer)),
            "average_bits": round(average, 4),
            "batches": settings.hessian.batches, "batch_size": settings.hessian.batch_size,
            "seconds": round(time.perf_counter() - start, 1),
        }

    def convert(self, q: Quantized, ctx: Any) -> Quantized:
        """The trained weights ranged once more (their own groups' min-max), activation ranges frozen."""
        from qbert.quant.size import instrumented_size
        from qbert.quant.static import range_weights

        inst = q.instrumented
        range_weights(inst)
        inst.set_state("fixed", kind="activation")
        return q.but(report={"ranges": quantizer_ranges(q), "size": instrumented_size(inst)})
