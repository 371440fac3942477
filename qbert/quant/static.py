"""The stage bodies of static quantization, as recipes compose them: ``instrument_plan`` (quantizers in,
weight ranges set), ``calibrate_activations`` (activation estimators observe calibration passes),
``freeze_activations`` (ranges frozen, with the outlier report), ``range_weights``.

Order: weight ranges come from the weights themselves (no data); the calibration batches then run
through the network with quantized weights and floating-point activations while the activation
estimators observe (with ``upstream_quantized``, each activation leaves its site quantized at the range
estimated so far, as the reference code calibrates); per-embedding-group sites with ``permute`` get their
permutation from a first pass over the same batches (Bondarenko et al.: the sorting happens once, before
range estimation). The passes themselves (which batches, padded how, on which device) are the caller's:
a function ``run_pass(description) -> what ran``, which the pipeline's stage context provides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from qbert.errors import QbertError
from qbert.quant.estimators import make_estimator
from qbert.quant.quantizer import Quantizer
from qbert.quant.sites import Instrumented, Site, SitePlan, instrument, pattern_matches
from qbert.quant.spec import QuantSpec

if TYPE_CHECKING:
    from qbert.config import EstimatorConfig

REPORTED_DIMENSIONS = "ffn.residual_sum"
"""Sites whose per-dimension ranges are reported (the outlier analysis of Bondarenko et al. sec. 3)."""


def quantizer_factory(estimators: EstimatorConfig) -> Callable[[Site, QuantSpec], Quantizer]:
    """Builds the quantizer of a site from its spec and the config's estimator settings."""

    def make(site: Site, spec: QuantSpec) -> Quantizer:
        estimator = make_estimator(
            spec.estimator, bits=spec.bits, symmetric=spec.symmetric, momentum=estimators.momentum,
            mse_search=estimators.mse_search, mse_candidates=estimators.mse_candidates,
            percentile=estimators.percentile,
        )
        channel_dim = 0 if site.kind == "weight" else -1
        return Quantizer(spec, estimator, channels=site.channels, channel_dim=channel_dim, site=site.name)

    return make


@torch.no_grad()
def range_weights(inst: Instrumented) -> None:
    """Set every weight quantizer's range from its tensor and freeze it."""
    for name, q in inst.weights().items():
        q.observe(inst.weight_tensors[name])
        q.freeze()


def instrument_plan(model: torch.nn.Module, plan: SitePlan, estimators: EstimatorConfig) -> Instrumented:
    """Quantizers on every site of ``plan`` (activations estimating), weight ranges set and frozen."""
    inst = instrument(model, plan, quantizer_factory(estimators))
    range_weights(inst)
    return inst


def calibrate_activations(
    inst: Instrumented, run_pass: Callable[..., dict[str, Any]], *, padding: bool = False,
    permutation_ranges: Literal["all", "ema", "last"] = "all", momentum: float = 0.9,
    upstream_quantized: bool = False,
) -> dict[str, Any]:
    """The activation estimators observe the calibration passes (``run_pass(description=...)`` runs the batches
    through ``inst.model``); permuted per-embedding-group sites first get their permutation from a pass of their
    own. ``padding``: padded positions are observed too; ``permutation_ranges`` and ``momentum``: how a
    permutation source accumulates its per-dimension ranges. Returns what ran (for the report)."""
    plan = inst.plan
    activations = inst.activations()
    report: dict[str, Any] = {}
    inst.token_mask.observe_padding = padding
    try:
        permuted = {n: q for n, q in activations.items() if q.spec.permute}
        if permuted:
            sources = {plan.permutation_sources.get(n, n) for n in permuted}
            missing = [s for s in sources if s not in activations]
            if missing:
                raise QbertError(f"permutation source {missing[0]} is not a quantized site", key="recipe")
            for name in sources:
                activations[name].track_dimensions = True
                activations[name].dimension_ranges = (permutation_ranges, momentum)
            report["permutation_pass"] = run_pass(description="calibrate (permutation pass)")
            for name, q in permuted.items():
                q.set_permutation(activations[plan.permutation_sources.get(name, name)].range_permutation())
            for q in activations.values():
                q.restart_estimation()

        for name in reported_sites(inst):
            activations[name].track_dimensions = True
        if upstream_quantized:
            inst.set_state("estimate_quantized", kind="activation")
        report["calibration"] = run_pass()
    finally:
        inst.token_mask.observe_padding = False
    return report


def reported_sites(inst: Instrumented) -> list[str]:
    """Quantized activation sites whose per-dimension ranges are reported."""
    activations = inst.activations()
    return [s.name for s in inst.plan.sites
            if s.kind == "activation" and pattern_matches(REPORTED_DIMENSIONS, s) and s.name in activations]


def freeze_activations(inst: Instrumented) -> dict[str, Any]:
    """Every activation quantizer's range from its estimator, frozen; the ranges and the outlier report."""
    activations = inst.activations()
    for name, q in activations.items():
        if not q.estimator.observed:
            raise QbertError(f"site {name} saw no calibration data; keep it in floating point (null)", key="recipe")
        q.freeze()
    return {
        "activation_ranges": {
            name: [round(float(lo.min()), 4), round(float(hi.max()), 4)]
            for name, q in activations.items()
            for lo, hi in [q.quant_range()]
        },
        "outlier_dimensions": {name: dimension_report(activations[name]) for name in reported_sites(inst)},
    }


def dimension_report(q: Quantizer, top: int = 4) -> dict[str, Any]:
    """The widest embedding dimensions of a site next to the median width (structured outliers)."""
    if q.dim_lo is None or q.dim_hi is None:
        return {}
    width = q.dim_hi - q.dim_lo
    order = torch.argsort(width, descending=True)[:top]
    return {
        "range": [round(float(q.dim_lo.min()), 3), round(float(q.dim_hi.max()), 3)],
        "median_dimension_width": round(float(width.median()), 3),
        "widest": [
            {"dim": int(d), "min": round(float(q.dim_lo[d]), 3), "max": round(float(q.dim_hi[d]), 3)} for d in order
        ],
    }
