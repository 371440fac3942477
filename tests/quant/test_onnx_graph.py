"""The passes that make an exported graph deployable (qbert.quant.onnx_graph): on a tiny BERT quantized under
each placement, the deployable graph computes exactly what the traced one computes, stores every weight once
as integer codes, keeps one quantizer per grid, and the fused graph keeps every grid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
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


@pytest.mark.parametrize("placement", ["all", "gemm"])
def test_the_deployable_graph_computes_what_the_traced_graph_computes(placement, tmp_path):
    q = _quantized(placement)
    traced = _export(q, tmp_path / "traced.onnx", "traced")
    deploy = _export(q, tmp_path / "deployable.onnx", "deployable")
    fused = _export(q, tmp_path / "fused.onnx", "fused")
    inputs = _inputs()
    outputs = {name: OnnxModel(tmp_path / f"{name}.onnx")(**inputs).logits.numpy()
               for name in ("traced", "deployable", "fused")}
    # folding weights into codes, dropping re-quantizations of a value on its own grid: the same arithmetic
    np.testing.assert_array_equal(outputs["deployable"], outputs["traced"])
    assert deploy["requantizations_dropped"] > 0 and deploy["tables_folded"] == 3
    assert deploy["quantize_linear"] == traced["quantize_linear"] - deploy["requantizations_dropped"] - 3
    # every grid of the traced graph is still there; the fusions change float rounding only, so a value within
    # rounding of a grid boundary may move one step (none does on these inputs)
    assert _grids(tmp_path / "fused.onnx") == _grids(tmp_path / "deployable.onnx") <= _grids(tmp_path / "traced.onnx")
    head = q.quantizers["head.output"].scale.item() if "head.output" in q.quantizers else 1e-3
    assert np.abs(outputs["fused"] - outputs["deployable"]).max() <= 2 * head
    assert (outputs["fused"].argmax(1) == outputs["deployable"].argmax(1)).all()
    if placement == "gemm":  # residual sums and LayerNorm in float: onnxruntime's SkipLayerNormalization
        assert fused["fused"].get("SkipLayerNormalization", 0) >= 4
        _assert_weights_stored_once(tmp_path / "fused.onnx", tmp_path)


def _assert_weights_stored_once(path, tmp_path):
    import qbert

    model, tokenizer = tiny_model()
    qbert.export(qbert.quantize(model, "fp32", tokenizer=tokenizer), "onnx", tmp_path / "fp32")
    proto = onnx.load(str(path))
    floats = sum(numpy_helper.to_array(i).size for i in proto.graph.initializer
                 if i.data_type == onnx.TensorProto.FLOAT)
    codes = sum(numpy_helper.to_array(i).size for i in proto.graph.initializer
                if i.data_type == onnx.TensorProto.INT8)
    weights = sum(p.numel() for p in model.parameters())
    assert codes >= 0.95 * weights and floats <= 0.05 * weights  # biases, LayerNorms, scales: float
    assert path.stat().st_size <= 0.3 * (tmp_path / "fp32" / "model.onnx").stat().st_size
