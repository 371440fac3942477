"""qbert search: the target, the prefix search, the raised plan, and a whole search on tiny-random with real data."""

from __future__ import annotations

import math

import pytest
from qbert.cli.main import app
from typer.testing import CliRunner

from qbert.config import load_config, parse_config
from qbert.errors import QbertError
from qbert.pipeline.run import check_site_plan
from qbert.precision_search import (
    SearchSettings,
    Target,
    bootstrap_draws,
    loss_bound,
    parse_confidence,
    parse_high_bits,
    parse_target,
    run_search,
    smallest_prefix,
    with_raised,
)


@pytest.mark.parametrize("text, expected", [
    ("loss<=1.0", Target(1.0)), ("loss <= 0.5", Target(0.5)), (" loss<=.25 ", Target(0.25)),
    ("loss<=1%", Target(1.0, relative=True)), ("loss<=2", Target(2.0)),
])
def test_targets(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["acc>=80", "loss<1", "loss<=-1", "", "loss<=1.0 points", "loss<=%"])
def test_a_target_that_is_not_one_names_the_option_and_the_forms(text):
    with pytest.raises(QbertError, match=r"--target.*loss<=POINTS.*loss<=PERCENT%"):
        parse_target(text)


def test_target_loss_in_points_and_percent():
    assert Target(1.0).loss(84.5, 83.7) == pytest.approx(0.8) and Target(1.0).met(84.5, 83.5)
    assert not Target(1.0).met(84.5, 83.4)
    assert Target(1.0, relative=True).loss(80.0, 79.2) == pytest.approx(1.0)
    assert Target(1.0, relative=True).met(80.0, 79.2) and not Target(1.0, relative=True).met(80.0, 79.1)
    assert Target(1.0).met(84.5, 84.0, margin=0.5) and not Target(1.0).met(84.5, 83.9, margin=0.5)


@pytest.mark.parametrize("relative", [False, True])
def test_the_bootstrap_bound_matches_the_normal_approximation(relative):
    """Accuracy of two classifiers on the same 2,000 examples: the paired bootstrap's 90% quantile of the loss
    is the mean loss plus 1.2816 standard errors of the per-example difference (the central limit theorem)."""
    import numpy as np

    rng = np.random.default_rng(7)
    n = 2000
    labels = rng.integers(0, 3, n)
    fp32 = np.where(rng.random(n) < 0.8, labels, (labels + 1) % 3)
    candidate = np.where(rng.random(n) < 0.9, fp32, (fp32 + 1) % 3)  # disagrees with FP32 on about 10%
    draws = bootstrap_draws(n, seed=3)
    assert draws.shape == (1000, n) and (bootstrap_draws(n, seed=3) == draws).all()

    def accuracy(predicted, rows):
        return 100 * float((predicted[rows] == labels[rows]).mean())

    target = Target(1.0, relative=relative)
    bound = loss_bound(target, [accuracy(fp32, r) for r in draws], [accuracy(candidate, r) for r in draws], 0.9)
    difference = 100 * ((fp32 == labels).astype(float) - (candidate == labels))
    scale = 100 / accuracy(fp32, slice(None)) if relative else 1.0  # percent of FP32's accuracy
    expected = scale * (difference.mean() + 1.2816 * difference.std() / math.sqrt(n))
    standard_error = scale * difference.std() / math.sqrt(n)
    assert bound == pytest.approx(expected, abs=0.25 * standard_error)
    assert loss_bound(target, [80.0] * 3, [79.0, 80.0, 81.0], 0.5) == pytest.approx(target.loss(80.0, 80.0))


def test_confidence():
    assert parse_confidence(0.9) == 0.9 and parse_confidence(0) is None and parse_confidence(None) is None
    for bad in (0.3, 1.0, 1.5, -0.1):
        with pytest.raises(QbertError, match="--confidence"):
            parse_confidence(bad)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 20, 75])
def test_smallest_prefix_finds_the_threshold_with_few_evaluations(n):
    for threshold in range(n + 2):  # n + 1: never true
        calls: list[int] = []

        def ok(k: int, calls: list[int] = calls, threshold: int = threshold) -> bool:
            calls.append(k)
            return k >= threshold

        found = smallest_prefix(n, ok)
        assert found == (threshold if threshold <= n else None)
        assert len(calls) <= 2 * math.ceil(math.log2(max(threshold, 2))) + 3, (threshold, calls)


def test_raised_sites_get_high_bits_after_the_configs_own_rules():
    config = parse_config({"model": "tiny-random", "task": "stsb", "recipe": {
        "name": "w8a8_ptq", "sites": {"layer.0.ffn.*": None, "layer.1.attn.scores": {"bits": 6}}}})
    raised = with_raised(config, ["layer.1.ffn.residual_sum", "layer.1.attn.scores"], 16)
    before, after = check_site_plan(config), check_site_plan(raised)
    changed = {name for name in before.specs if before.specs[name] != after.specs[name]}
    assert changed == {"layer.1.ffn.residual_sum", "layer.1.attn.scores"}
    assert after.specs["layer.1.ffn.residual_sum"].bits == 16 and after.specs["layer.1.attn.scores"].bits == 16
    assert after.specs["layer.0.ffn.residual_sum"] is None  # the config's own rule still applies
    floating = check_site_plan(with_raised(config, ["layer.1.ffn.residual_sum"], None))
    assert floating.specs["layer.1.ffn.residual_sum"] is None
    assert {n for n in before.specs if before.specs[n] != floating.specs[n]} == {"layer.1.ffn.residual_sum"}


def test_high_bits():
    assert parse_high_bits("16") == 16 and parse_high_bits(12) == 12
    assert parse_high_bits("fp") is None and parse_high_bits("FP32") is None and parse_high_bits(None) is None
    for bad in ("8", "17", "half"):
        with pytest.raises(QbertError, match="--high-bits.*9 to 16.*fp"):
            parse_high_bits(bad)


def _config(real_data, **recipe):
    return parse_config({
        "name": "tiny_search", "model": "tiny-random", "task": "stsb", "seeds": [0],
        "data": {"dir": str(real_data), "max_train_samples": 64, "max_eval_samples": 80},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 64},
        "recipe": {"name": "w8a8_ptq", **recipe}, "calibrate": {"batches": 2, "batch_size": 4},
    })


def test_a_whole_search_is_consistent_and_resumes(real_data, tmp_path):
    config = _config(real_data)
    settings = SearchSettings(Target(0.0), seed=0, probe=16)
    result = run_search(config, settings, root=tmp_path)
    assert result["examples"] == {"held_out": 40, "search": 40, "probe": 16}
    ranking = [row["site"] for row in result["sensitivity"]["ranking"]]
    values = [row["sensitivity"] for row in result["sensitivity"]["ranking"]]
    plan = check_site_plan(config)
    assert sorted(ranking) == sorted(s.name for s in plan.quantized("activation"))
    assert values == sorted(values, reverse=True)
    assert result["chosen"] == ranking[: len(result["chosen"])]
    # every step of the trace is judged by its loss bound against FP32 on the search part, and the choice is the
    # smallest within
    fp32 = result["search"]["fp32"]
    assert result["confidence"] == 0.9
    for step in result["trace"]:
        assert step["loss"] == pytest.approx(fp32 - step["metric"], abs=1e-3)
        assert step["within"] == (step["bound"] <= 0.0 + 1e-9)
    within = {step["sites"] for step in result["trace"] if step["within"]}
    if result["reached"]:
        k = len(result["chosen"])
        assert k in within and (k == 0 or k - 1 in {s["sites"] for s in result["trace"] if not s["within"]})
    held = result["held_out"]
    assert held["within"] == (held["fp32"] - held["chosen"] <= 1e-9)
    spent = result["evaluations"]
    assert spent["sensitivity"] == len(ranking) + 1 and spent["now"] == spent["total"]
    # chosen.yaml: the config with the chosen sites at 16 bits
    from pathlib import Path

    chosen = load_config(Path(result["folder"]) / "chosen.yaml")
    chosen_plan = check_site_plan(chosen)
    assert {n for n, s in chosen_plan.specs.items() if s is not None and s.bits == 16} == set(result["chosen"])
    # again, and for another target: every evaluation is reused, the numbers are the same
    again = run_search(config, settings, root=tmp_path, force=True)
    assert again["evaluations"]["now"] == 0 and again["chosen"] == result["chosen"]
    assert again["held_out"] == result["held_out"]
    import qbert

    loose = qbert.search(config, "loss<=1000", seed=0, probe=16, runs_dir=tmp_path)  # the Python API
    assert loose["chosen"] == [] and loose["evaluations"]["now"] == 0 and loose["folder"] == result["folder"]


def test_search_errors_are_one_line(real_data, tmp_path):
    runner = CliRunner()
    qat = tmp_path / "qat.yaml"
    qat.write_text("model: tiny-random\ntask: mrpc\nrecipe: {name: w8a8_qat}\n")
    result = runner.invoke(app, ["search", str(qat)])
    assert result.exit_code == 2 and "recipe.name" in result.output and "w8a8_ptq" in result.output
    assert len(result.output.strip().splitlines()) == 1
    ptq = tmp_path / "ptq.yaml"
    ptq.write_text("model: tiny-random\ntask: mrpc\nrecipe: {name: w8a8_ptq}\n")
    result = runner.invoke(app, ["search", str(ptq), "--target", "accuracy>=80"])
    assert result.exit_code == 2 and "--target" in result.output and "loss<=POINTS" in result.output
    result = runner.invoke(app, ["search", str(ptq), "--confidence", "1.5"])
    assert result.exit_code == 2 and "--confidence" in result.output and "0.9" in result.output
    assert len(result.output.strip().splitlines()) == 1
    squad = tmp_path / "squad.yaml"
    squad.write_text("model: tiny-random\ntask: squad\nfinetune: {max_seq_len: 384}\nrecipe: {name: w8a8_ptq}\n")
    result = runner.invoke(app, ["search", str(squad)])
    assert result.exit_code == 2 and "question answering" in result.output


def test_a_floating_point_search_switches_quantizers_off_and_gets_what_calibrating_each_plan_gets(
        real_data, tmp_path, monkeypatch):
    """Raising activation sites to floating point reuses one calibrated model (their quantizers switched off);
    every stored evaluation equals the one made by calibrating a model per plan, the way other searches do."""
    import json
    import shutil
    from pathlib import Path

    from qbert import precision_search

    config = _config(real_data)
    settings = SearchSettings(Target(0.0), seed=0, probe=16, high_bits=None)
    switched = run_search(config, settings, root=tmp_path)
    assert switched["evaluations"]["switched"] and switched["evaluations"]["calibrations"] == 1
    folder = Path(switched["folder"])
    fast = json.loads((folder / "evaluations.json").read_text())["values"]
    shutil.rmtree(folder)
    monkeypatch.setattr(precision_search, "switchable", lambda *args: False)
    calibrated = run_search(config, settings, root=tmp_path)
    spent = calibrated["evaluations"]
    assert not spent["switched"] and spent["calibrations"] == spent["now"] == len(fast)
    slow = json.loads((folder / "evaluations.json").read_text())["values"]
    assert slow == fast and len(fast) > len(switched["sensitivity"]["ranking"])
    assert calibrated["chosen"] == switched["chosen"] and calibrated["held_out"] == switched["held_out"]


def test_which_searches_switch_quantizers_off():
    from qbert.recipes import get_recipe

    from qbert.precision_search import switchable
    from qbert.quant.sites import enumerate_sites
    from tests.conftest import tiny_model

    model, _ = tiny_model()

    def plan_of(config):
        return get_recipe(config.recipe.name)(config.recipe, config).plan(enumerate_sites(model))

    fp = SearchSettings(Target(1.0), seed=0, high_bits=None)
    base = {"model": "tiny-random", "task": "stsb", "recipe": {"name": "w8a8_ptq"}}
    config = parse_config(base)
    plan = plan_of(config)
    activations = [s.name for s in plan.quantized("activation")]
    weights = [s.name for s in plan.quantized("weight")]
    assert switchable(config, fp, plan, activations)
    assert not switchable(config, SearchSettings(Target(1.0), seed=0), plan, activations)  # 16 bits: re-ranged
    assert not switchable(config, fp, plan, activations + weights[:1])  # a weight: calibration observes it
    upstream = parse_config({**base, "calibrate": {"upstream_quantized": True}})
    assert not switchable(upstream, fp, plan_of(upstream), activations)
    # PEG with the FFN permutation shared from each layer's FFN output: that site is not switched, the others are
    peg = parse_config({**base, "recipe": {"name": "peg", "scope": "ffn", "permute": True, "groups": 4}})
    peg_plan = plan_of(peg)
    lent = set(peg_plan.permutation_sources.values())
    assert lent and all(name.endswith("ffn.output") for name in lent)
    others = [s.name for s in peg_plan.quantized("activation") if s.name not in lent]
    assert switchable(peg, fp, peg_plan, others) and not switchable(peg, fp, peg_plan, others + sorted(lent)[:1])
