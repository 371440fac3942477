"""The passes that make an exported graph deployable (qbert.quant.onnx_graph): on a tiny BERT quantized under
placement gemm, the deployable graph computes exactly what the traced one computes, stores every weight once
as integer codes, keeps one quantizer per grid, and the fused graph keeps every grid."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from qbert.quant.onnx_export import OnnxModel
from tests.conftest import PAIRS, tiny_model


def _quantized(placement: str):
    import qbert

    model, tokenizer = tiny_model()
    return qbert.quantize(model, {"name": "w8a8_ptq", "placement": placement}, calibration=PAIRS,
                          tokenizer=tokenizer, calibrate={"batches": 4, "batch_size": 4})


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1000, 20000, (16, 24))
    mask = torch.ones_like(ids)
    mask[8:, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _export(q, path, graph: str) -> dict:
    from qbert.pipeline.export import export_onnx

    (path.parent / path.stem).mkdir()
    facts = export_onnx(q, path.parent / path.stem, graph=graph)
    (path.parent / path.stem / "model.onnx").replace(path)
    return facts


def _grids(path) -> set[tuple]:
    proto = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {(values[n.input[1]].tobytes(), values[n.input[2]].tobytes()) for n in proto.graph.node
            if n.op_type == "QuantizeLinear"}


def test_the_deployable_graph_computes_what_the_traced_graph_computes(tmp_path):
    from qbert.quant.onnx_export import _attention_shape
    from qbert.quant.onnx_graph import deployable

    q = _quantized("gemm")  # re-quantizations behind sites and reshapes, float LayerNorms to fuse
    traced = _export(q, tmp_path / "traced.onnx", "traced")
    heads, hidden = _attention_shape(q.model)
    facts = {}
    for name, fuse in (("deployable", False), ("fused", True)):  # the passes on the traced graph, as the export
        proto = onnx.load(str(tmp_path / "traced.onnx"))
        facts[name] = deployable(proto, num_heads=heads, hidden_size=hidden, fuse=fuse)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp_path / f"{name}.onnx"))
    inputs = _inputs()
    outputs = {name: OnnxModel(tmp_path / f"{name}.onnx")(**inputs).logits.numpy()
               for name in ("traced", "deployable", "fused")}
    # folding weights into codes, dropping re-quantizations of a value on its own grid: the same arithmetic
    np.testing.assert_array_equal(outputs["deployable"], outputs["traced"])
    deploy = facts["deployable"]
    assert deploy["requantizations_dropped"] > 0 and deploy["tables_folded"] == 3
    quantizers = {name: sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
                  for name in ("traced", "deployable")}
    assert traced["quantize_linear"] == quantizers["traced"]
    assert quantizers["deployable"] == quantizers["traced"] - deploy["requantizations_dropped"] - 3
    # every grid of the traced graph is still there; the fusions change float rounding only, so a value within
    # rounding of a grid boundary may move one step (none does on these inputs)
    assert _grids(tmp_path / "fused.onnx") == _grids(tmp_path / "deployable.onnx") <= _grids(tmp_path / "traced.onnx")
    head = q.quantizers["head.output"].scale.item() if "head.output" in q.quantizers else 1e-3
    assert np.abs(outputs["fused"] - outputs["deployable"]).max() <= 2 * head
    assert (outputs["fused"].argmax(1) == outputs["deployable"].argmax(1)).all()
    # residual sums and LayerNorm in float under gemm: onnxruntime's SkipLayerNormalization
    assert facts["fused"]["fused"].get("SkipLayerNormalization", 0) >= 4

    # weights stored once: int8 codes for (almost) every parameter, the file at most 30% of float32 weights
    proto = onnx.load(str(tmp_path / "fused.onnx"))
    floats = sum(numpy_helper.to_array(i).size for i in proto.graph.initializer
                 if i.data_type == onnx.TensorProto.FLOAT)
    codes = sum(numpy_helper.to_array(i).size for i in proto.graph.initializer
                if i.data_type == onnx.TensorProto.INT8)
    weights = sum(p.numel() for p in q.model.parameters())
    assert codes >= 0.95 * weights and floats <= 0.05 * weights  # biases, LayerNorms, scales: float
    assert (tmp_path / "fused.onnx").stat().st_size <= 0.3 * 4 * weights

    # qbert.load runs the file as the runner does, with the session settings it records
    import qbert

    (tmp_path / "traced" / "model.onnx").write_bytes((tmp_path / "fused.onnx").read_bytes())
    loaded = qbert.load(tmp_path / "traced")
    assert loaded.arithmetic == "onnx" and loaded.recipe == "w8a8_ptq" and loaded.tokenizer is not None
    assert loaded.report["session_config"] == {"session.x64quantprecision": "1"}
    np.testing.assert_array_equal(loaded.model(**inputs).logits.numpy(), outputs["fused"])
