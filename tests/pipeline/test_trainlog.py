"""Training logs: the loss in run.log at the chosen interval, TensorBoard event files (read back with
TensorBoard's own reader) with the loss, the learning rate and, for QAT, the learned ranges."""

from __future__ import annotations

import logging

import pytest

from qbert.pipeline.trainlog import MAX_LOG_EVERY, TrainingLog, log_interval, watched_ranges
from qbert.runs import read_json
from tests.conftest import tiny_config

tensorboard = pytest.importorskip("tensorboard", reason="the viz extra (make setup installs it)")


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_the_interval_gives_about_twenty_lines_and_at_most_fifty_steps():
    assert log_interval(8) == 1 and log_interval(100) == 5 and log_interval(4769) == MAX_LOG_EVERY
    assert log_interval(4769, every=7) == 7


def test_loss_lines_average_the_steps_since_the_last_line_and_events_hold_every_step(tmp_path, caplog):
    losses = [1.0, 0.8, 0.6, 0.5, 0.45, 0.4, 0.3]
    ranges = iter([(-1.0, 1.0), (-2.0, 2.5), (-3.0, 3.5)])
    record = TrainingLog("qat", len(losses), every=3, folder=tmp_path,
                         watch=lambda: {"layer.0.ffn.output": next(ranges)})
    with caplog.at_level(logging.INFO, logger="qbert"):
        for step, loss in enumerate(losses, start=1):
            record.step(step, loss, lr=1e-3 * step)
    record.close()
    lines = [r.getMessage() for r in caplog.records if " step " in r.getMessage()]
    assert [line.split(" (")[0] for line in lines] == [  # the mean loss of the steps since the last line
        "qat step 3/7 loss 0.8000 lr 3.00e-03", "qat step 6/7 loss 0.4500 lr 6.00e-03",
        "qat step 7/7 loss 0.3000 lr 7.00e-03"]
    assert lines[1].endswith("ranges layer.0.ffn.output [-2, 2.5]")
    assert scalars(tmp_path, "qat/loss") == [(i + 1, pytest.approx(v)) for i, v in enumerate(losses)]
    assert [v for _, v in scalars(tmp_path, "qat/lr")] == pytest.approx([1e-3 * s for s in range(1, 8)])
    assert scalars(tmp_path, "qat/range/layer.0.ffn.output/hi") == [(3, 1.0), (6, 2.5), (7, 3.5)]


def test_watched_ranges_take_the_outlier_sites_a_recipe_quantizes():
    import torch

    class Fixed:
        def __init__(self, lo, hi):
            self.range = (torch.tensor([lo, lo - 1]), torch.tensor([hi, hi + 1]))

        def quant_range(self):
            return self.range

    quantizers = {"layer.0.ffn.output": Fixed(-1.0, 2.0), "layer.5.ffn.output": Fixed(-3.0, 4.0),
                  "layer.5.attn.probs": Fixed(0.0, 1.0)}
    assert watched_ranges(quantizers)() == {"layer.0.ffn.output": (-2.0, 3.0), "layer.5.ffn.output": (-4.0, 5.0)}
    assert watched_ranges({"layer.1.attn.probs": Fixed(0.0, 1.0)}) is None


def test_a_qat_run_writes_its_events_and_loss_lines_and_the_switch_turns_events_off(tmp_path, real_data):
    from qbert.pipeline.run import run_experiment

    config = tiny_config(real_data, {"name": "w8a8_qat"})
    seed = run_experiment(config, root=tmp_path / "runs").seeds[0].folder
    record = read_json(seed / "metrics.json")
    n = record["qat"]["steps"]  # the QAT batch size is the recipe's (Table 10), not the fine-tune's
    assert [s for s, _ in scalars(seed / "tensorboard" / "qat", "qat/loss")] == list(range(1, n + 1))
    assert scalars(seed / "tensorboard" / "qat", "qat/range/layer.1.ffn.output/hi")[-1][0] == n
    assert [s for s, _ in scalars(seed / "tensorboard" / "finetune", "finetune/loss")] == [1, 2, 3, 4]
    log = (seed / "run.log").read_text()
    assert f"qat step {n}/{n} loss" in log and "finetune step 4/4 loss" in log  # 64 examples, batch 16

    quiet = tiny_config(real_data, {"name": "w8a8_qat"}, log={"tensorboard": False})
    assert quiet.config_hash() == config.config_hash()  # logging is not part of a result's identity
    seed = run_experiment(quiet, root=tmp_path / "quiet").seeds[0].folder
    assert not (seed / "tensorboard").exists() and f"qat step {n}/{n} loss" in (seed / "run.log").read_text()
