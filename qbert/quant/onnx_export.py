"""ONNX export with QuantizeLinear / DequantizeLinear at qbert's own sites, and an onnxruntime runner.

The model is exported by ``torch.onnx.export`` (the torch.export-based exporter) while every quantizer
emits ``QuantizeLinear -> DequantizeLinear`` with its own scale and zero point (per tensor, or per axis
for per-channel and per-embedding-group grids) instead of its fake-quantization arithmetic: the ONNX
graph holds the simulation's grids, not a re-calibration. Grids narrower than their ONNX type
(``[-127, 127]`` in int8) clamp first; 16-bit grids use (u)int16, which needs opset 21.

Linear layers on integer GEMMs (:mod:`qbert.quant.integer_model`) are written as ONNX runtimes fuse
them: ``DequantizeLinear`` of the weight codes (stored as uint8 with zero point 128: see
:func:`qbert.quant.onnx_ops.dequantize_weight`) and a per-tensor ``Q -> DQ`` of the input right before the ``MatMul``; a
per-embedding-group input becomes Bondarenko et al.'s Figure 4 (the input gathered in the permuted order,
K slices, K MatMuls summed), so every GEMM input is per tensor, as integer kernels need. Weights that still
pass through a ``QuantizeLinear`` (embeddings, layers left in floating point) are folded offline into
integer initializers. The attention-mask path carries no quantizer, so it stays in floating point.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from qbert.quant.onnx_ops import OPSET


def export_onnx_model(model: torch.nn.Module, path: Path, sample: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Export ``model`` (instrumented, quantizers frozen) to ``path`` with dynamic batch and sequence
    axes; ``sample``: keyword inputs of at least two rows and two tokens. Returns the graph's facts."""
    import logging
    import warnings

    import onnx

    from qbert.files import fsync_path
    from qbert.quant.quantizer import Quantizer

    model.eval()
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.onnx_ready()
    with torch.no_grad():
        names = [k for k, v in model(**sample).items() if v is not None]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=4096)
    dynamic = {k: {0: batch, 1: seq} for k in sample}
    tmp = path.with_name(path.name + ".tmp")
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (), str(tmp), kwargs=sample, dynamo=True, opset_version=OPSET,
                              input_names=list(sample), output_names=names, dynamic_shapes=dynamic,
                              verbose=False, external_data=False)
    finally:
        quiet.setLevel(level)
    proto = onnx.load(str(tmp))
    folded = fold_weight_quantization(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    fsync_path(tmp)
    tmp.replace(path)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": OPSET, "inputs": list(sample), "outputs": names, "folded_weights": folded,
            "quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0)}


def fold_weight_quantization(proto: Any) -> int:
    """Fold every ``QuantizeLinear`` of a constant (a weight) offline, computed as qbert computes it
    (:func:`qbert.quant.functional.integer_codes`). Returns how many.

    A weight read by a Gather (an embedding table) becomes its integer codes behind the
    ``DequantizeLinear``. A weight multiplied with a floating-point input (a weight-only quantized GEMM)
    becomes its de-quantized float values, which are exactly on its grid: onnxruntime fuses
    ``DequantizeLinear(int8) -> MatMul`` into MatMulNBits, which at its default accuracy level quantizes
    the input to int8 on the fly, a different model from the one evaluated."""
    import numpy as np
    from onnx import numpy_helper

    from qbert.quant.functional import integer_codes

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def tensor(a: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or not all(n in inits for n in node.input[:3]):
            continue
        x, scale, zp = (numpy_helper.to_array(inits[n]) for n in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale_b, zp_b = scale.reshape(shape), zp.reshape(shape)
        else:
            scale_b, zp_b = scale, zp
        info = np.iinfo(zp.dtype)
        codes = integer_codes(tensor(x), tensor(scale_b), tensor(zp_b), int(info.min), int(info.max))
        dequantizers = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
        consumers = _compute_readers([d.output[0] for d in dequantizers], readers)
        if dequantizers and consumers and all(c.op_type in ("MatMul", "Gemm") for c in consumers):
            values = ((codes - tensor(zp_b)) * tensor(scale_b)).numpy()  # what the DequantizeLinear computes
            for d in dequantizers:
                graph.initializer.append(numpy_helper.from_array(values, d.output[0]))
                graph.node.remove(d)
        else:
            graph.initializer.append(numpy_helper.from_array(codes.numpy().astype(zp.dtype), node.output[0]))
        graph.node.remove(node)
        folded += 1
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return folded


_LAYOUT_OPS = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten")


def _compute_readers(names: list[str], readers: dict[str, list[Any]]) -> list[Any]:
    """The nodes that compute with the tensors ``names``, looking through layout-only nodes."""
    found, todo = [], list(names)
    while todo:
        for node in readers.get(todo.pop(), []):
            if node.op_type in _LAYOUT_OPS:
                todo.append(node.output[0])
            else:
                found.append(node)
    return found


class OnnxModel(torch.nn.Module):
    """An exported ONNX model on onnxruntime's CPU provider, called like the HuggingFace model it came
    from (keyword tensors in, an object with ``logits`` / ``start_logits`` / ``end_logits`` out), so the
    evaluation loop runs it unchanged."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.runtime = f"onnxruntime {ort.__version__}"

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise ValueError(f"{self.path}: the model needs inputs {missing}")
        feed = {name: inputs[name].cpu().numpy() for name in self.input_names}
        values = self.session.run(self.output_names, feed)
        return SimpleNamespace(**{n: torch.from_numpy(v) for n, v in zip(self.output_names, values, strict=True)})
