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


EXPORT_FORMATS: dict[str, Callable[..., dict[str, Any]]] = {
    "packed": export_packed,
}
