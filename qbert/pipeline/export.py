"""The export stage: writes a :class:`~qbert.recipes.base.Quantized` value in one of ``EXPORT_FORMATS``.

An exporter takes the value the method returned (never the recipe) and a folder, writes its artefact
atomically, checks it against the evaluated model, and returns what it wrote (``path`` absolute; the
pipeline records it relative to the seed folder). ``EXPORT_FORMATS`` is the registry the config
validates against; it imports nothing heavy, so ``qbert validate`` stays fast. Which recipe can write
which format is the recipe's ``export_formats``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qbert.errors import QbertError

log = logging.getLogger("qbert")


def export_packed(q: Any, folder: Path) -> dict[str, Any]:
    """The packed safetensors file (``qbert.quant.packing``) plus the tokenizer, with its bit ledger;
    the file is read back and every parameter compared bit for bit with the evaluated model."""
    import numpy as np

    from qbert.quant.packing import read_packed, write_packed

    if not q.codes:
        raise QbertError(f"format 'packed' stores low-bit codes and recipe {q.recipe} produced none "
                         "(packed is written by gobo)", key="export.formats")
    path = folder / "model.safetensors"
    ledger = write_packed(path, q.model, q.codes)
    if q.tokenizer is not None:
        q.tokenizer.save_pretrained(folder)
    stored = read_packed(path).tensors
    mismatched = [
        name for name, param in q.model.named_parameters()
        if not np.array_equal(stored[name], param.detach().cpu().numpy())
    ]
    if mismatched:
        raise RuntimeError(f"{path}: decoded tensors differ from the evaluated model: {', '.join(mismatched[:5])}")
    log.info("packed export: %s, %.2f MB, %.2fx smaller than FP32", path, ledger.file_bytes / 1e6,
             ledger.compression)
    return {"path": str(path), "bit_exact": True, **ledger.as_dict()}


def export_integer(q: Any, folder: Path) -> dict[str, Any]:
    """The integer file (``qbert.quant.integer``: bit-packed weight codes, int32 biases where the method
    made them, activation grids) plus the tokenizer; read back, de-quantized and compared bit for bit
    with the weights and biases the evaluated model used."""
    import numpy as np
    import torch

    from qbert.quant.integer import read_integer, write_integer
    from qbert.quant.sites import weight_modules

    inst = q.instrumented
    if inst is None:
        raise QbertError(f"format 'integer' stores uniform quantizers' codes and recipe {q.recipe} has none",
                         key="export.formats")
    model = q.model
    path = folder / "model.safetensors"
    info = write_integer(path, inst)
    if q.tokenizer is not None:
        q.tokenizer.save_pretrained(folder)
    params, _ = read_integer(path)
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        used = {n.replace(".parametrizations.weight.original", ".weight"): p for n, p in model.named_parameters()}
        for site, module in weight_modules(model).items():
            if site in inst.weight_tensors:
                used[names[id(inst.weight_tensors[site])].replace(".parametrizations.weight.original", ".weight")] = (
                    module.weight)
    mismatched = [n for n, v in params.items() if not np.array_equal(v, used[n].detach().cpu().numpy())]
    if mismatched:
        raise RuntimeError(f"{path}: de-quantized tensors differ from the evaluated model: {', '.join(mismatched[:5])}")
    fp32_bytes = 4 * sum(p.numel() for n, p in used.items() if n in params)
    log.info("integer export: %s, %.2f MB", path, info["bytes"] / 1e6)
    return {"path": str(path), "bit_exact": True, "file_bytes": info["bytes"],
            "compression": round(fp32_bytes / info["bytes"], 3), "entries": info["entries"]}


EXPORT_FORMATS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {
    "packed": export_packed,
    "integer": export_integer,
}
"""Export formats by name: ``exporter(quantized, folder) -> facts about what was written``."""


def export(q: Any, fmt: str, folder: str | Path) -> dict[str, Any]:
    """Write ``q`` as ``fmt`` into ``folder`` (created); returns what was written."""
    if fmt not in EXPORT_FORMATS:
        raise QbertError(f"unknown export format {fmt!r} (available: {', '.join(EXPORT_FORMATS)})", key="format")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return EXPORT_FORMATS[fmt](q, folder)
