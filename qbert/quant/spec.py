"""What a quantizer is, as data: bits, symmetry, granularity, range estimator (no torch here).

Configs build these from YAML; :mod:`qbert.quant.sites` resolves them per site and
:mod:`qbert.quant.quantizer` turns them into modules. Keeping this module free of torch keeps
``qbert validate`` and ``qbert --help`` fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EstimatorName = Literal["minmax", "running_minmax", "running_absmax", "mse", "percentile"]
GranularityName = Literal["per_tensor", "per_channel", "per_embedding_group"]


class QuantSpec(BaseModel):
    """One quantizer, fully resolved: what ``qbert inspect sites`` prints per site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(8, ge=2, le=16, description="Bits of the integer grid (2 to 16).")
    symmetric: bool = Field(False, description="Symmetric signed grid (weights) or asymmetric with a zero point.")
    granularity: GranularityName = Field(
        "per_tensor",
        description="per_tensor; per_channel (weights: one range per output row, or per group of rows with "
        "`groups`); per_embedding_group (activations: K groups along the hidden dimension).",
    )
    groups: int | None = Field(
        None, gt=0, description="per_embedding_group: K groups (null = one per embedding dimension); per_channel: "
        "that many groups of consecutive output rows share a range (Q-BERT's group-wise quantization; null = one "
        "range per row).",
    )
    permute: bool = Field(False, description="per_embedding_group: sort dimensions by calibrated range first.")
    estimator: EstimatorName = Field("minmax", description="Range estimator.")
    narrow: bool = Field(False, description="Symmetric grid without its most negative code: [-127, 127] at 8 bits.")
    ste: Literal["clipped", "identity"] = Field(
        "clipped", description="Input gradient: clipped = zero outside the grid's range; identity = passed everywhere."
    )

    @model_validator(mode="after")
    def _consistent(self) -> QuantSpec:
        if self.granularity == "per_tensor" and self.groups is not None:
            raise ValueError("groups apply only to granularity per_channel or per_embedding_group")
        if self.granularity != "per_embedding_group" and self.permute:
            raise ValueError("permute applies only to granularity per_embedding_group")
        if self.narrow and not self.symmetric:
            raise ValueError("narrow applies only to symmetric grids")
        return self

    def describe(self) -> str:
        """Short form for tables: ``8b asym per-tensor``, ``8b asym PEG K=6+P``."""
        kind = ("sym narrow" if self.narrow else "sym") if self.symmetric else "asym"
        if self.granularity == "per_tensor":
            gran = "per-tensor"
        elif self.granularity == "per_channel":
            gran = f"group-wise G={self.groups}" if self.groups else "per-channel"
        else:
            gran = f"PEG K={self.groups if self.groups else 'd'}{'+P' if self.permute else ''}"
        return f"{self.bits}b {kind} {gran}"


class SiteOverride(BaseModel):
    """A rule's changes to the quantizers of the sites it matches; unset fields are inherited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int | None = Field(None, ge=2, le=16, description="Bits of the integer grid.")
    symmetric: bool | None = Field(None, description="Symmetric (signed) or asymmetric grid.")
    granularity: GranularityName | None = Field(None, description="per_tensor, per_channel or per_embedding_group.")
    groups: int | None = Field(None, gt=0, description="per_embedding_group: number of groups K; per_channel: "
                               "groups of output rows sharing a range.")
    permute: bool | None = Field(None, description="per_embedding_group: range-based permutation.")
    estimator: EstimatorName | None = Field(None, description="Range estimator for these sites.")

    def apply(self, spec: QuantSpec) -> QuantSpec:
        """``spec`` with this rule's fields replaced (validated again)."""
        changes = self.model_dump(exclude_none=True)
        if "granularity" in changes and changes["granularity"] != spec.granularity:
            changes.setdefault("groups", None)  # a new granularity does not inherit the old one's groups
        if changes.get("granularity", "per_embedding_group") != "per_embedding_group":
            changes.setdefault("permute", False)
        return QuantSpec.model_validate({**spec.model_dump(), **changes})
