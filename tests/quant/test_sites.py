"""Site enumeration, plans and hooks on real BERT module layouts (tiny-random, MiniLM, BERT-base shape)."""

from __future__ import annotations

import pytest
import torch

from qbert.config import EstimatorConfig
from qbert.models import load_model, model_skeleton, resolve_model
from qbert.quant.sites import LAYER_FAMILIES, PlanError, enumerate_sites, instrument, resolve_plan
from qbert.quant.spec import QuantSpec, SiteOverride
from qbert.quant.static import quantizer_factory, range_weights

W8 = QuantSpec(bits=8, symmetric=True)
A8 = QuantSpec(bits=8)


def test_bert_base_shape_has_160_activation_and_77_weight_sites() -> None:
    model, origin = model_skeleton("bert-base-uncased", "classification", 3)
    sites = enumerate_sites(model)
    acts = [s for s in sites if s.kind == "activation"]
    weights = [s for s in sites if s.kind == "weight"]
    # 13 per layer x 12 + embeddings sum and output + pooler + head; Bondarenko et al. count 161
    assert len(acts) == 12 * 13 + 4 == 160
    # 6 linear layers x 12 + pooler + head + 3 embedding tables
    assert len(weights) == 12 * 6 + 2 + 3 == 77
    assert "table" in origin
    assert acts[0].name == "embeddings.sum" and acts[-1].name == "head.output"
    assert [s.family for s in acts if s.layer == 11] == list(LAYER_FAMILIES)


def test_minilm_sites_and_channels() -> None:
    model, _ = model_skeleton("minilm-l6", "regression")
    sites = {s.name: s for s in enumerate_sites(model)}
    assert sum(s.kind == "activation" for s in sites.values()) == 6 * 13 + 4
    assert sites["layer.5.ffn.intermediate"].channels == 1536
    assert sites["layer.5.ffn.residual_sum"].channels == 384
    assert sites["layer.0.attn.scores"].channels is None
    assert sites["embeddings.word.weight"].channels == 30522
    assert sites["head.output"].channels == 1


def test_question_answering_model_has_no_pooler_sites() -> None:
    model, _ = model_skeleton("tiny-random", "question_answering")
    names = {s.name for s in enumerate_sites(model)}
    assert "pooler.output" not in names and "head.output" in names


def test_rules_apply_in_order_and_patterns_cover_every_layer() -> None:
    model, _ = model_skeleton("minilm-l6", "classification")
    sites = enumerate_sites(model)
    plan = resolve_plan(
        sites, weights=W8, activations=A8, weight_base=W8, activation_base=A8,
        rules=[("ffn.residual_sum", SiteOverride(bits=16), "k"), ("layer.5.ffn.residual_sum", None, "k"),
               ("*.weight", SiteOverride(granularity="per_channel"), "k")],
    )
    assert plan.specs["layer.0.ffn.residual_sum"].bits == 16
    assert plan.specs["layer.5.ffn.residual_sum"] is None
    assert plan.specs["layer.3.attn.query.weight"].granularity == "per_channel"
    totals = plan.totals()
    assert totals["activation"]["by_bits"] == {8: 76, 16: 5} and totals["activation"]["fp"] == 1


def test_a_pattern_matching_nothing_names_its_key() -> None:
    model, _ = model_skeleton("tiny-random", "classification")
    with pytest.raises(PlanError, match="matches no site") as info:
        resolve_plan(enumerate_sites(model), weights=W8, activations=A8, weight_base=W8, activation_base=A8,
                     rules=[("ffn.residual_summ", None, "recipe.leave_out")])
    assert info.value.key == "recipe.leave_out"


def test_groups_must_divide_the_hidden_size() -> None:
    model, _ = model_skeleton("tiny-random", "classification")
    with pytest.raises(PlanError, match="do not divide"):
        resolve_plan(enumerate_sites(model), weights=None, activations=A8, weight_base=W8, activation_base=A8,
                     rules=[("ffn.output", SiteOverride(granularity="per_embedding_group", groups=6), "k")])


def tiny_model():
    torch.manual_seed(0)
    return load_model(resolve_model("tiny-random"), "classification", 2).eval()


def batch(pad_garbage: bool = False):
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    if pad_garbage:
        ids = ids.clone()
        ids[1, 3:] = torch.tensor([5000, 6000, 7000])
    return {"input_ids": ids, "attention_mask": mask}


def instrumented(model, bits: int = 8):
    sites = enumerate_sites(model)
    spec_w, spec_a = QuantSpec(bits=bits, symmetric=True), QuantSpec(bits=bits)
    plan = resolve_plan(sites, weights=spec_w, activations=spec_a, weight_base=spec_w, activation_base=spec_a)
    return instrument(model, plan, quantizer_factory(EstimatorConfig(activations="minmax")))


def test_estimate_state_leaves_the_model_unchanged_and_every_quantizer_sees_data() -> None:
    model = tiny_model()
    with torch.no_grad():
        reference = model(**batch()).logits
    inst = instrumented(model)
    with torch.no_grad():
        out = model(**batch()).logits
    torch.testing.assert_close(out, reference)
    assert model.config._attn_implementation == "qbert"
    unseen = [n for n, q in inst.activations().items() if not q.estimator.observed]
    assert unseen == []


def test_padding_tokens_do_not_change_calibrated_ranges() -> None:
    ranges = []
    for garbage in (False, True):
        model = tiny_model()
        inst = instrumented(model)
        with torch.no_grad():
            model(**batch(pad_garbage=garbage))
        ranges.append({n: [float(t) for t in q.estimator.range()] for n, q in inst.activations().items()})
    assert ranges[0] == ranges[1]


def test_sixteen_bit_model_is_closer_to_fp32_than_eight_bit() -> None:
    errors = {}
    for bits in (8, 16):
        model = tiny_model()
        with torch.no_grad():
            reference = model(**batch()).logits
        inst = instrumented(model, bits)
        range_weights(inst)
        with torch.no_grad():
            model(**batch())
        for q in inst.activations().values():
            q.freeze()
        with torch.no_grad():
            errors[bits] = float((model(**batch()).logits - reference).abs().max())
    assert 0 < errors[16] < errors[8] / 50


def test_weight_quantizers_change_the_weights_the_model_uses() -> None:
    model = tiny_model()
    original = model.bert.encoder.layer[0].output.dense.weight.detach().clone()
    inst = instrumented(model, bits=4)
    range_weights(inst)
    used = model.bert.encoder.layer[0].output.dense.weight
    assert not torch.equal(used, original)
    assert len(torch.unique(used)) <= 16


def test_training_quantizes_the_looked_up_rows_as_the_whole_table_would():
    """The word table's quantizer runs on the rows a batch looks up while training (fixed or learned ranges): the
    same forward values and table gradient as quantizing the whole table; the learned scale's gradient sums the
    same terms in another order."""
    import torch

    from qbert.config import EstimatorConfig
    from qbert.quant.sites import enumerate_sites, instrument, resolve_plan
    from qbert.quant.spec import QuantSpec
    from qbert.quant.static import quantizer_factory, range_weights
    from tests.conftest import tiny_model

    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(1))
    ids[0, 3] = ids[1, 5]  # a row looked up twice
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}
    found = []
    for rows in (True, False):
        model, _ = tiny_model()
        w, a = QuantSpec(bits=8, symmetric=True), QuantSpec(bits=8)
        inst = instrument(model, resolve_plan(enumerate_sites(model), weights=w, activations=a, weight_base=w,
                                              activation_base=a), quantizer_factory(EstimatorConfig()))
        range_weights(inst)
        for q in inst.activations().values():
            q.set_range(torch.tensor([-4.0]), torch.tensor([4.0]))
        inst.set_state("learn")
        table = model.bert.embeddings.word_embeddings
        assert "_qbert_rows" in table.__dict__
        if not rows:  # the whole parametrized table, as before
            type(table).forward = torch.nn.Embedding.forward
        model.train()
        torch.manual_seed(0)
        loss = model(**batch).loss
        loss.backward()
        q = inst.quantizers["embeddings.word.weight"]
        found.append((loss.detach(), inst.weight_tensors["embeddings.word.weight"].grad, q.scale.grad))
    (loss_rows, table_rows, scale_rows), (loss_table, table_table, scale_table) = found
    assert torch.equal(loss_rows, loss_table) and torch.equal(table_rows, table_table)
    torch.testing.assert_close(scale_rows, scale_table, rtol=1e-5, atol=0)
    with torch.no_grad():  # evaluation: the parametrized table
        model.eval()
        assert torch.equal(table(ids), table.weight[ids])


@pytest.mark.parametrize(("placement", "quantized"), [
    # every activation of a layer: the placement's list written out by hand, for the tiny 2-layer BERT
    ("all", ["attn.query", "attn.key", "attn.value", "attn.scores", "attn.probs", "attn.context", "attn.output",
             "attn.residual_sum", "ffn.input", "ffn.intermediate", "ffn.output", "ffn.residual_sum", "ffn.norm"]),
    # the inputs of every matmul: Q/K/V (and the probabilities) of the attention matmuls, the linear layers' inputs
    ("gemm", ["attn.query", "attn.key", "attn.value", "attn.probs", "attn.context", "ffn.input", "ffn.intermediate",
              "ffn.norm"]),
    ("linear", ["attn.context", "ffn.input", "ffn.intermediate", "ffn.norm"]),
])
def test_placement_presets_quantize_the_sites_written_by_hand(placement, quantized):
    from qbert.config import parse_config
    from qbert.pipeline.run import check_site_plan

    def plan(recipe):
        return check_site_plan(parse_config({"model": "tiny-random", "task": "mrpc", "recipe": recipe}))

    found = plan({"name": "w8a8_ptq", "placement": placement})
    outside = {"all": [], "gemm": ["embeddings.sum"], "linear": ["embeddings.sum"]}[placement]
    expected = {"embeddings.output", "pooler.output", "head.output", "embeddings.sum"} - set(outside)
    if placement != "all":
        expected -= {"head.output"}  # the logits feed no matmul
    expected |= {f"layer.{i}.{family}" for i in range(2) for family in quantized}
    assert {s.name for s in found.quantized("activation")} == expected
    assert len(found.quantized("weight")) == 3 + 6 * 2 + 2  # every weight, whatever the placement
    # a site rule still refines a preset; PEG's grouping stays on the FFN input that gemm keeps
    refined = plan({"name": "w8a8_ptq", "placement": placement, "sites": {"ffn.residual_sum": {"bits": 16}}})
    assert refined.specs["layer.0.ffn.residual_sum"].bits == 16
    peg = plan({"name": "peg", "groups": 4, "placement": placement})
    assert peg.specs["layer.1.ffn.input"].granularity == "per_embedding_group"
    assert (peg.specs["layer.1.ffn.output"] is None) == (placement != "all")


def test_the_methods_own_placement_is_the_default_and_hash_neutral():
    """``placement: null`` is the paper's placement (Q8BERT: linear-layer inputs) and leaves the hash as it was
    before the key existed."""
    from qbert.config import hashed_data, parse_config
    from qbert.pipeline.run import check_site_plan

    base = {"model": "tiny-random", "task": "mrpc"}
    for name, own in (("w8a8_ptq", "all"), ("q8bert", "linear"), ("q8bert_ptq", "linear"), ("mp_ptq", "all")):
        default = parse_config({**base, "recipe": {"name": name}})
        explicit = parse_config({**base, "recipe": {"name": name, "placement": own}})
        assert check_site_plan(default).specs == check_site_plan(explicit).specs
        assert "placement" not in hashed_data(default.resolved())["recipe"]
        assert hashed_data(explicit.resolved())["recipe"]["placement"] == own
