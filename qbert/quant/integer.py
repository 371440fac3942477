"""The integer export of a uniformly quantized model: one safetensors file an integer runtime can read.

Entries, by the model's parameter names:

- quantized weights: the grid values ``q - qmin`` as unsigned ``bits``-bit integers, bit-packed
  (:func:`qbert.quant.packing.pack_bits`), with ``<name>.scale`` (FP32, one per tensor, per
  output channel, or per group of consecutive output channels: the entry's ``row_groups``) and,
  for asymmetric grids, ``<name>.zero_point``;
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qbert.errors import QbertError
from qbert.quant.fileformat import build_model, check_checksum, metadata_json, save_tensors
from qbert.quant.functional import bias_codes
from qbert.quant.packing import pack_bits, unpack_bits

FORMAT = "qbert-integer/2"
READABLE = ("qbert-integer/1", FORMAT)
"""Version 2 added ``row_groups`` (group-wise weights store one scale per group of rows); version 1 files read."""
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
        scale, zero_point, row_groups = q.stored_grid()
        tensors[f"{name}.scale"] = scale.cpu().numpy().astype(np.float32)
        if zero_point is not None:
            tensors[f"{name}.zero_point"] = zero_point.cpu().numpy().astype(np.float32)
        entries[name] = {"kind": "weight", "site": site, "bits": q.spec.bits, "qmin": q.qmin, "qmax": q.qmax,
                         "shape": list(original.shape), "channel_axis": 0 if q.groups > 1 else None,
                         **({"row_groups": row_groups} if row_groups else {})}
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


def write_integer(path: str | Path, inst: Any, recipe: str | None = None) -> dict[str, Any]:
    """Write the integer file atomically; returns its size and what it holds."""
    path = Path(path)
    tensors, entries = integer_tensors(inst)
    config = inst.model.config.to_dict()
    config.pop("_attn_implementation", None)
    metadata = {"format": FORMAT, "config": json.dumps(config), "entries": json.dumps(entries),
                "architecture": type(inst.model).__name__}
    if recipe:
        metadata["recipe"] = recipe
    save_tensors(path, {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata)
    kinds: dict[str, int] = {}
    for entry in entries.values():
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    return {"bytes": path.stat().st_size, "entries": kinds}


def _read(path: str | Path) -> tuple[dict[str, str], dict[str, Any], dict[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") not in READABLE:
                raise QbertError(f"not a qbert integer file (format {metadata.get('format')!r})", source=str(path))
            raw = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise QbertError(f"not a readable safetensors file ({str(exc).splitlines()[0]})", source=str(path)) from None
    check_checksum(path, metadata, raw)
    return metadata, metadata_json(path, metadata, "entries"), raw


def read_integer(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """De-quantized FP32 parameters by name (weights and biases as the integer runtime sees them),
    and the entries' metadata (activation grids included)."""
    _, entries, raw = _read(path)
    params: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        if entry["kind"] == "float":
            params[name] = raw[name]
        elif entry["kind"] == "weight":
            count = int(np.prod(entry["shape"]))
            codes = unpack_bits(raw[name], entry["bits"], count).astype(np.float32) + np.float32(entry["qmin"])
            codes = codes.reshape(entry["shape"])
            scale, zero = _per_row(entry, raw, name)
            if entry["channel_axis"] == 0:
                scale = scale.reshape(-1, *([1] * (codes.ndim - 1)))
                zero = zero.reshape(scale.shape)
            params[name] = ((codes - zero) * scale).astype(np.float32)
        elif entry["kind"] == "bias_int32":
            params[name] = (raw[name].astype(np.float32) * raw[f"{name}.scale"]).astype(np.float32)
    return params, entries


def _per_row(entry: dict[str, Any], raw: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A weight entry's scales and zero points, one per output channel when the file stores one per group."""
    scale = raw[f"{name}.scale"]
    zero = raw.get(f"{name}.zero_point", np.zeros_like(scale))
    if entry.get("row_groups"):
        rows = entry["shape"][0] // entry["row_groups"]
        scale, zero = np.repeat(scale, rows), np.repeat(zero, rows)
    return scale, zero


def _spec(entry: dict[str, Any], groups: int, permuted: bool) -> Any:
    from qbert.quant.spec import QuantSpec

    bits, qmin = entry["bits"], entry["qmin"]
    symmetric = qmin < 0
    granularity = entry.get("granularity") or ("per_channel" if entry.get("channel_axis") == 0 else "per_tensor")
    groups = entry.get("row_groups") if granularity == "per_channel" else groups
    return QuantSpec(bits=bits, symmetric=symmetric, narrow=symmetric and qmin == -(2 ** (bits - 1)) + 1,
                     granularity=granularity,
                     groups=groups if granularity in ("per_embedding_group", "per_channel") else None,
                     permute=permuted and granularity == "per_embedding_group")


@torch.no_grad()
def instrumented_from_integer(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The model an integer file describes, rebuilt: the architecture from its config, the weights
    de-quantized from their codes, a quantizer on every stored site with the stored scale, zero point
    and permutation, frozen. Returns the instrumented model and the file's metadata."""
    from qbert.quant.estimators import CurrentMinMax
    from qbert.quant.quantizer import Quantizer
    from qbert.quant.sites import SitePlan, enumerate_sites, instrument

    metadata, entries, raw = _read(path)
    params, _ = read_integer(path)
    config_data = metadata_json(path, metadata, "config")
    architecture = metadata.get("architecture") or (config_data.get("architectures") or [None])[0]
    model = build_model(path, config_data, architecture).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in params.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise ValueError(f"{path}: the stored tensors do not fit {architecture}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")

    stored: dict[str, tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for name, entry in entries.items():
        if entry["kind"] == "weight":
            stored[entry["site"]] = (entry, *_per_row(entry, raw, name), None)
        elif entry["kind"] == "activation":
            site = name.removeprefix("activation.")
            stored[site] = (entry, raw[f"{name}.scale"], raw[f"{name}.zero_point"], raw.get(f"{name}.permutation"))
    sites = enumerate_sites(model)
    specs = {}
    for site in sites:
        if site.name in stored:
            entry, scale, _, permutation = stored[site.name]
            specs[site.name] = _spec(entry, len(scale), permutation is not None)
        else:
            specs[site.name] = None
    unknown = sorted(set(stored) - set(specs))
    if unknown:
        raise ValueError(f"{path}: sites {unknown[:3]} are not in this model")

    def make(site: Any, spec: Any) -> Quantizer:
        return Quantizer(spec, CurrentMinMax(), channels=site.channels,
                         channel_dim=0 if site.kind == "weight" else -1, site=site.name)

    inst = instrument(model, SitePlan(sites, specs), make)
    for site, (_, scale, zero_point, permutation) in stored.items():
        q = inst.quantizers[site]
        q.scale.copy_(torch.from_numpy(np.array(scale)).reshape(q.scale.shape))
        q.zero_point.copy_(torch.from_numpy(np.array(zero_point)).reshape(q.zero_point.shape))
        if permutation is not None:
            q.set_permutation(torch.from_numpy(np.array(permutation)))
        q.set_state("fixed")
    return inst, metadata


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
