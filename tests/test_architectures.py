"""Architectures as data: RoBERTa and DistilBERT site lists counted by hand, every recipe end to end through
`qbert run` on their tiny random models, ONNX exports, and clear errors for what no table describes."""

from __future__ import annotations

import pytest
import torch
from qbert.cli.main import app
from typer.testing import CliRunner

from qbert.architectures import ARCHITECTURES, UnsupportedModel, bind
from qbert.models import load_model, load_tokenizer, resolve_model
from qbert.quant.sites import LAYER_FAMILIES, LAYER_WEIGHTS, enumerate_sites, linear_inputs
from qbert.runs import read_json
from tests.pipeline.test_recipes import RECIPES

runner = CliRunner()

LAYERS, HIDDEN, INTER, LABELS = 2, 64, 128, 2
"""The tiny configs' shape (qbert/architectures.py ``tiny``)."""


def model(alias: str, head: str = "classification"):
    torch.manual_seed(0)
    return load_model(resolve_model(alias), head, LABELS).eval()


@pytest.mark.parametrize(("alias", "tables", "head", "pooler"), [
    ("tiny-random", 3, "classification", True),
    ("tiny-random-roberta", 3, "classification", True),
    ("tiny-random-distilbert", 2, "classification", True),
    ("tiny-random-roberta", 3, "question_answering", False),
    ("tiny-random-distilbert", 2, "question_answering", False),
])
def test_site_lists_match_the_architecture_counted_by_hand(alias, tables, head, pooler):
    sites = enumerate_sites(model(alias, head))
    # activations: embeddings sum and output; 13 per layer (Q, K, V, scores, probs, context, attention output,
    # residual sum, FFN input, GELU output, FFN output, residual sum, output norm); pooler; head
    activations = [s for s in sites if s.kind == "activation"]
    assert len(activations) == 2 + 13 * LAYERS + pooler + 1
    # weights: the embedding tables (DistilBERT has no token types), 6 linears per layer, pooler, head
    weights = [s for s in sites if s.kind == "weight"]
    assert len(weights) == tables + 6 * LAYERS + pooler + 1
    names = {s.name for s in sites}
    assert {f"layer.1.{f}" for f in LAYER_FAMILIES} <= names and {f"layer.1.{f}.weight" for f in LAYER_WEIGHTS} <= names
    assert ("embeddings.token_type.weight" in names) == (tables == 3)
    assert ("pooler.output" in names) == pooler and "head.output" in names
    out_rows = {"classification": LABELS, "question_answering": 2}[head]
    by_name = {s.name: s for s in sites}
    assert by_name["head.output.weight"].channels == out_rows
    assert by_name["layer.0.ffn.intermediate"].channels == INTER and by_name["layer.0.ffn.output"].channels == HIDDEN


@pytest.mark.parametrize("alias", ["tiny-random-roberta", "tiny-random-distilbert"])
def test_every_site_is_hooked_where_the_table_says(alias):
    """Every activation quantizer sees its tensor, and each linear layer's input site is the quantizer right
    before it: the pooler's output is the head's input (after tanh or ReLU), computed independently here."""
    from qbert.config import EstimatorConfig
    from qbert.quant.sites import instrument, resolve_plan
    from qbert.quant.spec import QuantSpec
    from qbert.quant.static import quantizer_factory

    m = model(alias)
    tokenizer = load_tokenizer(resolve_model(alias))
    inputs = tokenizer(["a cat sat on the mat", "two dogs"], padding=True, return_tensors="pt")
    assert "token_type_ids" not in inputs  # neither architecture takes token types
    head_input = {}
    bound = bind(m)
    handle = bound.head_output().register_forward_pre_hook(lambda _m, args: head_input.setdefault("x", args[0]))
    with torch.no_grad():
        m(**inputs)
    handle.remove()
    w, a = QuantSpec(bits=8, symmetric=True), QuantSpec(bits=8)
    inst = instrument(m, resolve_plan(enumerate_sites(m), weights=w, activations=a, weight_base=w,
                                      activation_base=a), quantizer_factory(EstimatorConfig(activations="minmax")))
    with torch.no_grad():
        m(**inputs)
    unobserved = [n for n, q in inst.activations().items() if not q.estimator.observed]
    assert unobserved == []
    lo, hi = inst.quantizers["pooler.output"].estimator.range()
    x = head_input["x"]
    assert (float(lo), float(hi)) == pytest.approx((float(x.min()), float(x.max())), abs=1e-6)
    inputs_of = linear_inputs(m)
    assert inputs_of["head.output.weight"] == "pooler.output"
    assert inputs_of["pooler.output.weight"] == "layer.1.ffn.norm"
    assert inputs_of["layer.1.attn.query.weight"] == "layer.0.ffn.norm"


def test_what_no_table_describes_is_an_error_naming_it():
    from torch import nn
    from transformers import AlbertConfig, AlbertForSequenceClassification, RobertaForTokenClassification

    with pytest.raises(UnsupportedModel, match="model type 'albert' has no table"):
        enumerate_sites(AlbertForSequenceClassification(AlbertConfig(hidden_size=64, num_attention_heads=4,
                                                                     intermediate_size=128, embedding_size=32)))
    roberta = model("tiny-random-roberta")
    with pytest.raises(UnsupportedModel, match="RobertaForTokenClassification is a roberta model whose head"):
        enumerate_sites(RobertaForTokenClassification(roberta.config))
    roberta.classifier.out_proj = nn.Sequential(nn.Linear(HIDDEN, LABELS))  # not the head the table says
    with pytest.raises(UnsupportedModel, match="classifier.out_proj is Sequential, the roberta table expects Linear"):
        enumerate_sites(roberta)
    distil = model("tiny-random-distilbert")
    distil.extra = nn.Linear(HIDDEN, HIDDEN)  # a layer no site covers is never silently left in float
    with pytest.raises(UnsupportedModel, match="not in the distilbert table.*: extra"):
        enumerate_sites(distil)


def test_every_table_builds_its_tiny_model():
    for name in ARCHITECTURES:
        alias = "tiny-random" if name == "bert" else f"tiny-random-{name}"
        assert bind(model(alias)).arch.name == name


ONNX = {("tiny-random-roberta", "w8a8_ptq"), ("tiny-random-distilbert", "w8a8_ptq"),
        ("tiny-random-distilbert", "peg"), ("tiny-random-roberta", "w4a8_qat")}
"""The ONNX exports the architecture tests check (every site quantized; group GEMMs; 4-bit weights): each costs
about 10 s, so not every recipe on both."""


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("alias", ["tiny-random-roberta", "tiny-random-distilbert"])
def test_every_recipe_runs_through_qbert_run(real_data, tmp_path, alias, name):
    import yaml

    recipe = dict(RECIPES[name])
    if name == "adaround":
        recipe["iterations"] = 5
    formats = ["onnx"] if (alias, name) in ONNX else ["integer"] if name in ("q8bert", "q_bert") else []
    config = {
        "name": f"{alias}_{name}", "model": alias, "task": "mrpc", "seeds": [0],
        "data": {"dir": str(real_data), "max_train_samples": 32, "max_eval_samples": 16},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 48},
        "recipe": recipe, "calibrate": {"batches": 2, "batch_size": 4}, "export": {"formats": formats},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    record = read_json(next((tmp_path / "runs").rglob("seed=0/metrics.json")))
    assert set(record["metrics"]) == {"f1", "accuracy"}
    linears = 6 * LAYERS + 2
    if name == "w8a8_ptq":
        plan = record["recipe_report"]["plan"]
        tables = 3 if alias.endswith("roberta") else 2
        assert plan["weight"]["quantized"] == tables + linears and plan["activation"]["quantized"] == 2 + 13 * 2 + 2
    if (alias, name) in ONNX:
        onnx = record["exports"]["onnx"]
        assert onnx["inputs"] == ["input_ids", "attention_mask"]
        assert onnx["fixed_batch_max_abs_output_diff"] < 1e-3
        if name != "w4a8_qat":  # 4-bit weights with asymmetric 8-bit inputs stay float GEMMs in ONNX
            assert onnx["integer_gemms"] == linears
    if name in ("q8bert", "q_bert"):
        assert record["exports"]["integer"]["bit_exact"]
