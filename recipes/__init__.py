"""Quantization recipes, registered by name. A new recipe is one module listed in ``_MODULES``."""

from __future__ import annotations

import difflib
import importlib

from recipes.base import Recipe

_MODULES = ("recipes.fp32", "recipes.ptq", "recipes.mp_ptq", "recipes.peg", "recipes.dynamic_int8",
            "recipes.gobo", "recipes.qat", "recipes.adaround")

RECIPES: dict[str, type[Recipe]] = {}


def _load() -> None:
    if RECIPES:
        return
    for module_name in _MODULES:
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            is_recipe = isinstance(obj, type) and issubclass(obj, Recipe) and "name" in vars(obj)
            if is_recipe and obj.__module__ == module_name:
                RECIPES[obj.name] = obj


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name``; ValueError with the nearest name otherwise."""
    _load()
    if name not in RECIPES:
        close = difflib.get_close_matches(str(name), list(RECIPES), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def available() -> list[str]:
    """Names of all registered recipes."""
    _load()
    return sorted(RECIPES)
