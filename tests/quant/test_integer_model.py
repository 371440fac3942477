"""Integer GEMMs: int32 accumulators checked exactly against an independent integer computation, the
rescaled output against float64 arithmetic on the same grids, and the pipeline's integer evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qbert.config import parse_config
from qbert.errors import QbertError
from qbert.quant.estimators import CurrentMinMax
from qbert.quant.integer_model import IntegerGemm, _int_mm
from qbert.quant.quantizer import Quantizer
from qbert.quant.spec import QuantSpec
from tests.conftest import PAIRS, frozen_quantizer, tiny_config, tiny_model


def _setup(spec: QuantSpec, weight_bits: int = 8):
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 5)
    x = torch.randn(3, 7, 12) * torch.linspace(0.1, 6, 12)  # outlier-ish dimensions
    aq = frozen_quantizer(spec, x)
    wq = Quantizer(QuantSpec(bits=weight_bits, symmetric=True, granularity="per_channel"), CurrentMinMax(),
                   channels=5, channel_dim=0)
    wq.observe(linear.weight.detach())
    wq.freeze()
    codes = wq.integer_codes(linear.weight.detach())
    return linear, x, aq, wq, codes


SPECS = {
    "per_tensor": QuantSpec(bits=8),
    "peg_k3_permuted": QuantSpec(bits=8, granularity="per_embedding_group", groups=3, permute=True),
    "peg_k4": QuantSpec(bits=8, granularity="per_embedding_group", groups=4),
    "symmetric_narrow": QuantSpec(bits=8, symmetric=True, narrow=True),
    "16bit": QuantSpec(bits=16),  # two int8 digits
    "16bit_symmetric": QuantSpec(bits=16, symmetric=True),
    "12bit_peg_k3_permuted": QuantSpec(bits=12, granularity="per_embedding_group", groups=3, permute=True),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("weight_bits", [8, 4])
def test_integer_gemm_equals_the_integer_arithmetic(name, weight_bits):
    spec = SPECS[name]
    linear, x, aq, wq, codes = _setup(spec, weight_bits)
    gemm = IntegerGemm(linear, codes, wq.scale.detach(), aq)
    x_hat = aq(x)  # what the linear layer receives in the simulated model: values on the input grid

    # independent integer arithmetic (numpy, int64): input codes by the textbook formula
    s = aq.scale.detach().numpy()
    z = aq.zero_point.detach().numpy()
    position = np.empty(12, dtype=np.int64)
    perm = aq.permutation.numpy() if aq.permutation is not None else np.arange(12)
    position[perm] = np.arange(12)
    group = position * aq.groups // 12 if spec.granularity == "per_embedding_group" else np.zeros(12, np.int64)
    xs = x.reshape(-1, 12).numpy().astype(np.float64)
    q = np.clip(np.round(xs / s[group]) + z[group], aq.qmin, aq.qmax).astype(np.int64)
    assert (q > 255).any() == (spec.bits > 8)  # the wide cases use their range
    qw = codes.numpy().astype(np.int64)
    columns = perm if gemm.permutation is not None else np.arange(12)
    digits = [d.numpy().astype(np.int64) for d in gemm.input_codes(x_hat.reshape(-1, 12))]
    assert all(d.min() >= -128 and d.max() <= 127 for d in digits)
    shift = 128 if aq.qmax > 127 else 0  # int8 codes of unsigned 8-bit grids
    if spec.bits > 8:  # q - c = 256 h + l
        assert len(digits) == 2
        shift = aq.qmin + 32896
    np.testing.assert_array_equal(digits[0] * 256 + digits[1] if len(digits) == 2 else digits[0],
                                  (q - shift)[:, columns])
    size = 12 // gemm.groups
    for g in range(gemm.groups):
        dims = columns[g * size:(g + 1) * size]
        for d in digits:
            acc = _int_mm(torch.tensor(d[:, g * size:(g + 1) * size], dtype=torch.int8),
                          getattr(gemm, f"weight_{g}").t())
            np.testing.assert_array_equal(acc.numpy(), d[:, g * size:(g + 1) * size] @ qw[:, dims].T)  # exact

    # the rescaled output: float64 of s_x s_w (q_x - z_x) q_w + b on the same grids
    sw = wq.scale.detach().numpy().astype(np.float64).reshape(-1, 1)
    expected = ((q - z[group]) * s[group]) @ (qw * sw).T + linear.bias.detach().numpy()
    got = gemm(x_hat).reshape(-1, 5).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def tiny(real_data: Path, recipe: dict, **extra):
    return tiny_config(real_data, recipe, name=f"int_{recipe['name']}", **extra)


def test_the_pipeline_evaluates_the_integer_model_beside_the_simulation(real_data, tmp_path, monkeypatch):
    import qbert.pipeline.run as run_module
    from qbert.pipeline.run import run_experiment
    from qbert.runs import read_json

    monkeypatch.setattr(run_module, "slow_int8_gemm", lambda device: False)  # torch._int_mm on every CPU

    cfg = tiny(real_data, {"name": "peg", "groups": 4}, evaluate={"integer": True}, export={"formats": ["integer"]})
    folder = run_experiment(cfg, root=tmp_path).folder / "seed=0"
    record = read_json(folder / "metrics.json")
    integer = record["integer"]
    assert record["simulated"] is True and integer["simulated"] is False and integer["arithmetic"] == "integer"
    assert set(integer["metrics"]) == {"f1", "accuracy"}
    assert len(integer["gemms"]["integer"]) == 2 * 6 + 2 and integer["gemms"]["float"] == {}
    assert integer["gemms"]["kernel"].startswith("torch._int_mm")
    dev = integer["agreement"]["dev"]
    assert dev["examples"] == 32 and 0.9 <= dev["equal_predictions"] <= 1.0
    assert (folder / "predictions-integer.jsonl").is_file()
    assert record["exports"]["integer"]["bit_exact"]  # the float GEMMs are back for the export
    assert "evaluate_integer" in record["timings"]


def test_16_bit_inputs_run_as_two_int8_gemms_and_float_inputs_stay_float(real_data, tmp_path):
    import qbert

    cfg = tiny(real_data, {"name": "mp_ptq", "preset": "ffn_sum_io"})
    from qbert.pipeline.run import run_experiment

    checkpoint = run_experiment(cfg, root=tmp_path).seeds[0].folder
    q = qbert.quantize(str(checkpoint), {"name": "mp_ptq", "preset": "ffn_sum_io"}, calibration="mrpc",
                       data={"dir": str(real_data), "max_train_samples": 64}, max_seq_len=64,
                       calibrate={"batches": 2, "batch_size": 4})
    gemms = qbert.to_integer(q).report["gemms"]
    # the two GEMMs whose input is kept at 16 bits run as two int8 GEMMs each; the rest as one
    assert sorted(gemms["two_int8_gemms"]) == ["layer.0.ffn.intermediate", "layer.1.ffn.intermediate"]
    assert gemms["float"] == {} and len(gemms["integer"]) == 14
    weights_only = qbert.quantize(str(checkpoint), {"name": "w8a32_ptq"}, calibration="mrpc",
                                  data={"dir": str(real_data), "max_train_samples": 64}, max_seq_len=64,
                                  calibrate={"batches": 2, "batch_size": 4})
    gemms = qbert.to_integer(weights_only).report["gemms"]
    assert gemms["integer"] == [] and len(gemms["float"]) == 14
    assert gemms["float"]["layer.0.ffn.intermediate"] == "input layer.0.ffn.input in floating point"


def test_integer_evaluation_needs_uniform_quantizers():
    with pytest.raises(QbertError, match="evaluate.integer: recipe gobo has no uniform quantizers"):
        parse_config({"recipe": {"name": "gobo"}, "evaluate": {"integer": True}})


@pytest.mark.parametrize("recipe", [{"name": "w8a8_ptq"}, {"name": "peg", "groups": 4},
                                    {"name": "w4a8_qat", "epochs": 1}, {"name": "w8a8_qat", "epochs": 1}])
def test_load_rebuilds_the_integer_model_of_an_integer_export(recipe, tmp_path):
    import qbert

    model, tokenizer = tiny_model()
    texts = PAIRS
    if recipe["name"].endswith("_qat"):  # trained methods: prepare -> (no training) -> convert
        q = qbert.convert(qbert.prepare(model, recipe, calibration=texts, tokenizer=tokenizer,
                                        calibrate={"batches": 2, "batch_size": 4}), calibration=texts)
    else:
        q = qbert.quantize(model, recipe, calibration=texts, tokenizer=tokenizer,
                           calibrate={"batches": 2, "batch_size": 4})
    qbert.export(q, "integer", tmp_path)
    loaded = qbert.load(tmp_path)
    assert loaded.arithmetic == "integer" and loaded.recipe == recipe["name"] and loaded.tokenizer is not None
    original = qbert.to_integer(q)
    assert loaded.report["gemms"]["integer"] == original.report["gemms"]["integer"]
    assert {s: (x.spec, x.state) for s, x in loaded.quantizers.items()} == {
        s: (x.spec.model_copy(update={"estimator": "minmax", "ste": "clipped"}), x.state)
        for s, x in original.quantizers.items()}
    ids = torch.randint(1000, 20000, (4, 20))
    mask = torch.ones_like(ids)
    mask[2:, 12:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, original.model(**inputs).logits, rtol=0, atol=0)


def test_load_says_what_is_missing(tmp_path):
    import qbert

    with pytest.raises(QbertError, match="holds no qbert export"):
        qbert.load(tmp_path)


def test_load_of_a_packed_gobo_export_gives_the_decoded_model(tmp_path):
    """A packed export loads as GOBO's decoded model: the same logits as the quantized model it was written
    from (an independent path: the in-memory model against the file's codes, decoded)."""
    import qbert

    model, tokenizer = tiny_model()
    q = qbert.quantize(model, {"name": "gobo", "bits": 3}, tokenizer=tokenizer)
    qbert.export(q, "packed", tmp_path)
    loaded = qbert.load(tmp_path)
    assert (loaded.recipe, loaded.arithmetic) == ("gobo", "decoded") and loaded.tokenizer is not None
    ids = torch.randint(1000, 20000, (2, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, q.model.eval()(**inputs).logits, rtol=0, atol=0)


def test_dynamic_int8_exports_torchscript_that_loads_without_qbert(real_data, tmp_path):
    import subprocess
    import sys

    import qbert
    from qbert.pipeline.run import run_experiment
    from qbert.runs import read_json

    cfg = tiny(real_data, {"name": "dynamic_int8"}, export={"formats": ["torchscript"]})
    folder = run_experiment(cfg, root=tmp_path).folder / "seed=0"
    record = read_json(folder / "metrics.json")
    written = record["exports"]["torchscript"]
    assert written["reload_exact"] and written["inputs"] == ["input_ids", "token_type_ids", "attention_mask"]
    # qbert.load gives a model the evaluation loop runs: the run's metrics again
    loaded = qbert.load(folder)
    assert loaded.recipe == "dynamic_int8"
    metrics = qbert.evaluate(loaded, "mrpc", data_dir=real_data, max_seq_len=64, max_eval_samples=32)
    assert metrics == record["metrics"]
    # and torch alone runs the file (a process that never imports qbert or transformers)
    script = ("import sys, torch; m = torch.jit.load(sys.argv[1]); ids = torch.tensor([[101, 2023, 102]]); "
              "out = m(ids, torch.zeros_like(ids), torch.ones_like(ids)); "
              "assert 'qbert' not in sys.modules and 'transformers' not in sys.modules; print(out['logits'].shape)")
    result = subprocess.run([sys.executable, "-c", script, str(folder / written["path"])], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "torch.Size([1, 2])"


def test_a_damaged_integer_file_is_refused_in_one_line(tmp_path):
    """A flipped byte in any tensor fails the checksum; a class name from the file is never looked up."""
    import json

    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    import qbert
    from qbert.quant.fileformat import CHECKSUM_KEY, tensors_checksum
    from qbert.quant.integer import instrumented_from_integer

    model, tokenizer = tiny_model()
    q = qbert.quantize(model, "w8a8_ptq", calibration=PAIRS, tokenizer=tokenizer,
                       calibrate={"batches": 2, "batch_size": 4})
    qbert.export(q, "integer", tmp_path / "export")
    path = next((tmp_path / "export").rglob("*.safetensors"))
    with safe_open(str(path), framework="np") as f:
        meta, raw = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in raw if raw[k].dtype == np.uint8)
    flipped = raw[name].copy()
    flipped.reshape(-1)[7] ^= 0x10
    save_file({**raw, name: flipped}, str(tmp_path / "flipped.safetensors"), metadata=meta)
    with pytest.raises(QbertError, match="do not match the file's checksum"):
        instrumented_from_integer(tmp_path / "flipped.safetensors")
    foreign = {**meta, "architecture": "BertTokenizer"}
    foreign[CHECKSUM_KEY] = tensors_checksum(raw)
    save_file(raw, str(tmp_path / "foreign.safetensors"), metadata=foreign)
    with pytest.raises(QbertError, match="architecture 'BertTokenizer' is not one qbert writes"):
        instrumented_from_integer(tmp_path / "foreign.safetensors")
    assert json.loads(meta["entries"])  # the untouched file's metadata parses, and it loads
    assert instrumented_from_integer(path) is not None
