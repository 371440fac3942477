"""Mixed-precision PTQ: W8A8 with the problematic activations in 16 bit (Bondarenko et al. 2021,
Table 4). Presets, one per column of the table:

- ``ffn_sum``: the residual sum after the FFN in 16 bit (*);
- ``ffn_sum_io``: also the FFN's input and output (*, dagger);
- ``ffn_sum_io_output``: also the model's final output (``head.output``), with the MSE range
  estimator (*, dagger, double dagger).

``pooler: true`` also keeps the pooler output in 16 bit: the reference code's STS-B setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from qbert.recipes.ptq import Rule, StaticQuantParams, StaticQuantRecipe

from qbert.quant.spec import SiteOverride

PRESETS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "ffn_sum": (("ffn.residual_sum", {}),),
    "ffn_sum_io": (("ffn.residual_sum", {}), ("ffn.input", {}), ("ffn.output", {})),
    "ffn_sum_io_output": (
        ("ffn.residual_sum", {}), ("ffn.input", {}), ("ffn.output", {}), ("head.output", {"estimator": "mse"}),
    ),
}


class MpPtqParams(StaticQuantParams):
    """Which sites go to high precision."""

    name: Literal["mp_ptq"] = "mp_ptq"
    preset: Literal["ffn_sum", "ffn_sum_io", "ffn_sum_io_output"] = Field(
        "ffn_sum_io_output", description="Column of Bondarenko Table 4: the sites kept in `high_bits`."
    )
    high_bits: int = Field(16, ge=2, le=16, description="Bits of the high-precision sites.")
    pooler: bool = Field(
        False, description="Also the pooler output in `high_bits` (the reference code's STS-B setting, with the "
        "final output's MSE range: `'P': 16, 'C': 16` and MSE_logits).",
    )


class MpPtq(StaticQuantRecipe):
    """W8A8 per-tensor PTQ with a preset of activation sites in 16 bit."""

    name = "mp_ptq"
    Params = MpPtqParams
    source = "Bondarenko et al. 2021, Table 4 (MP-PTQ)"

    def recipe_rules(self, sites: list[Any]) -> list[Rule]:
        params: MpPtqParams = self.params  # type: ignore[assignment]
        chosen = [(pattern, extra, "recipe.preset") for pattern, extra in PRESETS[params.preset]]
        if params.pooler:
            chosen.append(("pooler.output", {}, "recipe.pooler"))
        return [
            (pattern, SiteOverride(bits=params.high_bits, **extra), source)
            for pattern, extra, source in chosen
            if any(s.name == pattern or s.family == pattern for s in sites)
        ]
