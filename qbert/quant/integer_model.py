"""Integer GEMMs for a fake-quantized model: every linear layer whose weight (at most 8 bits) and input
(at most 16 bits) are quantized runs as int8 x int8 -> int32 (``torch._int_mm``) with the calibrated
scales and zero points, then rescales to float.

For a linear ``y = x W^T + b`` with input grid ``x = s_x (q_x - z_x)`` and weight grid ``W = s_w q_w``
(symmetric, per tensor or per output channel)::

    y = s_x s_w (q_x - z_x) q_w^T + b
      = s_x s_w [(q_x - c) q_w^T] + (b - s_x s_w (z_x - c) * rowsum(q_w))

where ``c`` is 128 for unsigned 8-bit inputs (so ``q_x - c`` fits int8) and 0 otherwise: the bracket
is the int32 GEMM, the second term a float bias folded offline. An input of 9 to 16 bits (mixed
precision keeps some at 16) runs as two int8 GEMMs on its two base-256 digits::

    q_x - c = 256 h + l,   h, l in [-128, 127],   c = qmin + 32896

so ``(q_x - c) q_w^T = 256 (h q_w^T) + (l q_w^T)``, both int32, combined with the zero point's term
``(c - z_x) rowsum(q_w)`` exactly in float64 (folded into the bias it would cancel against the
accumulator in float32). A per-embedding-group input (PEG, Bondarenko et al. 2021 sec. 4 and
Figure 4) runs as K group GEMMs summed, each with its group's scale and zero point; its range-based
permutation is folded into the weight's columns offline (the input is gathered once in the same
order). Weights of fewer bits (4-bit) are int8 codes in a narrower range.

Everything else (attention matmuls, softmax, GELU, LayerNorm, the output fake-quantization of each
site) stays as the simulated model computes it, so the integer model differs from the simulation only
in the GEMMs, where int32 accumulation is exact and the float GEMM rounds. Quantized weights outside the
integer GEMMs (embedding tables, GEMMs with a float input) are fake-quantized once, not at
every call: the same values, without re-quantizing the 11.7M-entry word embedding table per forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qbert.quant.quantizer import Quantizer


def _int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N] (``b_t`` is the transpose of a row-major [N, K]).
    CUDA's kernel wants more than 16 rows: smaller inputs are padded with zero rows."""
    rows = a.shape[0]
    if a.is_cuda and rows <= 16:
        a = torch.cat([a, a.new_zeros(17 - rows, a.shape[1])])
    return torch._int_mm(a, b_t)[:rows]


class IntegerGemm(nn.Module):
    """The integer forward of one linear layer (replaces its ``forward``; its hooks stay in place)."""

    def __init__(self, linear: nn.Module, weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                 input_quantizer: Quantizer) -> None:
        super().__init__()
        aq = input_quantizer
        self.in_features = weight_codes.shape[1]
        self.qmin, self.qmax = aq.qmin, aq.qmax
        self.digits = 1 if aq.qmax - aq.qmin < 256 else 2
        if self.digits == 1:
            self.shift = 128 if aq.qmax > 127 else 0
        else:
            self.shift = aq.qmin + 32896
        groups = aq.groups if aq.spec.granularity == "per_embedding_group" else 1
        permutation = aq.permutation if groups > 1 and aq.permutes() else None
        codes = weight_codes if permutation is None else weight_codes[:, permutation]
        size = self.in_features // groups
        s_w = weight_scale.reshape(-1).float()  # [1] or [N]
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(codes.shape[0])
        s_x = aq.scale.detach().float().reshape(-1)[:groups]
        z_x = aq.zero_point.detach().float().reshape(-1)[:groups]
        chunks = [codes[:, g * size:(g + 1) * size] for g in range(groups)]
        # the zero point's term (c - z_x) rowsum(q_w): folded into the bias for 8-bit inputs; for wider ones
        # it is as large as the accumulator it cancels, so it joins the accumulator exactly, in float64
        zero_terms = None
        if self.digits == 1:
            for g, chunk in enumerate(chunks):
                bias = bias - s_x[g] * s_w * (z_x[g] - self.shift) * chunk.double().sum(dim=1).float()
        else:
            zero_terms = torch.stack([(self.shift - z_x[g].double()) * chunk.double().sum(dim=1)
                                      for g, chunk in enumerate(chunks)])  # [G, N], whole numbers
        self.register_buffer("zero_terms", zero_terms)
        self.register_buffer("permutation", None if permutation is None else permutation.clone())
        # weights stored [N, K_g] row-major and passed transposed: the fast layout for _int_mm on CPU;
        # buffers, not parameters, so the model's parameters stay the float ones the exports read
        self.groups = groups
        for g, chunk in enumerate(chunks):
            self.register_buffer(f"weight_{g}", chunk.to(torch.int8).contiguous())
        self.register_buffer("out_scale", (s_x.reshape(-1, 1) * s_w.reshape(1, -1)))  # [G, N] or [G, 1]
        self.register_buffer("input_scale", s_x.repeat_interleave(size))
        self.register_buffer("input_zero", z_x.repeat_interleave(size))
        self.register_buffer("folded_bias", bias.float())
        self.size = size
        # the same layer as ONNX expresses it (QDQ per group, the bias unfolded): see _onnx_forward
        self.register_buffer("group_scale", s_x.clone())
        self.register_buffer("group_zero", z_x.clone())
        self.register_buffer("weight_scale", s_w.clone())
        self.register_buffer("bias", linear.bias.detach().float().clone() if linear.bias is not None else None)

    def input_codes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """int8 codes of ``x`` (in the weights' column order): ``[q_x - c]`` for inputs of at most 8 bits,
        the digits ``[h, l]`` of ``q_x - c = 256 h + l`` for wider ones."""
        if self.permutation is not None:
            x = x.index_select(-1, self.permutation)
        q = torch.clamp(torch.round(x / self.input_scale) + self.input_zero, self.qmin, self.qmax) - self.shift
        if self.digits == 1:
            return [q.to(torch.int8)]
        high = torch.floor((q + 128) / 256)  # exact: whole numbers far below 2^24
        return [high.to(torch.int8), (q - 256 * high).to(torch.int8)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._onnx_forward(x)
        shape = x.shape
        digits = self.input_codes(x.reshape(-1, self.in_features).float())
        out = None
        for g in range(self.groups):
            weight = getattr(self, f"weight_{g}").t()
            accs = [_int_mm(codes[:, g * self.size:(g + 1) * self.size].contiguous(), weight) for codes in digits]
            if self.digits == 1:
                acc = accs[0].float()
            else:
                acc = (accs[0].double() * 256 + accs[1].double() + self.zero_terms[g]).float()
            part = acc * self.out_scale[g]
            out = part if out is None else out + part
        out = out + self.folded_bias
        return out.reshape(*shape[:-1], -1).to(x.dtype)

    def _onnx_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ONNX nodes an integer runtime fuses into 8-bit GEMMs: per group, a per-tensor Q -> DQ of the input
        slice and the DequantizeLinear of the int8 weight codes feed one MatMul; the K
        products are summed.
        A 16-bit input has no int8 fusion in onnxruntime: its MatMul takes the weight as float values on
        their grid (a DequantizeLinear of int8 codes there becomes MatMulNBits, which quantizes the input
        to int8 on the fly: see :func:`~qbert.quant.onnx_graph.fold_weight_quantization`)."""
        from qbert.quant.onnx_ops import dequantize_weight, gather_last, quantize_dequantize

        x = x.float()
        if self.permutation is not None:
            x = gather_last(x, self.permutation)
        out = None
        for g in range(self.groups):
            part = x if self.groups == 1 else x[..., g * self.size:(g + 1) * self.size]
            part = quantize_dequantize(part, self.group_scale[g], self.group_zero[g], self.qmin, self.qmax)
            codes = getattr(self, f"weight_{g}")
            if self.digits == 1:
                weight = dequantize_weight(codes, self.weight_scale)
            else:
                weight = codes.float() * self.weight_scale.reshape(-1, 1)
            part = torch.matmul(part, weight.t())
            out = part if out is None else out + part
        return out if self.bias is None else out + self.bias


class FrozenWeight(nn.Module):
    """The forward of an embedding table or linear layer with its quantized weight computed once (the
    value its weight parametrization returns at every call of the simulated model)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.embedding = isinstance(module, nn.Embedding)
        with torch.no_grad():
            self.register_buffer("weight", module.weight.detach().clone(), persistent=False)
        self.options = ((module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq,
                         module.sparse) if self.embedding else ())
        self.bias = None if self.embedding else module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:
            return nn.functional.embedding(x, self.weight, *self.options)
        return nn.functional.linear(x, self.weight, self.bias)


def integer_gemms(inst: Any) -> dict[str, Any]:
    """Switch every eligible linear layer of ``inst`` (an instrumented model with frozen ranges) to
    :class:`IntegerGemm`, in place. Returns which GEMMs run on integers and why the others do not."""
    from qbert.quant.sites import linear_inputs, weight_modules

    modules = weight_modules(inst.model)
    integer: list[str] = []
    wide: list[str] = []  # 9- to 16-bit inputs: two int8 GEMMs each
    floating: dict[str, str] = {}
    for site, source in linear_inputs(inst.model).items():
        module = modules.get(site)
        wq, aq = inst.quantizers.get(site), inst.quantizers.get(source)
        reason = _not_integer(wq, aq, source)
        if module is None or reason:
            floating[site.removesuffix(".weight")] = reason or "no such layer"
            continue
        codes = wq.integer_codes(inst.weight_tensors[site])
        gemm = IntegerGemm(module, codes, wq.scale.detach(), aq).to(inst.weight_tensors[site].device)
        module.integer_gemm = gemm
        module.forward = gemm.forward  # hooks on the module (its output's fake quantization) stay
        integer.append(site.removesuffix(".weight"))
        if gemm.digits == 2:
            wide.append(site.removesuffix(".weight"))
    for site, module in modules.items():
        if site in inst.quantizers and "integer_gemm" not in module._modules and _freezable(module):
            module.frozen_weight = FrozenWeight(module)
            module.forward = module.frozen_weight.forward
    return {"integer": integer, "float": floating, "two_int8_gemms": wide,
            "kernel": "torch._int_mm (int8 x int8 -> int32)"}


def float_gemms(inst: Any) -> None:
    """Undo :func:`integer_gemms`: every linear layer computes the simulated float GEMM again."""
    for module in inst.model.modules():
        for name in ("integer_gemm", "frozen_weight"):
            if name in module._modules:
                del module._modules[name]
                module.__dict__.pop("forward", None)


def _freezable(module: nn.Module) -> bool:
    return type(module) in (nn.Embedding, nn.Linear)


def _not_integer(wq: Quantizer | None, aq: Quantizer | None, source: str) -> str | None:
    if wq is None:
        return "weight in floating point"
    if aq is None:
        return f"input {source} in floating point"
    if wq.spec.bits > 8 or not wq.spec.symmetric:
        kind = "symmetric" if wq.spec.symmetric else "asymmetric"
        return f"weight {wq.spec.bits}-bit {kind} (int8 needs <= 8 bits, symmetric)"
    if wq.spec.granularity not in ("per_tensor", "per_channel"):
        return f"weight granularity {wq.spec.granularity}"
    if aq.qmax - aq.qmin >= 2**16:
        return f"input {source} at {aq.spec.bits} bits (at most 16: two int8 digits)"
    if aq.spec.granularity == "per_channel":
        return f"input {source} per channel"
    if aq.state != "fixed":
        return f"input {source} range not frozen ({aq.state})"
    return None
