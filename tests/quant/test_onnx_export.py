"""ONNX export: onnxruntime's QuantizeLinear / DequantizeLinear (an independent implementation) against
qbert's fake quantization, folded weight codes against qbert's codes, a converted tiny model against
its simulation on fixed inputs, and the pipeline's onnxruntime evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qbert.quant.estimators import CurrentMinMax
from qbert.quant.onnx_export import EXACT_INT8, OnnxModel, export_onnx_model, session_config
from qbert.quant.onnx_graph import fold_weight_quantization
from qbert.quant.quantizer import Quantizer
from qbert.quant.spec import QuantSpec
from tests.conftest import PAIRS, frozen_quantizer, tiny_config, tiny_model

GRIDS = {
    "asymmetric_8bit": QuantSpec(bits=8),
    "symmetric_8bit": QuantSpec(bits=8, symmetric=True),
    "symmetric_narrow": QuantSpec(bits=8, symmetric=True, narrow=True),
    "asymmetric_4bit": QuantSpec(bits=4),
    "asymmetric_16bit": QuantSpec(bits=16),
    "per_embedding": QuantSpec(bits=8, granularity="per_channel"),
    "peg_k3_permuted": QuantSpec(bits=8, granularity="per_embedding_group", groups=3, permute=True),
}


class _Quantize(torch.nn.Module):
    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.quantizer(x)}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_onnxruntime_quantizes_on_qbert_grids(name, tmp_path):
    spec = GRIDS[name]
    torch.manual_seed(0)
    calibration = torch.randn(4, 9, 12) * torch.linspace(0.2, 5, 12)
    q = frozen_quantizer(spec, calibration, calibration * 0.8)  # inputs beyond the range get clipped
    module = _Quantize(q).eval()
    sample = {"x": torch.randn(2, 5, 12) * 3}
    export_onnx_model(module, tmp_path / "q.onnx", sample)
    x = torch.randn(3, 7, 12) * torch.linspace(0.2, 5, 12) * 1.3
    got = OnnxModel(tmp_path / "q.onnx")(x=x).out.numpy()
    expected = q(x).numpy()
    steps = np.abs(got - expected) / q._broadcast(q.scale.detach(), x).numpy()
    # onnxruntime divides x by the scale as qbert does: the same grid value everywhere, except where
    # x / s sits within float rounding of a .5 boundary (at most one step, and rarely)
    assert steps.max() <= 1.0 + 1e-4
    assert (steps > 1e-3).mean() <= 0.002


def _weight_quantizer(rows: int, cols: int) -> tuple[Quantizer, torch.nn.Parameter]:
    torch.manual_seed(1)
    wq = Quantizer(QuantSpec(bits=8, symmetric=True, granularity="per_channel"), CurrentMinMax(), channels=rows,
                   channel_dim=0)
    weight = torch.nn.Parameter(torch.randn(rows, cols))
    wq.observe(weight.detach())
    wq.freeze()
    return wq, weight


class _WeightUser(torch.nn.Module):
    def __init__(self, wq: Quantizer, weight: torch.nn.Parameter, embedding: bool) -> None:
        super().__init__()
        self.weight, self.wq, self.embedding = weight, wq, embedding

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        w = self.wq(self.weight)
        return {"out": torch.nn.functional.embedding(x, w) if self.embedding else x @ w.t()}


def _initializers(path: Path, dtype: int) -> list[np.ndarray]:
    proto = onnx.load(str(path))
    return [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == dtype and len(i.dims) == 2]


def test_an_embedding_table_is_stored_as_qbert_codes(tmp_path):
    wq, weight = _weight_quantizer(30, 8)
    export_onnx_model(_WeightUser(wq, weight, True).eval(), tmp_path / "e.onnx", {"x": torch.tensor([[1, 2], [3, 4]])})
    assert not [n for n in onnx.load(str(tmp_path / "e.onnx")).graph.node if n.op_type == "QuantizeLinear"]
    codes = _initializers(tmp_path / "e.onnx", onnx.TensorProto.INT8)
    assert len(codes) == 1 and not _initializers(tmp_path / "e.onnx", onnx.TensorProto.FLOAT)
    np.testing.assert_array_equal(codes[0], wq.integer_codes(weight).numpy())  # folded offline, as qbert computes
    ids = torch.randint(0, 30, (3, 5))
    np.testing.assert_array_equal(OnnxModel(tmp_path / "e.onnx")(x=ids).out.numpy(), wq(weight)[ids].detach().numpy())


def test_a_weight_only_gemm_keeps_its_float_input(tmp_path):
    import onnxruntime as ort

    wq, weight = _weight_quantizer(6, 10)
    export_onnx_model(_WeightUser(wq, weight, False).eval(), tmp_path / "w.onnx", {"x": torch.randn(2, 3, 10)})
    assert not [n for n in onnx.load(str(tmp_path / "w.onnx")).graph.node if "QuantizeLinear" in n.op_type]
    stored = _initializers(tmp_path / "w.onnx", onnx.TensorProto.FLOAT)
    assert len(stored) == 1
    on_grid = wq(weight).detach().numpy()  # on the grid, in float (stored transposed, as the MatMul reads it)
    np.testing.assert_array_equal(stored[0].T if stored[0].shape != on_grid.shape else stored[0], on_grid)
    # a DequantizeLinear(int8) -> MatMul would become MatMulNBits, which quantizes the input to int8
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "w.onnx"), options)
    assert "MatMulNBits" not in {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    x = torch.randn(4, 2, 10)
    np.testing.assert_allclose(OnnxModel(tmp_path / "w.onnx")(x=x).out.numpy(),
                               (x @ wq(weight).t()).detach().numpy(), rtol=1e-5, atol=1e-5)


class _Gemm(torch.nn.Module):
    def __init__(self, gemm: torch.nn.Module) -> None:
        super().__init__()
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.gemm(x)}


@pytest.mark.parametrize("bits,fused", [(8, "MatMulIntegerToFloat"), (16, None)])
def test_an_integer_gemm_runs_in_onnxruntime_as_its_input_grid_allows(bits, fused, tmp_path):
    import onnxruntime as ort

    from qbert.quant.integer_model import IntegerGemm

    torch.manual_seed(2)
    x = torch.nn.functional.gelu(torch.randn(4, 6, 16) * 3)  # one-sided: a zero point far from the middle
    aq = frozen_quantizer(QuantSpec(bits=bits), x, channels=16)
    wq, weight = _weight_quantizer(8, 16)
    linear = torch.nn.Linear(16, 8)
    gemm = IntegerGemm(linear, wq.integer_codes(weight), wq.scale.detach(), aq)
    export_onnx_model(_Gemm(gemm).eval(), tmp_path / "g.onnx", {"x": x})
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "g.onnx"), options)
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    ops = {n.op_type for n in optimized.node}
    # 8-bit: onnxruntime's integer GEMM; 16-bit: a float MatMul on the grids, never MatMulNBits (int8 input)
    assert "MatMulNBits" not in ops and (fused is None or fused in ops)
    # int8 weights, and the session option that makes onnxruntime's int8 GEMM exact on CPUs without VNNI
    # (its U8S8 kernel saturates pairs of products in 16 bits there): recorded in the file, applied by OnnxModel
    stored = {i.name: i.data_type for i in onnx.load(str(tmp_path / "g.onnx")).graph.initializer}
    matmul_weights = [stored.get(n.input[0]) for n in onnx.load(str(tmp_path / "g.onnx")).graph.node
                      if n.op_type == "DequantizeLinear" and n.input[0] in stored]
    assert matmul_weights == ([onnx.TensorProto.INT8] if bits == 8 else [])
    assert session_config(tmp_path / "g.onnx") == (EXACT_INT8 if bits == 8 else {})
    assert OnnxModel(tmp_path / "g.onnx").session_config == session_config(tmp_path / "g.onnx")
    expected = (aq(x).double() @ wq(weight).detach().double().t() + linear.bias.detach().double()).numpy()
    got = OnnxModel(tmp_path / "g.onnx")(x=x).out.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_fold_leaves_activation_quantization_alone():
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z")],
    )
    proto = helper.make_model(graph)
    assert fold_weight_quantization(proto) == 0 and len(proto.graph.node) == 2


def _tiny_quantized(recipe: str, **params):
    import qbert

    model, tokenizer = tiny_model()
    return qbert.quantize(model, {"name": recipe, **params}, calibration=PAIRS, tokenizer=tokenizer,
                          calibrate={"batches": 4, "batch_size": 4})


@pytest.mark.parametrize("recipe,params", [("w8a8_ptq", {}), ("peg", {"groups": 4}),
                                           ("mp_ptq", {"preset": "ffn_sum_io"})])
def test_the_onnx_model_computes_the_simulation(recipe, params, tmp_path):
    import qbert

    q = _tiny_quantized(recipe, **params)
    facts = qbert.export(q, "onnx", tmp_path)
    assert facts["integer_gemms"] == (14 if recipe != "mp_ptq" else 12)
    runner = OnnxModel(facts["path"])
    torch.manual_seed(3)
    ids = torch.randint(1000, 20000, (16, 24))
    mask = torch.ones_like(ids)
    mask[8:, 15:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        simulated = q.model(**inputs).logits.numpy()
    exported = runner(**inputs).logits.numpy()
    head = q.quantizers["head.output"].scale.item()
    # the same grids; the GEMMs differ only in float rounding (int32 accumulators in onnxruntime), so a
    # value within rounding of a grid boundary can move one step and later layers carry it on
    assert np.abs(exported - simulated).max() <= 8 * head
    assert (exported.argmax(1) == simulated.argmax(1)).mean() >= 0.9
    proto = onnx.load(facts["path"])
    assert {p.key for p in proto.metadata_props} >= {"qbert.recipe", "qbert.arithmetic"}
    assert (tmp_path / "tokenizer.json").is_file()


def test_the_pipeline_evaluates_the_onnx_file_on_onnxruntime(real_data, tmp_path):
    from qbert.pipeline.run import run_experiment
    from qbert.runs import read_json

    cfg = tiny_config(real_data, {"name": "w8a8_ptq"}, name="onnx_w8a8", export={"formats": ["onnx"]})
    folder = run_experiment(cfg, root=tmp_path).folder / "seed=0"
    record = read_json(folder / "metrics.json")
    onnx_eval = record["onnx"]
    assert onnx_eval["simulated"] is False and onnx_eval["runtime"].startswith("onnxruntime")
    assert set(onnx_eval["metrics"]) == set(record["metrics"]) == {"f1", "accuracy"}
    dev = onnx_eval["agreement"]["dev"]
    assert dev["examples"] == 32 and dev["equal_predictions"] >= 0.9
    assert abs(onnx_eval["metrics"]["accuracy"] - record["metrics"]["accuracy"]) <= 100 * 3 / 32
    assert Path(folder / record["exports"]["onnx"]["path"]).is_file()
    assert (folder / "predictions-onnx.jsonl").is_file()
