"""Outlier inspection against an independent computation: the encoder run layer by layer by hand (attention
block, FFN, residual sum), statistics by plain loops over the valid tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbert.inspection.outliers import OUTLIER_STD, inspect_outliers, save, summary
from tests.conftest import PAIRS, tiny_model


def _features(tokenizer, pairs):
    return [{k: list(v) for k, v in tokenizer(a, b).items()} for a, b in pairs]


@pytest.fixture(scope="module")
def inspected():
    model, tokenizer = tiny_model()
    with torch.no_grad():  # an outlier dimension, as fine-tuned BERTs grow them: FFN output dim 5 of layer 1
        model.bert.encoder.layer[1].output.dense.bias[5] = 40.0
    pairs = PAIRS[:5] + [("a much longer first sentence than the others here", "and a second one")]
    features = _features(tokenizer, pairs)
    return model, tokenizer, features, inspect_outliers(model, tokenizer, features, batch_size=4)


def by_hand(model, tokenizer, features):
    """Per (layer, site): every valid token's vector, with its token id; and attention per layer and head."""
    from qbert.pipeline.batching import pad_batch

    batch = pad_batch(features, tokenizer.pad_token_id)
    mask = batch["attention_mask"].bool()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"], output_hidden_states=True, output_attentions=True)
        extended = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        found = {}
        for i, layer in enumerate(model.bert.encoder.layer):
            hidden = out.hidden_states[i]
            ffn_in = layer.attention(hidden, attention_mask=extended)[0]
            ffn_out = layer.output.dense(layer.intermediate(ffn_in))
            for name, x in (("ffn.input", ffn_in), ("ffn.output", ffn_out), ("ffn.residual_sum", ffn_out + ffn_in)):
                found[(i, name)] = x
    model.config._attn_implementation = "sdpa"
    return batch["input_ids"], mask, found, out.attentions


def test_ranges_outliers_and_special_tokens_match_a_layer_by_layer_forward(inspected):
    model, tokenizer, features, report = inspected
    ids, mask, found, _ = by_hand(model, tokenizer, features)
    for (layer, name), x in found.items():
        stats = report.site(layer, name)
        rows = [x[b, t].numpy() for b in range(len(features)) for t in range(mask.shape[1]) if mask[b, t]]
        tokens = [int(ids[b, t]) for b in range(len(features)) for t in range(mask.shape[1]) if mask[b, t]]
        values = np.stack(rows)
        np.testing.assert_allclose(stats.minimum, values.min(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.maximum, values.max(0), rtol=1e-5, atol=1e-5)
        mean, std = values.mean(), values.std(ddof=1)
        far = np.abs(values - mean) > OUTLIER_STD * std
        np.testing.assert_array_equal(stats.counts, far.sum(0))
        sep = np.array(tokens) == tokenizer.sep_token_id
        np.testing.assert_array_equal(stats.at_sep, far[sep].sum(0))
    dims = report.site(1, "ffn.output").outlier_dimensions()
    assert dims[0]["dim"] == 5 and dims[0]["values"] == int(mask.sum())  # every token, at every position
    assert report.token_count == int(mask.sum()) and report.sequences == len(features)


def test_attention_to_sep_and_cls_and_token_ranges_match_plain_loops(inspected):
    model, tokenizer, features, report = inspected
    ids, mask, found, attentions = by_hand(model, tokenizer, features)
    for layer, probs in enumerate(attentions):
        for head in range(probs.shape[1]):
            sums, queries = np.zeros(3), 0
            for b in range(len(features)):
                for q in range(mask.shape[1]):
                    if not mask[b, q]:
                        continue
                    queries += 1
                    for k in range(mask.shape[1]):
                        if mask[b, k]:
                            part = 0 if ids[b, k] == tokenizer.sep_token_id else (
                                1 if ids[b, k] == tokenizer.cls_token_id else 2)
                            sums[part] += float(probs[b, head, q, k])
            np.testing.assert_allclose(report.attention[layer, head], sums / queries, rtol=1e-5)
    length = len(features[0]["input_ids"])
    low, high = report.token_ranges[(1, "ffn.residual_sum")]
    x = found[(1, "ffn.residual_sum")][0, :length]
    np.testing.assert_allclose(low, x.min(-1).values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(high, x.max(-1).values.numpy(), rtol=1e-5)
    assert report.tokens[0] == "[CLS]" and report.tokens[-1] == "[SEP]" and len(report.tokens) == length


def test_padding_changes_nothing(inspected):
    model, tokenizer, features, report = inspected
    one_by_one = inspect_outliers(model, tokenizer, features, batch_size=1)  # no padding at all
    for a, b in zip(report.sites, one_by_one.sites, strict=True):
        np.testing.assert_allclose(a.maximum, b.maximum, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(report.attention, one_by_one.attention, rtol=1e-5, atol=1e-6)


def test_files_hold_the_numbers_and_the_figures_are_pngs(inspected, tmp_path):
    pytest.importorskip("matplotlib", reason="the viz extra (make setup installs it)")
    import csv
    import json

    _, _, _, report = inspected
    files = save(report, tmp_path, "tiny")
    assert {"dimension_ranges.png", "token_ranges.png", "attention.png"} <= set(files)
    assert all(files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in files if name.endswith(".png"))
    rows = list(csv.DictReader(open(files["dimension_ranges.csv"])))
    row = next(r for r in rows if r["layer"] == "1" and r["site"] == "ffn.output" and r["dim"] == "5")
    assert float(row["max"]) == pytest.approx(float(report.site(1, "ffn.output").maximum[5]))
    data = json.loads(files["outliers.json"].read_text())
    assert data == json.loads(json.dumps(summary(report)))
    assert data["layers"]["1"]["ffn.output"]["outlier_dimensions"][0]["dim"] == 5
