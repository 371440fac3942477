"""qbert plot's numbers: sizes from each recipe's report, medians over seeds, the Pareto front, and the
leave-one-out grid, on run folders written by hand with known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qbert.config import parse_config
from qbert.inspection.plots import pareto_front
from qbert.inspection.results import collect_points, fp32_megabytes, leave_out_grid
from qbert.runs import atomic_write_json, config_dir, seed_dir, write_config, write_status
from qbert.tasks import get_task


def finished(root, recipe: dict, name: str, values: dict[int, float], report: dict | None = None) -> str:
    """A config of tiny-random on MRPC with finished seeds whose f1 are ``values``."""
    config = parse_config({"name": name, "model": "tiny-random", "task": "mrpc", "seeds": sorted(values),
                           "recipe": recipe})
    write_config(config_dir(root, name, config.config_hash()) / "config.yaml", config.resolved())
    for seed, f1 in values.items():
        folder = seed_dir(root, name, config.config_hash(), seed)
        folder.mkdir(parents=True)
        atomic_write_json(folder / "metrics.json", {
            "version": 2, "name": name, "config_hash": config.config_hash(), "seed": seed, "model": "tiny-random",
            "task": "mrpc", "recipe": recipe["name"], "headline": "f1", "simulated": recipe["name"] != "fp32",
            "arithmetic": "simulated", "metrics": {"f1": f1, "accuracy": f1 - 10}, "recipe_report": report or {}})
        write_status(folder, "done")
    return config.config_hash()


def test_points_take_each_recipes_size_and_the_median_over_seeds(tmp_path):
    task = get_task("mrpc")
    fp32_mb = fp32_megabytes("tiny-random", task)
    finished(tmp_path, {"name": "fp32"}, "a_fp32", {1: 80.0, 2: 82.0, 3: 81.0})
    finished(tmp_path, {"name": "w8a8_ptq"}, "a_w8a8", {1: 70.0, 2: 75.0}, {"size": {"mb": 2.5}})
    finished(tmp_path, {"name": "gobo"}, "a_gobo", {1: 79.0}, {"fp32_bytes": 4_000_000, "coded_bytes": 500_000})
    finished(tmp_path, {"name": "dynamic_int8"}, "a_int8", {1: 78.0}, {"size_mb": {"fp32": 9.0, "int8": 3.0}})
    points = {p["label"]: p for p in collect_points(tmp_path, task, "tiny-random")}
    assert points["a_fp32"]["mb"] == pytest.approx(fp32_mb, abs=1e-3) and points["a_fp32"]["median"] == 81.0
    assert (points["a_fp32"]["min"], points["a_fp32"]["max"], points["a_fp32"]["n"]) == (80.0, 82.0, 3)
    assert points["a_w8a8"]["mb"] == 2.5 and points["a_w8a8"]["median"] == 72.5
    assert points["a_gobo"]["mb"] == pytest.approx(fp32_mb - 3.5, abs=1e-3)
    assert points["a_int8"]["mb"] == 3.0
    both = collect_points(tmp_path, task, "tiny-random", ["f1", "accuracy"])
    assert next(p for p in both if p["label"] == "a_w8a8")["median"] == 67.5  # per-seed means 65, 70
    assert collect_points(tmp_path, task, "minilm-l6") == []
    finished(tmp_path, {"name": "gobo", "bits": 4}, "a_gobo", {1: 80.0}, {"fp32_bytes": 4_000_000, "coded_bytes": 1})
    labels = sorted(p["label"] for p in collect_points(tmp_path, task, "tiny-random") if "gobo" in p["label"])
    assert labels == ["a_gobo (bits=3)", "a_gobo (bits=4)"]  # one run name, two settings: the differing key named


def test_the_fp32_size_is_four_bytes_per_parameter_of_the_built_model():
    from qbert.models import load_model, resolve_model

    built = load_model(resolve_model("tiny-random"), "classification", 2)  # real tensors, not the meta skeleton
    assert fp32_megabytes("tiny-random", get_task("mrpc")) == 4 * sum(p.numel() for p in built.parameters()) / 1e6


def test_the_pareto_front_keeps_points_nothing_smaller_beats():
    points = [{"mb": 1.0, "median": 70.0}, {"mb": 2.0, "median": 80.0}, {"mb": 2.0, "median": 75.0},
              {"mb": 3.0, "median": 79.0}, {"mb": 4.0, "median": 85.0}]
    assert [p["mb"] for p in pareto_front(points)] == [1.0, 2.0, 4.0]
    assert pareto_front(points)[1]["median"] == 80.0


def test_the_leave_out_grid_is_the_gain_over_the_all_quantized_twin(tmp_path):
    task = get_task("mrpc")
    finished(tmp_path, {"name": "w32a8_ptq", "leave_out": []}, "lo", {1: 60.0, 2: 62.0})
    finished(tmp_path, {"name": "w32a8_ptq", "leave_out": ["ffn.residual_sum"]}, "lo", {1: 80.0, 2: 80.0})
    finished(tmp_path, {"name": "w32a8_ptq", "leave_out": ["layer.1.ffn.residual_sum"]}, "lo", {1: 70.0})
    finished(tmp_path, {"name": "w32a8_ptq", "leave_out": ["layer.0.attn.probs"]}, "lo", {1: 61.0, 2: 61.5})
    finished(tmp_path, {"name": "mp_ptq", "leave_out": ["attn.probs"]}, "other", {1: 99.0})  # no twin: left out
    grid, families, layers = leave_out_grid(tmp_path, task, "tiny-random")
    assert families == ["attn.probs", "ffn.residual_sum"] and layers == ["0", "1", "all"]
    expected = np.array([[0.25, math.nan, math.nan], [math.nan, 9.0, 19.0]])
    np.testing.assert_array_equal(np.isnan(grid), np.isnan(expected))
    np.testing.assert_allclose(grid[~np.isnan(grid)], expected[~np.isnan(expected)])
    assert leave_out_grid(tmp_path / "empty", task, "tiny-random") is None
