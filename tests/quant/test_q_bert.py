"""Q-BERT's pieces against independent computations: group-wise weight grids (numpy), the bit allocation (by
hand), the recipe's plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qbert.recipes import get_recipe
from qbert.recipes.q_bert import allocate_bits

from qbert.config import parse_config
from qbert.errors import QbertError
from qbert.models import load_model, resolve_model
from qbert.quant.estimators import CurrentMinMax
from qbert.quant.quantizer import Quantizer
from qbert.quant.sites import enumerate_sites
from qbert.quant.spec import QuantSpec


def test_group_wise_weights_share_one_symmetric_range_per_group_of_rows() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 5)).astype(np.float32)
    w[5, 2] = 6.0  # an outlier widens only its group's range
    q = Quantizer(QuantSpec(bits=4, symmetric=True, granularity="per_channel", groups=2), CurrentMinMax(),
                  channels=8, channel_dim=0)
    q.observe(torch.from_numpy(w))
    q.freeze()
    out = q(torch.from_numpy(w)).numpy()
    expected = np.empty_like(w)
    for rows in (slice(0, 4), slice(4, 8)):  # numpy: scale = max|w| of the group / 7, codes in [-8, 7]
        scale = np.abs(w[rows]).max() / np.float32(7)
        expected[rows] = np.clip(np.round(w[rows] / scale), -8, 7) * scale
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert len(np.unique(q.scale.detach().numpy())) == 2 and q.scale.shape == (8,)
    with pytest.raises(ValueError, match="3 groups do not divide 8"):
        Quantizer(QuantSpec(bits=4, symmetric=True, granularity="per_channel", groups=3), CurrentMinMax(),
                  channels=8, channel_dim=0)


def test_bits_go_to_the_most_sensitive_layers_within_the_average() -> None:
    omega = {0: 5.0, 1: 40.0, 2: 1.0, 3: 12.0}
    sizes = {layer: 100 for layer in omega}
    # 2.5 average bits over four equal layers: two layers at 3 bits, the two largest Omega (1 and 3)
    assert allocate_bits(omega, sizes, [2, 3], 2.5) == {0: 2, 1: 3, 2: 2, 3: 3}
    # three widths, one level at a time: 3 bits for layers 1, 3, 0 (8 + 3 = 11 bits = 4 x 2.75), none left for 4
    assert allocate_bits(omega, sizes, [2, 3, 4], 2.75) == {0: 3, 1: 3, 2: 2, 3: 3}
    assert allocate_bits(omega, sizes, [2, 3, 4], 3.25) == {0: 3, 1: 4, 2: 3, 3: 3}
    # a bigger layer costs more of the budget: layer 1 (300 weights) at 3 bits would exceed 2.5 on average
    assert allocate_bits(omega, {0: 100, 1: 300, 2: 100, 3: 100}, [2, 3], 2.4) == {0: 3, 1: 2, 2: 2, 3: 3}
    assert allocate_bits(omega, sizes, [2, 3], 2.0) == dict.fromkeys(omega, 2)


def _config(recipe: dict) -> object:
    return parse_config({"model": "tiny-random", "task": "mrpc", "recipe": recipe})


def test_plan_is_group_wise_weights_8_bit_embeddings_and_a_float_classifier() -> None:
    config = _config({"name": "q_bert", "groups": 4, "weight_bits": 3, "layer_bits": {1: 4}})
    recipe = get_recipe("q_bert")(config.recipe, config)
    torch.manual_seed(0)
    plan = recipe.plan(enumerate_sites(load_model(resolve_model("tiny-random"), "classification", 2)))
    specs = {name: spec for name, spec in plan.specs.items() if name.endswith(".weight")}
    assert specs["head.output.weight"] is None
    assert specs["embeddings.word.weight"] == QuantSpec(bits=8, symmetric=True, estimator="minmax")
    assert specs["layer.0.ffn.output.weight"].describe() == "3b sym group-wise G=4"
    assert specs["layer.1.attn.query.weight"].bits == 4 and specs["pooler.output.weight"].bits == 3
    with pytest.raises(QbertError, match="either mixed"):
        _config({"name": "q_bert", "mixed": {"bits": [2, 3], "average": 2.5}, "layer_bits": {0: 3}})
    with pytest.raises(QbertError, match="between 2 and 3"):
        _config({"name": "q_bert", "mixed": {"bits": [2, 3], "average": 3.5}})


def test_groups_that_do_not_divide_the_rows_fail_at_planning() -> None:
    from qbert.quant.sites import PlanError

    config = _config({"name": "q_bert"})  # 128 groups; tiny-random's matrices have 64 rows
    recipe = get_recipe("q_bert")(config.recipe, config)
    with pytest.raises(PlanError, match="128 groups do not divide its 64 output rows") as error:
        recipe.plan(enumerate_sites(load_model(resolve_model("tiny-random"), "classification", 2)))
    assert error.value.key == "recipe.groups"


def test_the_integer_file_stores_one_scale_per_group_of_rows(tmp_path) -> None:
    """Group-wise weights in the integer file: ``groups`` scales per matrix (not one per row), the weights read back
    bit for bit, the file's metadata ledger equal to a count from the plan's specs."""
    import qbert
    from qbert.quant.integer import instrumented_from_integer, read_integer
    from tests.conftest import PAIRS, tiny_model

    model, tokenizer = tiny_model()
    q = qbert.prepare(model, {"name": "q_bert", "groups": 4, "weight_bits": 3, "epochs": 1}, calibration=PAIRS[:4],
                      tokenizer=tokenizer, calibrate={"batches": 1, "batch_size": 4}, max_seq_len=32)
    q = qbert.convert(q)
    written = qbert.export(q, "integer", tmp_path)  # the export stage compares the file with the model bit for bit
    params, entries = read_integer(written["path"])
    from safetensors.numpy import load_file

    raw = load_file(written["path"])
    inst = q.instrumented
    grouped = [n for n, e in entries.items() if e["kind"] == "weight" and e.get("row_groups")]
    assert grouped and all(entries[n]["row_groups"] == 4 and raw[f"{n}.scale"].shape == (4,) for n in grouped)
    for name in grouped:  # the per-row scales the model used, expanded from the stored four
        quantizer = inst.quantizers[entries[name]["site"]]
        np.testing.assert_array_equal(np.repeat(raw[f"{name}.scale"], entries[name]["shape"][0] // 4),
                                      quantizer.scale.detach().numpy())
    rebuilt, _ = instrumented_from_integer(written["path"])
    for site, quantizer in inst.quantizers.items():
        assert torch.equal(rebuilt.quantizers[site].scale, quantizer.scale), site
        assert rebuilt.quantizers[site].spec.groups == quantizer.spec.groups, site
    # metadata: per quantizer, its spec's number of ranges, twice when asymmetric (a scale and a zero point)
    expected = 0
    for quantizer in inst.quantizers.values():
        spec = quantizer.spec
        ranges = (1 if spec.granularity == "per_tensor" else spec.groups or quantizer.channels)
        expected += 4 * ranges * (1 if spec.symmetric else 2)
    assert q.report["size"]["quantizer_metadata_bytes"] == expected
