"""The gobo recipe: which matrices it clusters, its rules and errors, and a run with the packed export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbert.config import parse_config
from qbert.errors import QbertError
from qbert.pipeline.run import check_site_plan, run_experiment
from qbert.quant.packing import load_packed, read_packed
from qbert.runs import read_json
from tests.conftest import tiny_config


def gobo_config(recipe: dict, model: str = "minilm-l6", **extra):
    return parse_config({"model": model, "task": "rte", "recipe": {"name": "gobo", **recipe}, **extra})


def quantized(plan) -> dict[str, int]:
    return {name: spec.bits for name, spec in plan.specs.items() if spec is not None}


def test_default_plan_is_every_linear_layer_without_embeddings():
    plan = check_site_plan(gobo_config({}))
    bits = quantized(plan)
    assert len(bits) == 6 * 6 + 2 and set(bits.values()) == {3}  # 6 layers x 6 linears, pooler, head
    assert "pooler.output.weight" in bits and "head.output.weight" in bits
    assert not any(name.startswith("embeddings.") for name in bits)
    assert plan.totals()["activation"]["quantized"] == 0


def test_embeddings_and_per_site_rules():
    plan = check_site_plan(gobo_config({
        "bits": 3, "embeddings": True,
        "sites": {
            "layer.[0-2].attn.value.weight": {"bits": 4}, "layer.[0-2].ffn.intermediate.weight": {"bits": 4},
            "embeddings.*": {"bits": 4, "policy": "kmeans"}, "head.output.weight": None,
        },
    }))
    specs = plan.specs
    assert specs["layer.2.attn.value.weight"].bits == 4 and specs["layer.3.attn.value.weight"].bits == 3
    assert specs["layer.0.ffn.intermediate.weight"].bits == 4 and specs["layer.0.ffn.output.weight"].bits == 3
    assert specs["embeddings.word.weight"].bits == 4 and specs["embeddings.word.weight"].policy == "kmeans"
    assert specs["head.output.weight"] is None
    assert plan.totals()["weight"]["by_bits"] == {3: 6 * 6 + 1 - 6, 4: 6 + 3}


def test_roberta_table_vi_preset_on_the_bert_base_shape():
    rules = {"layer.[0-5].attn.value.weight": {"bits": 4}, "layer.[0-5].ffn.intermediate.weight": {"bits": 4}}
    plan = check_site_plan(gobo_config({"sites": rules}, model="bert-base-uncased"))
    assert plan.totals()["weight"]["by_bits"] == {3: 12 * 6 + 2 - 12, 4: 12}


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"sites": {"attn.query": {"bits": 4}}}, "matches only activation sites.*attn.query.weight"),
        ({"sites": {"layer.9.*": {"bits": 4}}}, "matches no site"),
    ],
)
def test_bad_rules_fail_before_any_work(recipe, message):
    with pytest.raises(QbertError, match=message):
        check_site_plan(gobo_config(recipe))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"recipe": {"name": "gobo", "bits": 9}}, "recipe.bits"),
        ({"recipe": {"name": "gobo", "bits": 1}}, "recipe.bits"),
        ({"recipe": {"name": "gobo", "policy": "lloyd"}}, "recipe.policy"),
        ({"recipe": {"name": "gobo", "sites": {"pooler.output.weight": {"bits": 12}}}}, "bits"),
        ({"recipe": {"name": "gobo"}, "evaluate": {"precision": "bf16"}}, "evaluate.precision"),
        ({"recipe": {"name": "w8a8_ptq"}, "export": {"formats": ["packed"]}}, "cannot write 'packed'.*gobo"),
        ({"recipe": {"name": "gobo"}, "export": {"formats": ["zip"]}}, "unknown export format"),
    ],
)
def test_config_errors(config, message):
    with pytest.raises(QbertError, match=message):
        parse_config({"model": "minilm-l6", "task": "rte", **config})


def test_run_with_packed_export_is_bit_exact_and_reports(real_data, tmp_path):
    cfg = parse_config({
        "name": "tiny_gobo", "model": "tiny-random", "task": "stsb", "seeds": [0],
        "data": {"dir": str(real_data), "max_train_samples": 64, "max_eval_samples": 32},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 64},
        "recipe": {"name": "gobo", "bits": 4, "embeddings": True, "sites": {"pooler.output.weight": {"bits": 2}}},
        "export": {"formats": ["packed"]},
    })
    result = run_experiment(cfg, root=tmp_path)
    folder = result.folder / "seed=0"
    record = read_json(folder / "metrics.json")
    report, export = record["recipe_report"], record["exports"]["packed"]
    assert set(report["blocks"]) == {"embeddings", "layer.0", "layer.1", "pooler", "head"}
    assert report["by_bits"] == {"2": 1, "4": 16}
    matrix = report["per_matrix"]["layer.0.attn.query.weight"]
    assert matrix["converged"] and matrix["iterations"] >= 1 and matrix["numel"] == 64 * 64
    assert record["timings"]["quantize"] > 0 and "export" in record["timings"]
    path = folder / export["path"]
    assert export["bit_exact"] and path.stat().st_size == export["file_bytes"]
    assert sum(export["bits"].values()) == 8 * export["file_bytes"]
    assert (folder / "export" / "packed" / "tokenizer.json").exists()
    # the loader rebuilds the evaluated model: same weights, so the same predictions
    model = load_packed(path)
    stored = read_packed(path)
    assert stored.codes["bert.pooler.dense.weight"]["bits"] == 2
    assert len(np.unique(model.bert.pooler.dense.weight.detach().numpy())) <= 4 + stored.codes[
        "bert.pooler.dense.weight"]["outliers"]
    assert model.num_labels == 1 and model.config.problem_type in (None, "regression")
    assert export["compression"] > 7.0
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[101, 2023, 102]])).logits
    assert out.shape == (1, 1)


def test_hf_export_loads_with_transformers_alone_and_reproduces_the_run(real_data, tmp_path):
    """The hf folder of a GOBO run: from_pretrained in a process that never imports qbert gives the
    evaluated weights, and the reloaded model scores the run's metric."""
    import json
    import subprocess
    import sys

    import qbert
    from qbert.pipeline.run import run_experiment
    from qbert.runs import read_json

    cfg = tiny_config(real_data, {"name": "gobo", "bits": 3, "embeddings": True}, name="gobo_hf",
                      export={"formats": ["hf", "packed"]})
    seed = run_experiment(cfg, root=tmp_path).folder / "seed=0"
    record = read_json(seed / "metrics.json")
    export = record["exports"]["hf"]
    assert export["bit_exact"] and export["reproduces_evaluation"] and export["activation_quantizers"] == 0
    folder = seed / "export" / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "quantizers.json", "README.md"} <= \
        {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert "gobo" in card and '"f1"' in card and "computes exactly what was evaluated" in card
    code = ("import sys, torch; from transformers import AutoModelForSequenceClassification as A; "
            f"m = A.from_pretrained({str(folder)!r}); "
            "assert not any(k.startswith('qbert') for k in sys.modules); "
            "print(repr(m.bert.encoder.layer[0].output.dense.weight.double().abs().sum().item()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    from qbert.quant.packing import read_packed  # the packed export decodes to the evaluated weights

    decoded = read_packed(seed / "export" / "packed" / "model.safetensors").tensors
    expected = float(np.abs(decoded["bert.encoder.layer.0.output.dense.weight"].astype(np.float64)).sum())
    assert float(out.stdout) == pytest.approx(expected, rel=1e-12)
    metrics = qbert.evaluate(str(folder), "mrpc", data_dir=real_data, max_seq_len=64, max_eval_samples=32)
    assert metrics == record["metrics"]
    quantizers = json.loads((folder / "quantizers.json").read_text())
    assert quantizers["recipe"] == "gobo" and quantizers["arithmetic"] == "decoded"


def test_hf_export_of_a_fake_quant_run_records_every_quantizer(real_data, tmp_path):
    import json

    from qbert.pipeline.run import run_experiment
    from qbert.runs import read_json

    cfg = tiny_config(real_data, {"name": "peg", "groups": 4}, name="peg_hf", export={"formats": ["hf", "integer"]})
    seed = run_experiment(cfg, root=tmp_path).folder / "seed=0"
    export = read_json(seed / "metrics.json")["exports"]["hf"]
    assert export["bit_exact"] and not export["reproduces_evaluation"]
    record = json.loads((seed / "export" / "hf" / "quantizers.json").read_text())["quantizers"]
    peg = [r for r in record if r["granularity"] == "per_embedding_group"]
    assert len(peg) == 2 * 3 and all(len(r["scale"]) == 4 and len(r["permutation"]) == 64 for r in peg)
    assert "quantizers.json" in (seed / "export" / "hf" / "README.md").read_text()
