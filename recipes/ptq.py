"""Static post-training quantization, per tensor: W8A8, and the weight-only (W8A32) and
activation-only (W32A8) ablations of Bondarenko et al. 2021, Table 1; ``ptq`` for any bit widths.

Symmetric weights, asymmetric activations, static ranges from calibration batches, every weight
and every activation site quantized (inputs and outputs of every layer; see ``qbert inspect
sites``). The shared machinery here (site rules, ``leave_out``, the plan) is what ``mp_ptq`` and
``peg`` build on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field
from qbert.recipes.base import Quantized, Recipe, SiteRuleParams

from qbert.quant.spec import QuantSpec, SiteOverride

if TYPE_CHECKING:
    from qbert.config import ExperimentConfig

Rule = tuple[str, SiteOverride | None, str]


class StaticQuantParams(SiteRuleParams):
    """Options shared by every static (fake-quant) recipe."""

    sites: dict[str, SiteOverride | None] = Field(
        default_factory=dict,
        description="Glob pattern over site names -> changes (bits, symmetric, granularity, groups, permute, "
        "estimator) or null to keep those sites in floating point. Applied in order after the recipe's "
        "own rules; a pattern without `layer.N.` matches that site in every layer.",
    )

    leave_out: list[str] = Field(
        default_factory=list,
        description="Site families or patterns kept in floating point (the leave-one-out ablation of "
        "Bondarenko Table 2), e.g. [ffn.residual_sum] or [layer.10.ffn.residual_sum, layer.11.ffn.residual_sum].",
    )
    placement: Literal["all", "gemm", "linear"] | None = Field(
        None,
        description="Which activations are quantized: all (every site, as Bondarenko et al. simulate); gemm (the "
        "inputs of every matrix multiplication, as deployment runtimes quantize: linear layers and both attention "
        "matmuls; LayerNorm, GELU, softmax, residual sums and the embeddings sum in floating point); linear "
        "(linear-layer inputs only, Q8BERT's). null: the method's own (all; q8bert and q8bert_ptq: linear). "
        "Applied after the recipe's own rules, before `sites` and `leave_out`.",
    )


class SitePlanRecipe(Recipe):
    """Base of the recipes that put quantizers on a static site plan (post-training and QAT): bit widths, grids and
    site rules make the plan; :meth:`instrumented` puts the quantizers in. It declares no stage."""

    export_formats = ("integer", "hf", "onnx")
    fp32_evaluation = "fake quantization needs fp32 evaluation (bf16 cannot hold the quantization grid)"
    reference_code = "bondarenko2021"
    # defaults of the named recipes; ``ptq`` sets them per instance from its parameters
    weight_bits: int | None = 8
    activation_bits: int | None = 8
    weight_granularity: Literal["per_tensor", "per_channel"] = "per_tensor"

    def __init__(self, params: Any, config: ExperimentConfig):
        super().__init__(params, config)
        # recipes whose parameters name the bit widths (ptq, the low-bit and Q-BERT recipes) take them from there
        self.weight_bits = getattr(params, "weight_bits", type(self).weight_bits)
        self.activation_bits = getattr(params, "activation_bits", type(self).activation_bits)

    def weight_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=True, granularity=self.weight_granularity,
                         estimator=self.config.estimator.weights)

    def activation_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=False, estimator=self.config.estimator.activations)

    def recipe_rules(self, sites: list[Any]) -> list[Rule]:
        """The recipe's own site rules (presets); subclasses override."""
        return []

    default_placement: ClassVar[str] = "all"
    """The activations the method's paper quantizes (``recipe.placement: null``)."""

    def placement_rules(self, sites: list[Any]) -> list[Rule]:
        """Activation families outside the placement (``recipe.placement``, else the method's own) kept in
        floating point."""
        from qbert.quant.sites import PLACEMENTS

        params: StaticQuantParams = self.params  # type: ignore[assignment]
        chosen = PLACEMENTS[params.placement or self.default_placement]
        if chosen is None:
            return []
        key = "recipe.placement" if params.placement else "recipe"
        outside = dict.fromkeys(s.family for s in sites if s.kind == "activation" and s.family not in chosen)
        return [(family, None, key) for family in outside]

    def rules(self, sites: list[Any]) -> list[Rule]:
        params: StaticQuantParams = self.params  # type: ignore[assignment]
        rules = list(self.recipe_rules(sites)) + self.placement_rules(sites)
        rules += [(pattern, override, f"recipe.sites.{pattern}") for pattern, override in params.sites.items()]
        rules += [(pattern, None, "recipe.leave_out") for pattern in params.leave_out]
        return rules

    def plan(self, sites: list[Any]):
        from qbert.quant.sites import resolve_plan

        plan = resolve_plan(
            sites,
            weights=self.weight_spec(self.weight_bits) if self.weight_bits else None,
            activations=self.activation_spec(self.activation_bits) if self.activation_bits else None,
            weight_base=self.weight_spec(self.weight_bits or 8),
            activation_base=self.activation_spec(self.activation_bits or 8),
            rules=self.rules(sites),
        )
        plan.permutation_sources = self.permutation_sources(plan)
        return plan

    def permutation_sources(self, plan: Any) -> dict[str, str]:
        """PEG sites that take their permutation from another site; default: each its own."""
        return {}

    def instrumented(self, model: Any, ctx: Any) -> Quantized:
        """Quantizers on every planned site of ``model``; weight ranges set from the weights and frozen."""
        from qbert.quant.sites import enumerate_sites
        from qbert.quant.size import instrumented_size
        from qbert.quant.static import instrument_plan

        plan = self.plan(enumerate_sites(model))
        inst = instrument_plan(model, plan, self.config.estimator)
        return self.quantized(model, ctx, "simulated", instrumented=inst,
                              report={"plan": plan.totals(), "size": instrumented_size(inst)})


def calibrate_ranges(inst: Any, ctx: Any) -> dict[str, Any]:
    """Activation ranges observed on the ``calibrate`` section's batches (permutations first), as that section
    says; what ran, for the report."""
    from qbert.quant.static import calibrate_activations

    section = ctx.config.calibrate
    return calibrate_activations(inst, ctx.calibration_pass(inst.model), padding=section.padding != "excluded",
                                 permutation_ranges=section.permutation_ranges, momentum=ctx.config.estimator.momentum,
                                 upstream_quantized=section.upstream_quantized)


class StaticQuantRecipe(SitePlanRecipe):
    """Base of the static fake-quant recipes: a site plan, calibration, frozen ranges."""

    needs_calibration = True

    def prepare(self, model: Any, ctx: Any) -> Quantized:
        """Quantizers on every planned site; weight ranges set from the weights and frozen."""
        return self.instrumented(model, ctx)

    def calibrate(self, q: Quantized, ctx: Any) -> Quantized:
        """Activation ranges observed on the calibration batches (permutations first)."""
        return q.but(report=calibrate_ranges(q.instrumented, ctx))

    def convert(self, q: Quantized, ctx: Any) -> Quantized:
        """Activation ranges frozen: the simulated (fake-quantized) model that is evaluated."""
        from qbert.quant.static import freeze_activations

        return q.but(report=freeze_activations(q.instrumented))


class LowBitWeights:
    """Mixin for recipes with ``weight_bits``, ``activation_bits`` and ``embedding_bits`` parameters:
    weights on symmetric grids from the MSE estimator (Bondarenko et al. sec. 5 use MSE below 8 bits),
    the word embedding table at ``embedding_bits`` when set."""

    def weight_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=True, estimator="mse")

    def recipe_rules(self, sites: list[Any]) -> list[Rule]:
        bits = self.params.embedding_bits  # type: ignore[attr-defined]
        return [] if bits is None else [("embeddings.word.weight", SiteOverride(bits=bits), "recipe.embedding_bits")]


class PtqParams(StaticQuantParams):
    """Per-tensor static PTQ with any bit widths."""

    name: Literal["ptq"] = "ptq"
    weight_bits: int | None = Field(8, ge=2, le=16, description="Weight bits; null keeps weights in FP32.")
    activation_bits: int | None = Field(8, ge=2, le=16, description="Activation bits; null keeps them in FP32.")
    weight_granularity: Literal["per_tensor", "per_channel"] = Field(
        "per_tensor", description="Weights: one range per tensor or per output channel."
    )


class Ptq(StaticQuantRecipe):
    """Static PTQ with chosen bit widths (Bondarenko et al. 2021 sec. 3 setting)."""

    name = "ptq"
    Params = PtqParams
    source = "Bondarenko et al. 2021, sec. 3 and Table 1 (generalised bit widths)"

    def __init__(self, params: PtqParams, config: ExperimentConfig):
        super().__init__(params, config)
        self.weight_granularity = params.weight_granularity


class W8A8PtqParams(StaticQuantParams):
    """W8A8: 8-bit weights and activations."""

    name: Literal["w8a8_ptq"] = "w8a8_ptq"


class W8A8Ptq(StaticQuantRecipe):
    """8-bit symmetric per-tensor weights, 8-bit asymmetric per-tensor activations, every site."""

    name = "w8a8_ptq"
    Params = W8A8PtqParams
    source = "Bondarenko et al. 2021, Table 1 (W8A8)"


class W8A32PtqParams(StaticQuantParams):
    """W8A32: weights only."""

    name: Literal["w8a32_ptq"] = "w8a32_ptq"


class W8A32Ptq(StaticQuantRecipe):
    """8-bit weights, activations in floating point."""

    name = "w8a32_ptq"
    Params = W8A32PtqParams
    source = "Bondarenko et al. 2021, Table 1 (W8A32)"
    activation_bits = None


class W32A8PtqParams(StaticQuantParams):
    """W32A8: activations only."""

    name: Literal["w32a8_ptq"] = "w32a8_ptq"


class W32A8Ptq(StaticQuantRecipe):
    """Weights in floating point, 8-bit activations."""

    name = "w32a8_ptq"
    Params = W32A8PtqParams
    source = "Bondarenko et al. 2021, Table 1 (W32A8) and Table 2 (leave-one-out, with leave_out)"
    weight_bits = None
