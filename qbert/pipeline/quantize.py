"""The stages of static post-training quantization, as the static recipes compose them:
``instrument_plan`` (prepare: quantizers in, weight ranges set), ``calibrate_activations``
(calibrate), ``freeze_activations`` (convert).

Order: weight ranges come from the weights themselves (no data); the calibration batches then run
through the network with quantized weights and floating-point activations while the activation
estimators observe (with ``calibrate.upstream_quantized``, each activation leaves its site quantized
at the range estimated so far, as the reference code calibrates); per-embedding-group sites with
``permute`` get their permutation from a first pass over the same batches (Bondarenko et al.: the
sorting happens once, before range estimation).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from qbert.config import EstimatorConfig
from qbert.errors import QbertError
from qbert.pipeline.calibrate import calibration_batches, run_calibration
from qbert.pipeline.context import StageContext
from qbert.quant.estimators import make_estimator
from qbert.quant.quantizer import Quantizer
from qbert.quant.sites import Instrumented, Site, SitePlan, instrument, pattern_matches
from qbert.quant.spec import QuantSpec

REPORTED_DIMENSIONS = "ffn.residual_sum"
"""Sites whose per-dimension ranges are reported (the outlier analysis of Bondarenko et al. sec. 3)."""


def quantizer_factory(estimators: EstimatorConfig):
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


def calibrate_activations(inst: Instrumented, ctx: StageContext) -> dict[str, Any]:
    """The activation estimators observe the calibration batches (``calibrate`` section, drawn with the
    seed); permuted per-embedding-group sites first get their permutation from a pass over the same
    batches. Returns what ran (for the report)."""
    config = ctx.config
    plan = inst.plan
    activations = inst.activations()
    batches = calibration_batches(ctx.train_features(), config.calibrate.batches, config.calibrate.batch_size,
                                  ctx.seed)
    padding = config.calibrate.padding
    run = functools.partial(run_calibration, inst.model, batches, pad_token_id=ctx.tokenizer.pad_token_id,
                            device=ctx.device, pad_to=config.finetune.max_seq_len if padding == "max_length" else None,
                            reporter=ctx.reporter)
    report: dict[str, Any] = {}
    inst.token_mask.observe_padding = padding != "excluded"
    try:
        permuted = {n: q for n, q in activations.items() if q.spec.permute}
        if permuted:
            sources = {plan.permutation_sources.get(n, n) for n in permuted}
            missing = [s for s in sources if s not in activations]
            if missing:
                raise QbertError(f"permutation source {missing[0]} is not a quantized site", key="recipe")
            for name in sources:
                activations[name].track_dimensions = True
                activations[name].dimension_ranges = (config.calibrate.permutation_ranges, config.estimator.momentum)
            report["permutation_pass"] = run(description="calibrate (permutation pass)")
            for name, q in permuted.items():
                q.set_permutation(activations[plan.permutation_sources.get(name, name)].range_permutation())
            for q in activations.values():
                q.restart_estimation()

        for name in reported_sites(inst):
            activations[name].track_dimensions = True
        if config.calibrate.upstream_quantized:
            inst.set_state("estimate_quantized", kind="activation")
        report["calibration"] = run()
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
