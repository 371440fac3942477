"""Quantization recipes, registered by name: every module in this package that defines a
:class:`~qbert.recipes.base.Recipe` subclass with a ``name``. Adding a recipe is adding one module.

Recipe modules import torch only inside their stage methods, so the registry (and with it config
validation, ``qbert validate``, ``qbert --help``) never loads torch.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from qbert.recipes.base import Quantized, Recipe, RecipeParams, Training

__all__ = ["RECIPES", "Quantized", "Recipe", "RecipeParams", "Training", "available", "get_recipe"]

RECIPES: dict[str, type[Recipe]] = {}


def _load() -> None:
    if RECIPES:
        return
    found: dict[str, type[Recipe]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module_name = f"{__name__}.{info.name}"
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            is_recipe = isinstance(obj, type) and issubclass(obj, Recipe) and "name" in vars(obj)
            if is_recipe and obj.__module__ == module_name:
                if obj.name in found:
                    raise RuntimeError(f"recipe {obj.name!r} is defined twice ({found[obj.name].__module__}, "
                                       f"{module_name})")
                found[obj.name] = obj
    RECIPES.update(found)


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
