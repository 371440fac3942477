"""The packed format: a safetensors file with low-bit codes, an exact bit ledger, and its loader.

One file holds a whole model. A matrix compressed by GOBO is four tensors (``P`` its parameter name):

==============================  =====  ============================================================
``P.gobo_indices``              uint8  the Gaussian-group weights' codebook indices, ``bits`` each,
                                       bit-packed (see :func:`pack_bits`), flat row-major order with
                                       the outliers skipped
``P.gobo_codebook``             f32    the ``2**bits`` centroids
``P.gobo_outlier_values``       f32    the outliers, exact
``P.gobo_outlier_positions``    uint8  their flat positions, ascending, bit-packed with
                                       ``ceil(log2(numel))`` bits each
==============================  =====  ============================================================

Every other parameter is stored as it is, under its own name. The safetensors metadata holds the
format tag, the model's config (JSON) and, per compressed matrix, its shape, bits, counts and
position width. :func:`load_packed` rebuilds the float model; its compressed weights are bit-for-bit
the decoded codes.

The :class:`Ledger` counts every bit of the file by what it is for (indices, their byte padding,
codebooks, outlier values and positions, unquantized tensors, the safetensors header) from the
counts alone; :func:`write_packed` checks that the total equals the file's size on disk.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qbert.errors import QbertError
from qbert.quant.fileformat import build_model, check_checksum, metadata_json, save_tensors
from qbert.quant.gobo import GoboCode

FORMAT = "qbert-packed/1"


# bit packing ------------------------------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers below ``2**bits`` as one little-endian bit stream: value ``i`` occupies
    stream bits ``[i*bits, (i+1)*bits)``, least significant bit first, and stream bit ``j`` is bit
    ``j % 8`` of byte ``j // 8``. The last byte is zero-padded."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be between 1 and 64, got {bits}")
    values = np.asarray(values).reshape(-1)
    if values.size and (values.min() < 0 or (bits < 64 and int(values.max()) >> bits)):
        raise ValueError(f"values do not fit in {bits} bits")
    width = 8 * math.ceil(bits / 8)  # a byte-aligned unsigned type that holds one value
    dtype = np.dtype(f"<u{width // 8}") if width in (8, 16, 32, 64) else np.dtype("<u8")
    out = np.empty((values.size * bits + 7) // 8, dtype=np.uint8)
    chunk = 1 << 20  # values per chunk, a multiple of 8 so every chunk starts on a byte
    for start in range(0, values.size, chunk):
        part = values[start:start + chunk].astype(dtype)
        bit_rows = np.unpackbits(part.view(np.uint8).reshape(part.size, -1), axis=1, bitorder="little")
        stream = np.packbits(bit_rows[:, :bits].reshape(-1), bitorder="little")
        first = start * bits // 8
        out[first:first + stream.size] = stream
    return out


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values (uint8 up to 8 bits, else int64)."""
    if data.size * 8 < count * bits:
        raise ValueError(f"{data.size} bytes hold fewer than {count} values of {bits} bits")
    stream = np.unpackbits(np.asarray(data, dtype=np.uint8), count=count * bits, bitorder="little")
    rows = stream.reshape(count, bits)
    width = 8 if bits <= 8 else 64
    padded = np.zeros((count, width), dtype=np.uint8)
    padded[:, :bits] = rows
    values = np.packbits(padded, axis=1, bitorder="little").view(np.dtype(f"<u{width // 8}")).reshape(count)
    return values if bits <= 8 else values.astype(np.int64)


def position_bits(numel: int) -> int:
    """Bits of one flat position in a tensor of ``numel`` elements."""
    return max(1, (numel - 1).bit_length())


# the ledger -------------------------------------------------------------------------------------
LEDGER_PARTS = (
    "indices", "index_padding", "codebooks", "outlier_values", "outlier_positions", "position_padding",
    "unquantized", "header",
)


@dataclass
class Ledger:
    """Every bit of a packed file, by purpose, and the compression against the FP32 model."""

    bits: dict[str, int]
    file_bytes: int
    fp32_bytes: int
    """4 bytes per parameter of the model (what an FP32 checkpoint of its tensors holds)."""
    coded_fp32_bytes: int = 0
    """4 bytes per parameter of the matrices stored as codes."""

    @property
    def total_bits(self) -> int:
        return sum(self.bits.values())

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.file_bytes

    @property
    def coded_bits(self) -> int:
        """The bits of the coded matrices alone: indices, codebooks, outliers, with their padding."""
        return sum(b for part, b in self.bits.items() if part not in ("unquantized", "header"))

    @property
    def coded_compression(self) -> float:
        """FP32 size of the coded matrices over their coded size (GOBO's "compression ratio" of a layer)."""
        return 8 * self.coded_fp32_bytes / self.coded_bits if self.coded_bits else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "file_bytes": self.file_bytes,
            "fp32_bytes": self.fp32_bytes,
            "compression": round(self.compression, 3),
            "coded_compression": round(self.coded_compression, 3),
            "bits": dict(self.bits),
            "megabytes": {part: round(b / 8e6, 4) for part, b in self.bits.items()},
        }


def _padded(bits: int) -> int:
    return 8 * ((bits + 7) // 8)


def count_bits(
    entries: dict[str, dict[str, Any]], unquantized: dict[str, np.ndarray], header_bytes: int
) -> dict[str, int]:
    """The ledger's parts from the codes' counts, the plain tensors and the header size."""
    parts = dict.fromkeys(LEDGER_PARTS, 0)
    for e in entries.values():
        index_bits = e["count"] * e["bits"]
        position = e["outliers"] * e["position_bits"]
        parts["indices"] += index_bits
        parts["index_padding"] += _padded(index_bits) - index_bits
        parts["codebooks"] += 32 * 2 ** e["bits"]
        parts["outlier_values"] += 32 * e["outliers"]
        parts["outlier_positions"] += position
        parts["position_padding"] += _padded(position) - position
    parts["unquantized"] = sum(8 * t.nbytes for t in unquantized.values())
    parts["header"] = 8 * header_bytes
    return parts


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


# writing and reading ----------------------------------------------------------------------------
def write_packed(path: str | Path, model: Any, codes: dict[str, GoboCode]) -> Ledger:
    """Write ``model`` with the parameters named in ``codes`` stored as their codes; atomically.

    Returns the ledger; raises if its total disagrees with the file's size (a bug, not bad input).
    """
    path = Path(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(codes) - set(params))
    if unknown:
        raise ValueError(f"codes for parameters the model does not have: {', '.join(unknown)}")
    tensors: dict[str, np.ndarray] = {}
    plain: dict[str, np.ndarray] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, param in params.items():
        code = codes.get(name)
        if code is None:
            plain[name] = tensors[name] = param.detach().cpu().contiguous().numpy()
            continue
        pbits = position_bits(code.numel)
        tensors[f"{name}.gobo_indices"] = pack_bits(code.indices, code.bits)
        tensors[f"{name}.gobo_codebook"] = np.ascontiguousarray(code.codebook, dtype=np.float32)
        tensors[f"{name}.gobo_outlier_values"] = np.ascontiguousarray(code.outlier_values, dtype=np.float32)
        tensors[f"{name}.gobo_outlier_positions"] = pack_bits(code.outlier_positions, pbits)
        entries[name] = {
            "shape": list(code.shape), "bits": code.bits, "count": int(code.indices.size),
            "outliers": code.outliers, "position_bits": pbits,
        }
    config = json.loads(model.config.to_json_string())
    config["architectures"] = [type(model).__name__]
    save_tensors(path, tensors, {"format": FORMAT, "config": json.dumps(config), "codes": json.dumps(entries)})
    ledger = Ledger(
        bits=count_bits(entries, plain, _header_bytes(path)),
        file_bytes=path.stat().st_size,
        fp32_bytes=4 * sum(p.numel() for p in params.values()),
        coded_fp32_bytes=4 * sum(code.numel for code in codes.values()),
    )
    if ledger.total_bits != 8 * ledger.file_bytes:
        raise RuntimeError(f"{path}: ledger counts {ledger.total_bits} bits, the file has {8 * ledger.file_bytes}")
    return ledger


@dataclass
class PackedFile:
    """A packed file's contents: the decoded float tensors, the model config, the code entries."""

    tensors: dict[str, np.ndarray]
    config: dict[str, Any]
    codes: dict[str, dict[str, Any]]


def decode_entry(entry: dict[str, Any], read: Any, name: str) -> np.ndarray:
    """One compressed matrix back to float32, from its metadata entry and ``read(tensor_name)``."""
    code = GoboCode(
        shape=tuple(entry["shape"]),
        bits=entry["bits"],
        indices=unpack_bits(read(f"{name}.gobo_indices"), entry["bits"], entry["count"]),
        codebook=read(f"{name}.gobo_codebook"),
        outlier_positions=unpack_bits(read(f"{name}.gobo_outlier_positions"), entry["position_bits"],
                                      entry["outliers"]).astype(np.int64),
        outlier_values=read(f"{name}.gobo_outlier_values"),
    )
    return code.decode()


SUFFIXES = (".gobo_indices", ".gobo_codebook", ".gobo_outlier_values", ".gobo_outlier_positions")


def check_entry(name: str, entry: Any, tensors: dict[str, np.ndarray]) -> str | None:
    """What is wrong with one compressed matrix's metadata and data (they must agree), or None."""
    try:
        shape, bits, count = [int(d) for d in entry["shape"]], int(entry["bits"]), int(entry["count"])
        outliers, pbits = int(entry["outliers"]), int(entry["position_bits"])
    except (KeyError, TypeError, ValueError):
        return "its entry lacks shape, bits, count, outliers or position_bits"
    missing = [s for s in SUFFIXES if f"{name}{s}" not in tensors]
    if missing:
        return f"tensor {name}{missing[0]} is missing"
    numel = math.prod(shape) if shape and min(shape) > 0 else 0
    indices, codebook = tensors[f"{name}.gobo_indices"], tensors[f"{name}.gobo_codebook"]
    values, positions = tensors[f"{name}.gobo_outlier_values"], tensors[f"{name}.gobo_outlier_positions"]
    problems = [
        (not 1 <= bits <= 8, f"bits {bits} is not 1-8"),
        (numel == 0, f"shape {shape} is empty"),
        (count != numel - outliers or outliers < 0, f"count {count} + outliers {outliers} is not {numel} weights"),
        (pbits != position_bits(max(numel, 1)), f"position_bits {pbits} is not {position_bits(max(numel, 1))}"),
        (indices.dtype != np.uint8 or indices.size != (count * bits + 7) // 8,
         f"{indices.size} index bytes for {count} {bits}-bit indices"),
        (codebook.shape != (2 ** bits,), f"{codebook.size} centroids for {bits} bits"),
        (values.shape != (outliers,), f"{values.size} outlier values for {outliers} outliers"),
        (positions.dtype != np.uint8 or positions.size != (outliers * pbits + 7) // 8,
         f"{positions.size} position bytes for {outliers} {pbits}-bit positions"),
    ]
    for bad, why in problems:
        if bad:
            return why
    if not (np.isfinite(codebook).all() and np.isfinite(values).all()):
        return "a centroid or outlier value is not finite"
    if (np.diff(codebook) < 0).any():
        return "the codebook is not in ascending order"
    found = unpack_bits(positions, pbits, outliers).astype(np.int64)
    if outliers and ((np.diff(found) <= 0).any() or found[-1] >= numel):
        return "outlier positions are not ascending positions inside the matrix"
    return None


def read_packed(path: str | Path) -> PackedFile:
    """Read a packed file, check it (checksum, each entry against its data) and decode every compressed
    matrix (float32 numpy arrays by parameter name). A damaged or foreign file is a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise QbertError(f"not a qbert packed file (format {metadata.get('format')!r}, expected {FORMAT})",
                                 source=str(path))
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise QbertError(f"not a readable safetensors file ({str(exc).splitlines()[0]})", source=str(path)) from None
    check_checksum(path, metadata, raw)
    codes = metadata_json(path, metadata, "codes")
    config = metadata_json(path, metadata, "config")
    if not isinstance(codes, dict) or not isinstance(config, dict):
        raise QbertError("metadata 'codes' and 'config' must be mappings: export the file again", source=str(path))
    tensors = {k: v for k, v in raw.items() if not k.endswith(SUFFIXES)}
    for name, entry in codes.items():
        problem = check_entry(name, entry, raw)
        if problem is not None:
            raise QbertError(f"matrix {name}: {problem} (the file is damaged: export it again)", source=str(path))
        tensors[name] = decode_entry(entry, raw.__getitem__, name)
    return PackedFile(tensors, config, codes)


def load_packed(path: str | Path) -> Any:
    """The float model stored in a packed file (its task head and config as the file records them)."""
    import torch

    packed = read_packed(path)
    architecture = (packed.config.get("architectures") or [None])[0]
    model = build_model(path, packed.config, architecture)
    state = {name: torch.from_numpy(array) for name, array in packed.tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise QbertError(f"the tensors do not fit {architecture} ({str(exc).splitlines()[-1].strip()})",
                         source=str(path)) from None
    parameters = {name for name, _ in model.named_parameters()}
    if unexpected or parameters & set(missing):
        raise QbertError(f"does not match {architecture} (missing {sorted(parameters & set(missing))[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})", source=str(path))
    return model.eval()
