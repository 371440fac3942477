"""The export stage: writes the artefacts named in ``export.formats`` into ``<seed folder>/export/<format>/``.

``EXPORT_FORMATS`` is the single list the config validates against (torch-free, so ``qbert validate``
stays fast); which recipe can write which format is the recipe's ``export_formats``. Every artefact is
checked against the evaluated model before it is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def export_packed(model: Any, ctx: Any, recipe: Any) -> dict[str, Any]:
    """The packed safetensors file (``qbert.quant.packing``) plus the tokenizer, with its bit ledger;
    the file is read back and every parameter compared bit for bit with the evaluated model."""
    import numpy as np

    from qbert.quant.packing import read_packed, write_packed

    folder = Path(ctx.folder) / "export" / "packed"
    path = folder / "model.safetensors"
    ledger = write_packed(path, model, recipe.packed_codes())
    ctx.tokenizer.save_pretrained(folder)
    stored = read_packed(path).tensors
    mismatched = [
        name for name, param in model.named_parameters()
        if not np.array_equal(stored[name], param.detach().cpu().numpy())
    ]
    if mismatched:
        raise RuntimeError(f"{path}: decoded tensors differ from the evaluated model: {', '.join(mismatched[:5])}")
    ctx.log.info("packed export: %s, %.2f MB, %.2fx smaller than FP32", path, ledger.file_bytes / 1e6,
                 ledger.compression)
    return {"path": str(path.relative_to(ctx.folder)), "bit_exact": True, **ledger.as_dict()}


def export_integer(model: Any, ctx: Any, recipe: Any) -> dict[str, Any]:
    """The integer file (``qbert.quant.integer``: bit-packed weight codes, int32 biases where the recipe
    made them, activation grids) plus the tokenizer; read back, de-quantized and compared bit for bit
    with the weights and biases the evaluated model used."""
    import numpy as np
    import torch

    from qbert.quant.integer import read_integer, write_integer
    from qbert.quant.sites import weight_modules

    inst = recipe.instrumented
    folder = Path(ctx.folder) / "export" / "integer"
    path = folder / "model.safetensors"
    info = write_integer(path, inst)
    ctx.tokenizer.save_pretrained(folder)
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
    ctx.log.info("integer export: %s, %.2f MB", path, info["bytes"] / 1e6)
    return {"path": str(path.relative_to(ctx.folder)), "bit_exact": True, "file_bytes": info["bytes"],
            "compression": round(fp32_bytes / info["bytes"], 3), "entries": info["entries"]}


EXPORT_FORMATS: dict[str, Callable[..., dict[str, Any]]] = {
    "packed": export_packed,
    "integer": export_integer,
}
