"""The integer export of a uniformly quantized model: one safetensors file an integer runtime can read.

Entries, by the model's parameter names:

- quantized weights: the grid values ``q - qmin`` as unsigned ``bits``-bit integers, bit-packed
  (:func:`qbert.quant.packing.pack_bits`), with ``<name>.scale`` (FP32, one per tensor or per
  output channel) and, for asymmetric grids, ``<name>.zero_point``;
- integer biases (Q8BERT): ``<bias name>`` as int32 codes with ``<bias name>.scale`` =
  ``s_input * s_weight``, the scale of the int32 accumulator the bias is added to;
- activation quantizers: ``activation.<site>.scale`` / ``.zero_point`` (and ``.permutation`` for
  per-embedding-group sites);
- every other parameter in FP32.

The metadata holds the HF config and, per entry, its kind, bits, grid and shape. ``read_integer``
de-quantizes everything back to FP32 tensors; the export stage checks them bit for bit against the
evaluated model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qbert.quant.functional import bias_codes
from qbert.quant.packing import pack_bits, unpack_bits

FORMAT = "qbert-integer/1"
_ORIGINAL = ".parametrizations.weight.original"


def _parameter_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n.replace(_ORIGINAL, ".weight") for n, p in model.named_parameters()}


def integer_tensors(inst: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The entries and per-entry metadata of ``inst`` (an instrumented model after quantization)."""
    from qbert.quant.sites import weight_modules

    model = inst.model
    names = _parameter_names(model)
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, Any] = {}
    covered: set[str] = set()

    for site, original in inst.weight_tensors.items():
        q = inst.quantizers[site]
        name = names[id(original)]
        codes = q.integer_codes(original)
        unsigned = (codes.cpu().numpy().astype(np.int64) - q.qmin).astype(np.uint64)
        tensors[name] = pack_bits(unsigned, q.spec.bits)
        tensors[f"{name}.scale"] = q.scale.detach().cpu().numpy().astype(np.float32)
        if not q.spec.symmetric:
            tensors[f"{name}.zero_point"] = q.zero_point.detach().cpu().numpy().astype(np.float32)
        entries[name] = {"kind": "weight", "site": site, "bits": q.spec.bits, "qmin": q.qmin, "qmax": q.qmax,
                         "shape": list(original.shape), "channel_axis": 0 if q.groups > 1 else None}
        covered.add(name)

    modules = weight_modules(model)
    for site, source in getattr(inst, "integer_biases", {}).items():
        bias = modules[site].bias
        name = names[id(bias)]
        scale = (inst.quantizers[site].scale * inst.quantizers[source].scale).detach()
        codes = bias_codes(bias.detach(), scale).to(torch.int64)
        tensors[name] = codes.cpu().numpy().astype(np.int32)
        tensors[f"{name}.scale"] = scale.cpu().numpy().astype(np.float32)
        entries[name] = {"kind": "bias_int32", "weight": site, "input": source}
        covered.add(name)

    for site, q in inst.activations().items():
        prefix = f"activation.{site}"
        tensors[f"{prefix}.scale"] = q.scale.detach().cpu().numpy().astype(np.float32)
        tensors[f"{prefix}.zero_point"] = q.zero_point.detach().cpu().numpy().astype(np.float32)
        if q.permutation is not None:
            tensors[f"{prefix}.permutation"] = q.permutation.cpu().numpy().astype(np.int64)
        entries[prefix] = {"kind": "activation", "bits": q.spec.bits, "qmin": q.qmin, "qmax": q.qmax,
                           "granularity": q.spec.granularity}

    quantizer_params = {id(p) for q in inst.quantizers.values() for p in q.parameters()}
    for param in model.parameters():
        name = names[id(param)]
        if name in covered or id(param) in quantizer_params:
            continue
        tensors[name] = param.detach().cpu().numpy().astype(np.float32)
        entries[name] = {"kind": "float"}
    return tensors, entries


def write_integer(path: str | Path, inst: Any) -> dict[str, Any]:
    """Write the integer file atomically; returns its size and what it holds."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, entries = integer_tensors(inst)
    metadata = {"format": FORMAT, "config": inst.model.config.to_json_string(), "entries": json.dumps(entries)}
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    kinds: dict[str, int] = {}
    for entry in entries.values():
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    return {"bytes": path.stat().st_size, "entries": kinds}


def read_integer(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """De-quantized FP32 parameters by name (weights and biases as the integer runtime sees them),
    and the entries' metadata (activation grids included)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a qbert integer file (format {metadata.get('format')!r})")
        entries = json.loads(metadata["entries"])
        raw = {k: handle.get_tensor(k) for k in handle.keys()}
    params: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        if entry["kind"] == "float":
            params[name] = raw[name]
        elif entry["kind"] == "weight":
            count = int(np.prod(entry["shape"]))
            codes = unpack_bits(raw[name], entry["bits"], count).astype(np.float32) + np.float32(entry["qmin"])
            codes = codes.reshape(entry["shape"])
            scale = raw[f"{name}.scale"]
            zero = raw.get(f"{name}.zero_point", np.zeros_like(scale))
            if entry["channel_axis"] == 0:
                scale = scale.reshape(-1, *([1] * (codes.ndim - 1)))
                zero = zero.reshape(scale.shape)
            params[name] = ((codes - zero) * scale).astype(np.float32)
        elif entry["kind"] == "bias_int32":
            params[name] = (raw[name].astype(np.float32) * raw[f"{name}.scale"]).astype(np.float32)
    return params, entries


@torch.no_grad()
def quantize_biases(inst: Any, inputs: dict[str, str]) -> dict[str, Any]:
    """Round every bias of a linear layer with quantized weight and input to an int32 multiple of
    ``s_input * s_weight`` (:func:`~qbert.quant.functional.bias_codes`), in place, and record the layer in
    ``inst.integer_biases``; returns the count and the largest change."""
    from qbert.quant.sites import weight_modules

    modules = weight_modules(inst.model)
    largest, count = 0.0, 0
    for site, source in inputs.items():
        wq, aq = inst.quantizers.get(site), inst.quantizers.get(source)
        bias = getattr(modules[site], "bias", None)
        if wq is None or aq is None or bias is None:
            continue
        scale = wq.scale * aq.scale  # per-tensor input: one scale, or one per output channel
        rounded = (bias_codes(bias, scale) * scale).to(bias.dtype)
        largest = max(largest, float((rounded - bias).abs().max()))
        bias.copy_(rounded)
        inst.integer_biases[site] = source
        count += 1
    return {"biases": count, "max_abs_change": largest}
