"""The base of every config section (torch-free, imported by the config and by the recipes' parameters)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


def _numeric(annotation: Any) -> bool:
    """Whether a field holds numbers (int or float, alone, optional or in a list) and not booleans."""
    args = typing.get_args(annotation)
    kinds = set(args) if args else {annotation}
    if bool in kinds:
        return False
    return bool(kinds & {int, float}) or any(_numeric(a) for a in args if typing.get_args(a))


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and a number is
    never a YAML boolean (pydantic would read ``seeds: [true]`` as seed 1 and ``bits: true`` as 1 bit)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        values = value if isinstance(value, list) else [value]
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and any(isinstance(v, bool) for v in values) and _numeric(field.annotation):
            raise PydanticCustomError("bool_for_number", "expected a number, not a boolean (true/false)")
        return value
