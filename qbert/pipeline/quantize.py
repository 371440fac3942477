"""The quantize stage for static post-training quantization: quantizers in, weights ranged,
activations calibrated, everything frozen.

Order: weight ranges come from the weights themselves (no data); the calibration batches then run
through the network with quantized weights and floating-point activations while the activation
estimators observe; per-embedding-group sites with ``permute`` get their permutation from a first
pass over the same batches (Bondarenko et al.: the sorting happens once, before range estimation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qbert.config import EstimatorConfig
from qbert.errors import QbertError
from qbert.pipeline.calibrate import calibration_batches, run_calibration
from qbert.pipeline.context import StageContext
from qbert.quant.estimators import make_estimator
from qbert.quant.quantizer import Quantizer
from qbert.quant.sites import Instrumented, Site, SitePlan, instrument, pattern_matches
from qbert.quant.size import instrumented_size
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


def quantize_ptq(
    model: torch.nn.Module, plan: SitePlan, ctx: StageContext,
    round_weights: Callable[[Instrumented], dict[str, Any]] | None = None,
) -> tuple[Instrumented, dict[str, Any]]:
    """Static PTQ of ``model`` following ``plan``; returns the instrumented model and a report.

    ``round_weights(inst)`` (AdaRound) runs after the weight ranges are set and before the
    activations are calibrated; its report is kept under ``rounding``.
    """
    config = ctx.config
    inst = instrument(model, plan, quantizer_factory(config.estimator))
    range_weights(inst)
    report: dict[str, Any] = {"plan": plan.totals(), "size": instrumented_size(inst)}
    if round_weights is not None:
        report["rounding"] = round_weights(inst)
    activations = inst.activations()
    batches = calibration_batches(ctx.train_features, config.calibrate.batches, config.calibrate.batch_size, ctx.seed)
    pad = ctx.tokenizer.pad_token_id

    permuted = {n: q for n, q in activations.items() if q.spec.permute}
    if permuted:
        sources = {plan.permutation_sources.get(n, n) for n in permuted}
        missing = [s for s in sources if s not in activations]
        if missing:
            raise QbertError(f"permutation source {missing[0]} is not a quantized site", key="recipe")
        for name in sources:
            activations[name].track_dimensions = True
        report["permutation_pass"] = run_calibration(model, batches, pad_token_id=pad, device=ctx.device)
        for name, q in permuted.items():
            q.set_permutation(activations[plan.permutation_sources.get(name, name)].range_permutation())
        for q in activations.values():
            q.restart_estimation()

    reported = [s.name for s in plan.sites if s.kind == "activation" and pattern_matches(REPORTED_DIMENSIONS, s)]
    for name in reported:
        if name in activations:
            activations[name].track_dimensions = True
    report["calibration"] = run_calibration(model, batches, pad_token_id=pad, device=ctx.device)
    for name, q in activations.items():
        if not q.estimator.observed:
            raise QbertError(f"site {name} saw no calibration data; keep it in floating point (null)", key="recipe")
        q.freeze()
    report["activation_ranges"] = {
        name: [round(float(lo.min()), 4), round(float(hi.max()), 4)]
        for name, q in activations.items()
        for lo, hi in [q.quant_range()]
    }
    report["outlier_dimensions"] = {
        name: dimension_report(activations[name]) for name in reported if name in activations
    }
    return inst, report


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
