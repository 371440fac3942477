"""The ONNX operators a quantized module writes while ``torch.onnx.export`` traces it: ``QuantizeLinear ->
DequantizeLinear`` at a quantizer's grid, a weight's ``DequantizeLinear`` from its integer codes, a row gather.
Quantizers (:mod:`qbert.quant.quantizer`) and integer GEMMs (:mod:`qbert.quant.integer_model`) import these;
:mod:`qbert.quant.onnx_export` (exporting whole models, the onnxruntime runner) sits above both."""

from __future__ import annotations

from typing import Any

import torch

OPSET = 21

# ONNX TensorProto element types (onnx.TensorProto) by the integer range they hold
_TYPES = ((0, 255, 2), (-128, 127, 3), (0, 65535, 4), (-32768, 32767, 5))
_FLOAT = 1


def onnx_type(qmin: int, qmax: int) -> tuple[int, int, int]:
    """The smallest ONNX integer type holding ``[qmin, qmax]``: ``(type, type_min, type_max)``."""
    for lo, hi, kind in _TYPES:
        if lo <= qmin and qmax <= hi:
            return kind, lo, hi
    raise ValueError(f"no ONNX integer type holds the grid [{qmin}, {qmax}] (at most 16 bits)")


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                        axis: int | None = None) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` as ONNX nodes (only while ``torch.onnx.export`` traces).
    ``scale``/``zero_point``: scalars, or 1-D along ``axis``."""
    kind, lo, hi = onnx_type(qmin, qmax)
    x = x.float()
    scale, zero_point = scale.detach().float(), zero_point.detach().float()
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    if (qmin, qmax) != (lo, hi):  # the grid is narrower than the type: clamp to it first
        shape = [-1] + [1] * (x.dim() - 1 - axis) if axis is not None else []
        low, high = (scale * (qmin - zero_point)).reshape(shape), (scale * (qmax - zero_point)).reshape(shape)
        x = torch.minimum(torch.maximum(x, low), high)
    attrs = {} if axis is None else {"axis": axis}
    zp = torch.onnx.ops.symbolic("Cast", (zero_point,), {"to": kind}, dtype=kind, shape=zero_point.shape,
                                 version=OPSET)
    q = torch.onnx.ops.symbolic("QuantizeLinear", (x, scale, zp), attrs, dtype=kind, shape=x.shape, version=OPSET)
    return torch.onnx.ops.symbolic("DequantizeLinear", (q, scale, zp), attrs, dtype=_FLOAT, shape=x.shape,
                                   version=OPSET)


def gather_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(-1, index)`` written as Transpose -> Gather(axis 0) -> Transpose: onnxruntime gathers
    whole rows about 3x faster than single elements along the last axis."""
    return x.movedim(-1, 0).index_select(0, index).movedim(0, -1)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``DequantizeLinear`` of symmetric weight codes ``[N, K]`` in ``[-127, 127]`` (per tensor, or per
    output row), stored as int8 with zero point 0: what ONNX runtimes fuse into int8 GEMMs. On x86 CPUs
    without VNNI, onnxruntime runs them exactly only with ``session.x64quantprecision=1``, which the
    exported file records (:mod:`qbert.quant.onnx_export`)."""
    scale = scale.detach().float().reshape(-1)
    attrs: dict[str, Any] = {"axis": 0}
    if scale.numel() == 1:
        scale, attrs = scale.reshape(()), {}
    zero = torch.zeros_like(scale)
    zp = torch.onnx.ops.symbolic("Cast", (zero,), {"to": 3}, dtype=3, shape=zero.shape, version=OPSET)
    return torch.onnx.ops.symbolic("DequantizeLinear", (codes.to(torch.int8), scale, zp), attrs, dtype=_FLOAT,
                                   shape=codes.shape, version=OPSET)
