"""Every recipe end to end on tiny-random with small real MRPC data, plus the recipe configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qbert.recipes import available

from qbert.config import load_config, parse_config
from qbert.errors import QbertError
from qbert.pipeline.run import check_site_plan, run_experiment
from qbert.runs import read_json

ROOT = Path(__file__).resolve().parents[2]

RECIPES = {
    "fp32": {"name": "fp32"},
    "w8a8_ptq": {"name": "w8a8_ptq"},
    "w8a32_ptq": {"name": "w8a32_ptq"},
    "w32a8_ptq": {"name": "w32a8_ptq", "leave_out": ["ffn.residual_sum"]},
    "ptq": {"name": "ptq", "weight_bits": 4, "activation_bits": None, "weight_granularity": "per_channel"},
    "mp_ptq": {"name": "mp_ptq"},
    "peg": {"name": "peg", "groups": 4, "permute": True},
    "dynamic_int8": {"name": "dynamic_int8"},
    "gobo": {"name": "gobo", "bits": 3, "embeddings": True},
    "q8bert": {"name": "q8bert", "start_step": 1},  # with export.formats [integer], below
    "q8bert_ptq": {"name": "q8bert_ptq"},  # with export.formats [hf], below
    "q_bert": {"name": "q_bert", "groups": 4, "mixed": {"bits": [2, 4], "average": 3},
               "hessian": {"batches": 2, "batch_size": 4, "iterations": 5}, "epochs": 1},
    "w8a8_qat": {"name": "w8a8_qat", "range_lr": 1e-3},
    "w4a8_qat": {"name": "w4a8_qat", "embedding_bits": 2},
    "w4a32_qat": {"name": "w4a32_qat", "quant_noise": {"p": 0.5, "block_size": 8}},
    "adaround": {"name": "adaround", "sequences": 16, "iterations": 20},
}


def test_every_registered_recipe_has_a_smoke_case():
    assert set(available()) <= set(RECIPES)


def tiny(real_data: Path, recipe: dict, **extra) -> object:
    return parse_config({
        "name": f"tiny_{recipe['name']}",
        "model": "tiny-random",
        "task": "mrpc",
        "seeds": [0],
        "data": {"dir": str(real_data), "max_train_samples": 64, "max_eval_samples": 32},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 64},
        "recipe": recipe,
        "calibrate": {"batches": 2, "batch_size": 4},
        **extra,
    })


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_end_to_end(real_data, tmp_path, name):
    extra = {"export": {"formats": ["integer"]}} if name in ("q8bert", "w4a8_qat", "q_bert") else {}
    if name == "q8bert_ptq":
        extra = {"export": {"formats": ["hf"]}}
    result = run_experiment(tiny(real_data, RECIPES[name], **extra), root=tmp_path)
    record = read_json(result.folder / "seed=0" / "metrics.json")
    assert set(record["metrics"]) == {"f1", "accuracy"}
    report = record["recipe_report"]
    arithmetic = {"fp32": "float", "gobo": "decoded", "dynamic_int8": "integer"}.get(name, "simulated")
    assert record["arithmetic"] == arithmetic and record["simulated"] is (arithmetic == "simulated")
    if name in ("fp32",):
        assert record["simulated"] is False and report == {}
    elif name == "gobo":
        assert record["simulated"] is False and "calibration" not in report
        assert report["matrices"] == 3 + 2 * 6 + 2 and report["all_converged"]
        assert 0 < report["outlier_fraction"] < 0.01
    elif name == "dynamic_int8":
        assert record["simulated"] is False
        assert report["size_mb"]["int8"] < report["size_mb"]["fp32"]
        assert report["eval_seconds"]["fp32"] > 0 and report["eval_seconds"]["int8"] > 0
    elif name == "q8bert":  # from the pre-trained model, no FP32 fine-tuning
        assert record["simulated"] is True and record["finetune"] is None and record["checkpoint"] is None
        assert record["qat"]["steps"] == 4 and "qat" in record["timings"]
        assert report["bias_int32"]["biases"] == 2 * 6 + 2 and report["start_step"] == 1
        # every grid symmetric and narrow ([-127, 127]): lo = -hi
        assert all(lo == pytest.approx(-hi, rel=1e-6, abs=1e-9) for lo, hi in report["ranges"].values())
        assert 3.5 < report["size"]["compression"] < 4
        export = record["exports"]["integer"]
        assert export["bit_exact"] and export["entries"]["bias_int32"] == 2 * 6 + 2
        assert 3.5 < export["compression"] < 4
    elif name == "q8bert_ptq":  # the fine-tuned checkpoint, no calibration, activations ranged per input
        assert record["finetune"]["cached"] in (True, False) and "calibration" not in report
        assert report["activation_ranges"].startswith("dynamic") and report["padding_in_ranges"] is False
        plan = report["plan"]
        # the inputs of every FC layer: the embeddings output, per layer the attention context, FFN input, GELU
        # output and layer output (the next Q/K/V input, the last one the pooler input), and the pooled output
        assert plan["weight"]["fp"] == 0 and plan["activation"]["quantized"] == 1 + 2 * 4 + 1
        quantizers = read_json(result.folder / "seed=0" / "export" / "hf" / "quantizers.json")["quantizers"]
        assert {q["state"] for q in quantizers if q["kind"] == "activation"} == {"dynamic"}
        assert {q["state"] for q in quantizers if q["kind"] == "weight"} == {"fixed"}
    elif name == "q_bert":  # Hessian-allocated bits, group-wise weights, QAT from the FP32 checkpoint
        assert record["simulated"] is True and record["qat"]["steps"] == 4
        layers = report["sensitivity"]["layers"]
        assert sorted(layers) == ["0", "1"] and all(len(layer["eigenvalues"]) == 2 for layer in layers.values())
        # two equal layers, 3 bits on average of [2, 4]: the more sensitive one gets 4
        top = report["sensitivity"]["ranking"][0]
        assert {layer: v["bits"] for layer, v in layers.items()} == {str(top): 4, str(1 - top): 2}
        assert layers[str(top)]["omega"] >= layers[str(1 - top)]["omega"]
        assert report["sensitivity"]["average_bits"] == 3
        weights = report["plan"]["weight"]
        assert weights["fp"] == 1 and weights["by_bits"] == {"2": 6, "4": 6, "8": 3 + 1}  # + pooler at 8
        assert record["exports"]["integer"]["bit_exact"]
    elif name in ("w8a8_qat", "w4a8_qat", "w4a32_qat"):  # from the cached FP32 checkpoint
        assert record["simulated"] is True and record["finetune"]["cached"] in (True, False)
        # Table 10 / 11 settings for MRPC: batch size 8, 3 epochs -> 64 / 8 * 3 steps
        assert record["qat"]["steps"] == 24 and report["training"]["sources"]["batch_size"].startswith("Bondarenko")
        init = report["initialisation"]
        assert init["calibration"]["sequences"] == 8
        moved = [r for r in report["ranges"].values() if r["initial"] != r["learned"]]
        assert moved, "learned ranges did not move"
        if name == "w4a8_qat":
            assert init["plan"]["weight"]["by_bits"] == {"2": 1, "4": 2 + 2 * 6 + 2}
            export = record["exports"]["integer"]
            assert export["bit_exact"] and "bias_int32" not in export["entries"]  # asymmetric inputs
            assert export["file_bytes"] < 1.05 * report["size"]["mb"] * 1e6 + 20_000  # + header
        if name == "w4a32_qat":  # with Quant-Noise on its weights
            assert init["plan"]["activation"]["quantized"] == 0
            noise = {"p": 0.5, "block_size": 8, "activations": True, "quantizers": 3 + 6 * 2 + 2}
            assert report["quant_noise"] == noise
    else:
        assert record["simulated"] is True
        assert report["calibration"]["sequences"] == 8 and report["calibration"]["batches"] == 2
        assert record["finetune"]["cached"] in (True, False)
        plan = report["plan"]
        if name == "w8a32_ptq":
            assert plan["activation"]["quantized"] == 0 and plan["weight"]["fp"] == 0
        if name == "w32a8_ptq":
            assert plan["weight"]["quantized"] == 0 and plan["activation"]["fp"] == 2
        if name == "peg":
            assert "permutation_pass" in report
        if name == "mp_ptq":
            assert plan["activation"]["by_bits"]["16"] == 2 * 3 + 1
        if name == "adaround":
            rounding = report["rounding"]
            assert rounding["sequences"] == 16 and len(rounding["layers"]) == 2 * 6 + 2
            assert plan["weight"]["by_bits"] == {"4": 3 + 2 * 6 + 2} and plan["activation"]["quantized"] == 0


def test_ptq_recipes_share_the_fp32_checkpoint(real_data, tmp_path):
    first = run_experiment(tiny(real_data, {"name": "w8a8_ptq"}), root=tmp_path)
    second = run_experiment(tiny(real_data, {"name": "peg", "groups": 4}), root=tmp_path)
    a = read_json(first.folder / "seed=0" / "metrics.json")
    b = read_json(second.folder / "seed=0" / "metrics.json")
    assert a["checkpoint"] == b["checkpoint"] and b["finetune"]["cached"] is True


def test_plan_errors_fail_before_any_work(real_data, tmp_path):
    cfg = tiny(real_data, {"name": "peg", "groups": 6})
    with pytest.raises(QbertError, match="6 groups do not divide") as info:
        run_experiment(cfg, root=tmp_path)
    assert info.value.key == "recipe.groups"
    assert not any(tmp_path.rglob("metrics.json")) and not any(tmp_path.rglob("finetuned"))
    cfg = tiny(real_data, {"name": "w8a8_ptq", "leave_out": ["ffn.residual"]})
    with pytest.raises(QbertError, match="matches no site"):
        run_experiment(cfg, root=tmp_path)


def test_bf16_evaluation_is_rejected_for_fake_quantization(real_data):
    with pytest.raises(QbertError, match="evaluate.precision"):
        tiny(real_data, {"name": "w8a8_ptq"}, evaluate={"precision": "bf16"})


def test_mnli_peg_is_the_paper_setting():
    cfg = load_config(ROOT / "configs" / "mnli_peg.yaml")
    assert cfg.model == "bert-base-uncased" and cfg.task == "mnli"
    assert cfg.seeds == [1000, 1001, 1002, 1003, 1004]
    assert (cfg.recipe.name, cfg.recipe.groups, cfg.recipe.permute, cfg.recipe.scope) == ("peg", 6, True, "ffn")
    assert (cfg.finetune.lr, cfg.finetune.batch_size, cfg.finetune.epochs) == (2e-5, 16, 3)
    # the plan resolves offline from the canonical BERT-base shape: 12 layers x 3 PEG sites
    plan = check_site_plan(cfg)
    peg = [n for n, s in plan.specs.items() if s and s.granularity == "per_embedding_group"]
    assert len(peg) == 36 and all(plan.specs[n].groups == 6 and plan.specs[n].permute for n in peg)
    assert plan.totals()["activation"]["sites"] == 160


def test_default_config_is_peg_on_stsb_sharing_the_fp32_checkpoint():
    from qbert.pipeline.checkpoint import finetune_key

    default = load_config(ROOT / "configs" / "default.yaml")
    fp32 = load_config(ROOT / "configs" / "stsb_fp32.yaml")
    peg = load_config(ROOT / "configs" / "stsb_peg.yaml")
    assert default.recipe.name == "peg" and default.recipe.groups == 6 and default.recipe.permute
    assert default.config_hash() == peg.config_hash()  # the same experiment as the stsb_peg row
    identity = {"alias": "minilm-l6"}
    assert finetune_key(default, 42, identity, {})[0] == finetune_key(fp32, 42, identity, {})[0]


def test_default_sweep_shares_one_checkpoint_and_its_table_compares_with_fp32():
    from qbert.pipeline.checkpoint import finetune_key
    from qbert.sweep import expand, load_sweep
    from qbert.tables import load_table_spec

    sweep, base = load_sweep(ROOT / "configs" / "default.sweep.yaml")
    cells = expand(sweep, base)
    identity = {"alias": "minilm-l6"}
    assert {c.coords["method"] for c in cells} == {"fp32", "w8a8_ptq", "mp_ptq", "peg", "gobo_4bit"}
    assert len({finetune_key(c.config, 42, identity, {})[0] for c in cells}) == 1
    gobo = next(c.config for c in cells if c.coords["method"] == "gobo_4bit")
    assert gobo.recipe.bits == 4 and gobo.recipe.embeddings
    assert load_table_spec(ROOT / "configs" / "default.table.yaml").versus == "FP32"


@pytest.mark.parametrize(
    ("recipe", "grouped", "group_count"),
    [
        ({"name": "peg", "groups": 6, "permute": True}, 18, 6),
        ({"name": "peg", "groups": 3, "permute": False}, 18, 3),
        ({"name": "peg", "groups": "per_embedding", "scope": "ffn"}, 18, None),
        # every hidden-sized token activation: 2 embedding sites + 10 per layer
        ({"name": "peg", "groups": "per_embedding", "scope": "all"}, 2 + 6 * 10, None),
        ({"name": "peg", "groups": 1}, 18, 1),
    ],
)
def test_peg_rows_of_table_5(recipe, grouped, group_count):
    cfg = parse_config({"model": "minilm-l6", "task": "rte", "recipe": recipe})
    plan = check_site_plan(cfg)
    peg = {n: s for n, s in plan.specs.items() if s and s.granularity == "per_embedding_group"}
    assert len(peg) == grouped
    assert {s.groups for s in peg.values()} == {group_count}
    assert all(s.permute == recipe.get("permute", True) for s in peg.values())
    if recipe.get("scope", "ffn") == "ffn" and recipe.get("permute", True):
        assert plan.permutation_sources["layer.3.ffn.residual_sum"] == "layer.3.ffn.output"


def test_mp_ptq_presets_are_the_columns_of_table_4():
    counts = {}
    for preset in ("ffn_sum", "ffn_sum_io", "ffn_sum_io_output"):
        recipe = {"name": "mp_ptq", "preset": preset}
        cfg = parse_config({"model": "bert-base-uncased", "task": "rte", "recipe": recipe})
        plan = check_site_plan(cfg)
        counts[preset] = plan.totals()["activation"]["by_bits"][16]
        if preset == "ffn_sum_io_output":
            assert plan.specs["head.output"].estimator == "mse" and plan.specs["head.output"].bits == 16
    assert counts == {"ffn_sum": 12, "ffn_sum_io": 36, "ffn_sum_io_output": 37}


@pytest.mark.parametrize("task", ["squad", "stsb"])
def test_ptq_on_question_answering_and_regression_heads(fixture_data, real_data, tmp_path, task):
    data_dir = fixture_data if task == "squad" else real_data
    extra = {"max_seq_len": 64, "doc_stride": 32} if task == "squad" else {"max_seq_len": 64}
    cfg = parse_config({
        "model": "tiny-random", "task": task, "seeds": [0],
        "data": {"dir": str(data_dir), "max_train_samples": 32, "max_eval_samples": 16},
        "finetune": {"epochs": 1, "batch_size": 8, **extra},
        "recipe": {"name": "mp_ptq"}, "calibrate": {"batches": 2, "batch_size": 2},
    })
    record = read_json(run_experiment(cfg, root=tmp_path).folder / "seed=0" / "metrics.json")
    ranges = record["recipe_report"]["activation_ranges"]
    assert "head.output" in ranges and ("pooler.output" in ranges) == (task != "squad")
    assert record["metrics"]


@pytest.mark.parametrize(("precision", "qat_precision", "trained"),
                         [("fp32", None, "fp32"), ("bf16", None, "bf16"), ("bf16", "fp32", "fp32")])
def test_qat_trains_in_fp32_and_bf16(real_data, tmp_path, precision, qat_precision, trained):
    cfg = tiny(real_data, {"name": "w4a8_qat", "epochs": 1, "range_lr": 1e-3, "precision": qat_precision},
               finetune={"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 64, "precision": precision})
    record = read_json(run_experiment(cfg, root=tmp_path).folder / "seed=0" / "metrics.json")
    assert record["qat"]["precision"] == trained and record["qat"]["steps"] == 64 // 8
    assert np.isfinite(record["qat"]["final_loss"])
    ranges = record["recipe_report"]["ranges"]
    assert any(r["initial"] != r["learned"] for name, r in ranges.items() if not name.endswith(".weight"))
    assert any(r["initial"] != r["learned"] for name, r in ranges.items() if name.endswith(".weight"))


def test_q8bert_delay_beyond_training_fails_before_training(real_data, tmp_path):
    cfg = tiny(real_data, {"name": "q8bert", "start_step": 4})  # 64 examples / 16 per batch = 4 steps
    with pytest.raises(QbertError, match="start_step 4 is not below the 4 training steps") as info:
        run_experiment(cfg, root=tmp_path)
    assert info.value.key == "recipe.start_step" and not any(tmp_path.rglob("metrics.json"))


NEW_RECIPE = '''
"""W6A8 PTQ: a recipe added as one module (the registry finds it)."""

from typing import Literal

from qbert.recipes.ptq import StaticQuantParams, StaticQuantRecipe


class W6A8PtqParams(StaticQuantParams):
    name: Literal["w6a8_ptq"] = "w6a8_ptq"


class W6A8Ptq(StaticQuantRecipe):
    name = "w6a8_ptq"
    Params = W6A8PtqParams
    source = "test: a new recipe is one file"
    weight_bits = 6
'''


def test_a_new_recipe_is_one_module(real_data, tmp_path, monkeypatch):
    """Dropping a module into the recipes package is all it takes: config, plan, pipeline, export."""
    import qbert.recipes as registry

    folder = tmp_path / "more_recipes"
    folder.mkdir()
    (folder / "w6a8_ptq.py").write_text(NEW_RECIPE)
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(folder)])
    monkeypatch.setattr(registry, "RECIPES", {})
    monkeypatch.setattr("qbert.config.RECIPES", registry.RECIPES)
    assert "w6a8_ptq" in registry.available()
    cfg = tiny(real_data, {"name": "w6a8_ptq"}, export={"formats": ["integer"]})
    record = read_json(run_experiment(cfg, root=tmp_path / "runs").folder / "seed=0" / "metrics.json")
    assert record["recipe"] == "w6a8_ptq" and record["arithmetic"] == "simulated"
    assert record["recipe_report"]["plan"]["weight"]["by_bits"] == {"6": 3 + 2 * 6 + 2}
    assert record["exports"]["integer"]["bit_exact"]


def test_the_formats_recipes_declare_are_the_exporters():
    """Configs check `export.formats` against the recipes' declared formats (torch-free); each has an exporter and
    every exporter is some recipe's."""
    from qbert.recipes import get_recipe

    from qbert.pipeline.export import EXPORT_FORMATS

    declared = {fmt for name in available() for fmt in get_recipe(name).export_formats}
    assert declared == set(EXPORT_FORMATS)
