"""Per-embedding-group (PEG) activation quantization (Bondarenko et al. 2021, sec. 4 and Table 5).

W8A8 per-tensor PTQ, except that the FFN's input, output and residual sum of every layer use K
groups along the embedding dimension, each with its own scale and zero point. With ``permute`` the
dimensions are sorted by their range on the calibration data before grouping, so the few outlier
dimensions share a group; the three sites of a layer share one permutation, taken from the FFN
output (whose outliers dominate). Rows of Table 5: ``groups: 1`` (per-tensor), ``groups:
per_embedding`` with ``scope: all`` (per-embedding everywhere) or ``scope: ffn``, ``groups: 6`` or
``3``, each with or without ``permute``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from qbert.recipes.ptq import Rule, StaticQuantParams, StaticQuantRecipe

from qbert.quant.spec import SiteOverride

FFN_SITES = ("ffn.input", "ffn.output", "ffn.residual_sum")


class PegParams(StaticQuantParams):
    """Number of groups, permutation, and which sites are grouped."""

    name: Literal["peg"] = "peg"
    groups: int | Literal["per_embedding"] = Field(
        6, description="K groups along the hidden dimension (must divide it); per_embedding = one per dimension."
    )
    permute: bool = Field(True, description="Range-based permutation before grouping (+P in Table 5).")
    scope: Literal["ffn", "all"] = Field(
        "ffn", description="ffn: FFN input, output and residual sum only; all: every hidden-sized activation."
    )

    def model_post_init(self, _context: Any) -> None:
        if isinstance(self.groups, int) and self.groups < 1:
            raise ValueError("groups must be at least 1")


class Peg(StaticQuantRecipe):
    """W8A8 PTQ with per-embedding-group quantization of the FFN's activations."""

    name = "peg"
    Params = PegParams
    source = "Bondarenko et al. 2021, Table 5 (PEG-PTQ)"

    def grouped_sites(self, sites: list[Any]) -> list[Any]:
        params: PegParams = self.params  # type: ignore[assignment]
        if params.scope == "ffn":
            return [s for s in sites if s.family in FFN_SITES]
        hidden = next(s.channels for s in sites if s.name == "embeddings.output")
        return [s for s in sites if s.kind == "activation" and s.layout == "tokens" and s.channels == hidden]

    def recipe_rules(self, sites: list[Any]) -> list[Rule]:
        params: PegParams = self.params  # type: ignore[assignment]
        groups = None if params.groups == "per_embedding" else params.groups
        override = SiteOverride(granularity="per_embedding_group", groups=groups, permute=params.permute)
        return [(s.name, override, "recipe.groups") for s in self.grouped_sites(sites)]

    def permutation_sources(self, plan: Any) -> dict[str, str]:
        params: PegParams = self.params  # type: ignore[assignment]
        if params.scope != "ffn" or not params.permute:
            return {}
        shared = {}
        for site in plan.sites:
            source = f"layer.{site.layer}.ffn.output"
            if site.family in FFN_SITES and plan.specs.get(site.name) and plan.specs.get(source):
                spec = plan.specs[site.name]
                if spec.permute and spec.granularity == "per_embedding_group":
                    shared[site.name] = source
        return shared
