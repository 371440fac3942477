"""``reference:`` presets: a paper's reference code, as qbert's config keys set the same way.

qbert's quantizers, estimators and PEG grouping compute what the reference code of Bondarenko et al.
2021 (github.com/qualcomm-ai-research/transformer-quantization) computes, but some implementation
choices differ; each is a config key with qbert's choice as its default. ``reference: bondarenko2021``
sets every one of them as that code does, for the recipe and task at hand:

- ``calibrate.upstream_quantized: true``: its quantizers estimate ranges while quantizing, so each
  activation range is estimated downstream of the sites before it (layer by layer);
- ``calibrate.padding``: ``included`` for post-training quantization (``--est-ranges-no-pad``:
  batches padded to their longest sequence, nothing masked), ``max_length`` for QAT
  (``--pad-to-max-length``);
- ``estimator.mse_search: golden`` (``--weight-opt-method golden_section``, its README's recipes);
- ``calibrate.permutation_ranges: last`` (PEG): its EMA of per-dimension ranges reads
  ``momentum * ranges + (1 - momentum) * ranges``, i.e. the last batch's ranges;
- ``recipe.pooler: true`` for ``mp_ptq`` on STS-B (``'P': 16`` with ``'C': 16`` and ``MSE_logits``);
- ``recipe.precision: fp32`` for QAT (it trains in fp32);
- ``evaluate.clamp_regression: true`` for quantized models on STS-B (its quantized BERT clamps the
  logits to [0, 5]).

Keys the config sets itself win over the preset's.
"""

from __future__ import annotations

import copy
from typing import Any

REFERENCES = ("bondarenko2021",)
"""The presets ``reference:`` accepts."""


def reference_settings(reference: str, task: str, recipe_name: str) -> dict[str, Any]:
    """Dotted config key -> value: what ``reference`` sets for this recipe and task."""
    from qbert.recipes import get_recipe

    recipe = get_recipe(recipe_name)
    fields = recipe.Params.model_fields
    settings: dict[str, Any] = {}
    if recipe.reference_code == reference:
        settings["calibrate.upstream_quantized"] = True
        settings["calibrate.padding"] = "max_length" if recipe.trains else "included"
        settings["estimator.mse_search"] = "golden"
        settings["calibrate.permutation_ranges"] = "last"
        if "precision" in fields:
            settings["recipe.precision"] = "fp32"
        if "pooler" in fields and task == "stsb":
            settings["recipe.pooler"] = True
        if task == "stsb":
            settings["evaluate.clamp_regression"] = True
    return settings


def apply_reference(data: dict[str, Any]) -> dict[str, Any]:
    """Raw config data with the ``reference`` preset's keys filled in where the data does not set them."""
    reference = data.get("reference")
    recipe = data.get("recipe") if isinstance(data.get("recipe"), dict) else {}
    if reference not in REFERENCES:
        return data  # none, or unknown: the field's own validation says so
    try:
        settings = reference_settings(reference, str(data.get("task", "mrpc")), str(recipe.get("name", "fp32")))
    except ValueError:
        return data  # an unknown recipe name: its own validation error says so
    data = copy.deepcopy(data)
    for dotted, value in settings.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(last, value)
    return data
