"""ONNX export with QuantizeLinear / DequantizeLinear at qbert's own sites, and an onnxruntime runner.

The model is exported by ``torch.onnx.export`` (the torch.export-based exporter) while every quantizer
emits ``QuantizeLinear -> DequantizeLinear`` with its own scale and zero point (per tensor, or per axis
for per-channel and per-embedding-group grids) instead of its fake-quantization arithmetic: the ONNX
graph holds the simulation's grids, not a re-calibration. Grids narrower than their ONNX type
(``[-127, 127]`` in int8) clamp first; 16-bit grids use (u)int16, which needs opset 21.

Linear layers on integer GEMMs (:mod:`qbert.quant.integer_model`) are written as ONNX runtimes fuse
them: ``DequantizeLinear`` of the int8 weight codes (see :func:`qbert.quant.onnx_ops.dequantize_weight`) and a
per-tensor ``Q -> DQ`` of the input right before the ``MatMul``; a per-embedding-group input becomes
Bondarenko et al.'s Figure 4 (the input gathered in the permuted order, K slices, K MatMuls summed), so
every GEMM input is per tensor, as integer kernels need. The traced graph is then made deployable
(:func:`qbert.quant.onnx_graph.deployable`: weights stored once as codes, one quantizer per grid, the float
parts fused) without changing a quantized value. The attention-mask path carries no quantizer, so it stays
in floating point.

The file records, in its metadata, the onnxruntime session settings it needs (:data:`SESSION_CONFIG_KEY`):
``session.x64quantprecision=1``, under which onnxruntime runs int8 x int8 GEMMs exactly on x86 CPUs without
VNNI (AVX2, AVX-512 before Cascade Lake, AMD before Zen 4). There its default U8S8 kernel sums pairs of
uint8 x int8 products in saturating 16-bit lanes (VPMADDUBSW), so an input near its range times two large
weights of one sign comes out clipped; the option rewrites the weights to uint8 at load and runs U8U8,
which is exact. CPUs with VNNI or AMX compute U8S8 exactly and ignore it. :class:`OnnxModel` (and so
``qbert.load``) applies what the file records.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from qbert.quant.onnx_ops import OPSET

SESSION_CONFIG_KEY = "qbert.onnxruntime.session_config"
EXACT_INT8 = {"session.x64quantprecision": "1"}


def export_onnx_model(model: torch.nn.Module, path: Path, sample: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None, graph: str = "fused") -> dict[str, Any]:
    """Export ``model`` (instrumented, quantizers frozen) to ``path`` with dynamic batch and sequence
    axes; ``sample``: keyword inputs of at least two rows and two tokens. ``graph``: ``fused`` (deployable,
    with onnxruntime's transformer fusions), ``deployable`` (the same without fusions) or ``traced`` (as
    torch.onnx wrote it, constants folded: for comparisons). Returns the graph's facts."""
    import json
    import logging
    import warnings

    import onnx

    from qbert.files import fsync_path
    from qbert.quant.onnx_graph import deployable
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
    heads, hidden = _attention_shape(model)
    if graph not in ("fused", "deployable", "traced"):
        raise ValueError(f"graph {graph!r}: fused, deployable or traced")
    if graph == "traced":  # constants folded and zero points unshared only: what the session option needs
        from qbert.quant.onnx_graph import fold_constants, own_zero_points

        facts: dict[str, Any] = {"constants_folded": fold_constants(proto)}
        own_zero_points(proto)
    else:
        facts = deployable(proto, num_heads=heads, hidden_size=hidden, fuse=graph == "fused")
    integer = any(i.data_type == onnx.TensorProto.INT8 for i in proto.graph.initializer)
    session_config = EXACT_INT8 if integer else {}
    for key, value in {**(metadata or {}), SESSION_CONFIG_KEY: json.dumps(session_config)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    fsync_path(tmp)
    tmp.replace(path)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": OPSET, "inputs": list(sample), "outputs": names, **facts, "session_config": session_config,
            "quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0)}


def _attention_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(heads, hidden size) for the transformer fusions; (0, 0) lets onnxruntime read them from the graph."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or 0
    return int(heads), int(hidden)


def session_config(path: str | Path) -> dict[str, str]:
    """The onnxruntime session settings a qbert file records (:data:`SESSION_CONFIG_KEY`); files written
    before it recorded them store uint8 weights, exact without any."""
    import json

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == SESSION_CONFIG_KEY:
            return {str(k): str(v) for k, v in json.loads(entry.value).items()}
    return {}


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
        self.session_config = session_config(path)
        for key, value in self.session_config.items():
            options.add_session_config_entry(key, value)
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
