"""GOBO (Zadeh et al. 2020): every weight matrix clustered to ``2**bits`` FP32 centroids, with the
rare outliers of its Gaussian kept exact. No retraining and no calibration data: it starts from the
cached FP32 checkpoint and takes seconds.

Which matrices: every linear layer (Q, K, V, attention output, FFN intermediate and output of
every encoder layer, the pooler and the classifier head) and, with ``embeddings: true``, the word,
position and token-type embedding tables. Per-site rules change the bits, policy or threshold of the
sites a glob matches, or keep them FP32 (``null``): the RoBERTa setting of Table VI is
``sites: {"layer.[0-5].attn.value.weight": {bits: 4}, "layer.[0-5].ffn.intermediate.weight": {bits: 4}}``.

The evaluated model holds the decoded weights, which are exactly what the packed export
(``export: {formats: [packed]}``) decodes to; arithmetic is FP32, as in the paper.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from qbert.recipes.base import Quantized, Recipe, SiteRuleParams

PolicyName = Literal["gobo", "kmeans", "linear"]


class GoboSpec(BaseModel):
    """How one matrix is clustered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(3, ge=2, le=8, description="Index bits: 2**bits centroids (2 to 8).")
    policy: PolicyName = Field("gobo", description="Centroid policy: gobo, kmeans or linear.")
    threshold: float = Field(-4.0, description="Log-density at or below which a weight is an outlier.")

    def describe(self) -> str:
        return f"{self.bits}b {self.policy}, outliers logp<={self.threshold:g}"


class GoboOverride(BaseModel):
    """A rule's changes to the matrices it matches; unset fields are inherited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int | None = Field(None, ge=2, le=8, description="Index bits (2 to 8).")
    policy: PolicyName | None = Field(None, description="gobo, kmeans or linear.")
    threshold: float | None = Field(None, description="Outlier log-density threshold.")

    def apply(self, spec: GoboSpec) -> GoboSpec:
        return spec.model_copy(update=self.model_dump(exclude_none=True))


class GoboParams(SiteRuleParams):
    """GOBO's settings; ``sites`` rules refine them per matrix."""

    name: Literal["gobo"] = "gobo"
    bits: int = Field(3, ge=2, le=8, description="Index bits of every clustered matrix: 2**bits centroids.")
    policy: PolicyName = Field(
        "gobo", description="gobo (L1-monitored refinement), kmeans (to convergence) or linear (equal-width bins)."
    )
    threshold: float = Field(-4.0, description="Outliers: log-density under the matrix's Gaussian at or below this.")
    embeddings: bool = Field(False, description="Also cluster the word, position and token-type embedding tables.")
    sites: dict[str, GoboOverride | None] = Field(
        default_factory=dict,
        description="Glob over weight site names -> {bits, policy, threshold} or null (keep FP32), applied in "
        "order; a pattern without `layer.N.` matches every layer.",
    )


class Gobo(Recipe):
    """GOBO: outlier-aware clustering of every weight matrix to 2**bits FP32 centroids, no retraining."""

    name = "gobo"
    Params = GoboParams
    source = "Zadeh et al. 2020, GOBO (seed 002): sec. IV, Tables III-VII"
    export_formats = ("packed", "hf")
    fp32_evaluation = "GOBO's decoded weights are FP32 values and bf16 would round them again"

    def plan(self, sites: list[Any]) -> Any:
        from qbert.quant.sites import PlanError, SitePlan, matching_sites

        p: GoboParams = self.params  # type: ignore[assignment]
        default = GoboSpec(bits=p.bits, policy=p.policy, threshold=p.threshold)
        specs: dict[str, GoboSpec | None] = {
            s.name: default if s.kind == "weight" and (p.embeddings or not s.name.startswith("embeddings.")) else None
            for s in sites
        }
        for pattern, override in p.sites.items():
            key = f"recipe.sites.{pattern}"
            matched = [s for s in matching_sites(sites, pattern, key) if s.kind == "weight"]
            if not matched:
                raise PlanError(f"{pattern!r} matches only activation sites; gobo clusters weights "
                                f"(weight sites end in .weight, e.g. {pattern.rstrip('*.')}.weight)", key)
            for s in matched:
                specs[s.name] = None if override is None else override.apply(specs[s.name] or default)
        return SitePlan(sites, specs)  # type: ignore[arg-type]

    def convert(self, q: Quantized, ctx: Any) -> Quantized:
        """Every planned matrix clustered and decoded into the model (FP32 centroids and outliers)."""
        import torch

        from qbert.quant.gobo import quantize_model
        from qbert.quant.sites import enumerate_sites

        plan = self.plan(enumerate_sites(q.model))
        specs = {s.name: plan.specs[s.name] for s in plan.quantized("weight")}
        with ctx.reporter.bar("gobo matrices", len(specs)) as advance:
            result = quantize_model(q.model, specs, threads=torch.get_num_threads(), on_matrix=lambda _: advance(1))
        matrices = {
            site: {
                "bits": st.bits, "policy": st.policy, "numel": st.numel, "outliers": st.outliers,
                "outlier_fraction": round(st.outlier_fraction, 6), "iterations": st.iterations,
                "converged": st.converged, "l1": round(st.l1, 4), "mean_abs_error": st.l1 / st.numel,
                "seconds": round(st.seconds, 4), "fp32_bytes": 4 * st.numel,
                "coded_bytes": coded_bytes(st.numel, st.bits, st.outliers),
                "compression": round(4 * st.numel / coded_bytes(st.numel, st.bits, st.outliers), 3),
            }
            for site, st in result.stats.items()
        }
        report = summarize_matrices(matrices, result.seconds, result.threads)
        ctx.log.info("gobo: %d matrices, %.4f%% outliers, %.2f s", len(specs),
                     100 * report["outlier_fraction"], result.seconds)
        return q.but(arithmetic="decoded", codes=result.codes, report=report)


def coded_bytes(numel: int, bits: int, outliers: int) -> int:
    """Bytes of one matrix in the packed format: indices, codebook, outlier values and positions."""
    from qbert.quant.packing import count_bits, position_bits

    entry = {"count": numel - outliers, "bits": bits, "outliers": outliers, "position_bits": position_bits(numel)}
    return sum(count_bits({"m": entry}, {}, 0).values()) // 8


def summarize_matrices(matrices: dict[str, dict[str, Any]], seconds: float, threads: int) -> dict[str, Any]:
    """Totals over all matrices and per block (embeddings, layer.i, pooler, head)."""

    def block(site: str) -> str:
        parts = site.split(".")
        return ".".join(parts[:2]) if parts[0] == "layer" else parts[0]

    def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
        numel = sum(r["numel"] for r in rows)
        outliers = sum(r["outliers"] for r in rows)
        l1 = sum(r["l1"] for r in rows)
        return {"numel": numel, "outliers": outliers, "outlier_fraction": outliers / numel if numel else 0.0,
                "fp32_bytes": sum(r.get("fp32_bytes", 0) for r in rows),
                "coded_bytes": sum(r.get("coded_bytes", 0) for r in rows),
                "l1": round(l1, 4), "mean_abs_error": l1 / numel if numel else 0.0}

    blocks: dict[str, list[dict[str, Any]]] = {}
    for site, row in matrices.items():
        blocks.setdefault(block(site), []).append(row)
    iterations = [r["iterations"] for r in matrices.values()]
    by_bits: dict[int, int] = {}
    for row in matrices.values():
        by_bits[row["bits"]] = by_bits.get(row["bits"], 0) + 1
    return {
        **totals(list(matrices.values())),
        "matrices": len(matrices),
        "by_bits": dict(sorted(by_bits.items())),
        "iterations": {"min": min(iterations, default=0), "max": max(iterations, default=0),
                       "mean": sum(iterations) / len(iterations) if iterations else 0.0},
        "all_converged": all(r["converged"] for r in matrices.values()),
        "seconds": round(seconds, 3),
        "threads": threads,
        "blocks": {name: totals(rows) for name, rows in blocks.items()},
        "per_matrix": matrices,
    }
