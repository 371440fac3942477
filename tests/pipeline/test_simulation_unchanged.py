"""The speed work keeps what every recipe computes: the tiny STS-B run's metrics and per-example predictions
(hashed) against the outputs recorded before it (tests/data/simulated_outputs.json). One thread, so the sums of
the CPU kernels run in one order; on another kind of CPU (other vector units) the recorded hashes may not hold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qbert.recipes import available

from qbert.config import parse_config
from qbert.pipeline.run import run_experiment

RECORDED = json.loads((Path(__file__).resolve().parents[1] / "data" / "simulated_outputs.json").read_text())
PARAMS = {"peg": {"groups": 4}}  # tiny-random's 64 dimensions: 4 groups, not 6
CHANGED = {"w8a8_qat"}
"""Recipes whose outputs changed, with the reason in the file's _about."""


def golden_config(data: Path, name: str):
    return parse_config({
        "name": f"golden_{name}", "model": "tiny-random", "task": "stsb", "seeds": [0],
        "data": {"dir": str(data), "max_train_samples": 64, "max_eval_samples": 48},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 64, "threads": 1},
        "recipe": {"name": name, **PARAMS.get(name, {})}, "calibrate": {"batches": 2, "batch_size": 4}})


def test_the_record_covers_every_recipe_and_names_what_changed():
    assert set(RECORDED["now"]) == set(RECORDED["before"]) == set(available())
    assert {name for name in available() if RECORDED["now"][name] != RECORDED["before"][name]} == CHANGED


def test_every_recipe_computes_what_it_did(real_data, tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        found = {}
        for name in available():
            seed = run_experiment(golden_config(real_data, name), root=tmp_path).seeds[0]
            found[name] = {"metrics": seed.metrics, "predictions_sha256": hashlib.sha256(
                (seed.folder / "predictions.jsonl").read_bytes()).hexdigest()}
    finally:
        torch.set_num_threads(threads)
    differ = [name for name in available() if found[name] != RECORDED["now"][name]]
    assert not differ, {name: (found[name], RECORDED["now"][name]) for name in differ}
    assert len({v["predictions_sha256"] for v in found.values()}) >= len(found) - 2  # the outputs do tell recipes apart
