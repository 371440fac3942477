"""Model size of a uniformly quantized model: what its weights take when stored as integers.

Each quantized weight site costs ``bits`` per element plus its scales (and, on an asymmetric grid, zero
points) in FP32, as the integer file stores them (one per tensor, output channel, or group of output
channels); every other parameter (biases, LayerNorm, weights kept in floating point) costs 32 bits;
activation quantizers add their scale and zero point. Bondarenko et al. Table 7's "memory reduction" is
this ratio against the FP32 model. (GOBO's packed files have their own byte ledger in
:mod:`qbert.quant.packing`.)
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from qbert.quant.quantizer import Quantizer

MB = 1e6


def model_size(model: nn.Module, weight_bits: dict[str, int]) -> dict[str, Any]:
    """Sizes in MB (10^6 bytes) of ``model`` with the parameters named in ``weight_bits`` stored at
    that many bits (parameter names as in ``model.named_parameters()``); what each quantizer stores of
    its grid (:meth:`Quantizer.stored_grid`) counts as metadata."""
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    quantizer_params = {id(p) for m in quantizers for p in m.parameters()}
    quantized_bits = other_bits = 0
    metadata_bits = 32 * sum(sum(t.numel() for t in m.stored_grid()[:2] if t is not None) for m in quantizers)
    elements = {"quantized": 0, "other": 0}
    for name, param in model.named_parameters():
        if id(param) in quantizer_params:
            continue
        if name in weight_bits:
            quantized_bits += weight_bits[name] * param.numel()
            elements["quantized"] += param.numel()
        else:
            other_bits += 32 * param.numel()
            elements["other"] += param.numel()
    fp32_bits = 32 * (elements["quantized"] + elements["other"])
    total_bits = quantized_bits + other_bits + metadata_bits
    return {
        "mb": round(total_bits / 8 / MB, 3),
        "fp32_mb": round(fp32_bits / 8 / MB, 3),
        "compression": round(fp32_bits / total_bits, 3),
        "quantized_weights_mb": round(quantized_bits / 8 / MB, 3),
        "fp32_other_mb": round(other_bits / 8 / MB, 3),
        "quantizer_metadata_bytes": metadata_bits // 8,
        "quantized_elements": elements["quantized"],
        "fp32_elements": elements["other"],
    }


def instrumented_size(inst: Any) -> dict[str, Any]:
    """``model_size`` of an instrumented model: each weight quantizer's tensor at its bits."""
    names = {id(p): n for n, p in inst.model.named_parameters()}
    bits = {names[id(t)]: inst.quantizers[site].spec.bits for site, t in inst.weight_tensors.items()}
    return model_size(inst.model, bits)


def state_dict_megabytes(model: nn.Module) -> float:
    """Size of the serialised state dict in MB (10^6 bytes), as the PyTorch tutorial measures it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6
