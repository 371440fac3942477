"""End to end on tiny-random with small real data: run folders, skip, resume, cache, determinism."""

import json

import pytest

from qbert.config import parse_config
from qbert.pipeline.finetune import linear_warmup_decay
from qbert.pipeline.run import run_experiment
from qbert.runs import read_json


def tiny(real_data, **overrides):
    data = {
        "name": "tiny",
        "model": "tiny-random",
        "task": "mrpc",
        "seeds": [0],
        "data": {"dir": str(real_data), "max_train_samples": 64, "max_eval_samples": 32},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 64},
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[section] = value
    return parse_config(data)


def test_run_writes_the_run_folder(real_data, tmp_path):
    result = run_experiment(tiny(real_data), root=tmp_path)
    seed = result.folder / "seed=0"
    for name in ("config.yaml", "metrics.json", "env.json", "status.json", "run.log", "predictions.jsonl"):
        assert (seed / name).is_file(), name
    metrics = read_json(seed / "metrics.json")
    assert set(metrics["metrics"]) == {"f1", "accuracy"}
    assert metrics["finetune"]["cached"] is False and metrics["finetune"]["steps"] == 4
    assert read_json(seed / "status.json")["state"] == "done"
    env = read_json(seed / "env.json")
    assert env["packages"]["torch"] and "git_dirty" in env
    predictions = [json.loads(line) for line in (seed / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 32 and {"guid", "label", "prediction"} <= set(predictions[0])
    summary = read_json(result.folder / "summary.json")
    assert summary["metrics"]["f1"]["n"] == 1 and summary["headline"] == "f1"


def test_mnli_without_dev_mismatched_runs_and_records_the_missing_split(real_data, tmp_path):
    result = run_experiment(tiny(real_data, name="tiny_mnli", task="mnli"), root=tmp_path)
    metrics = read_json(result.folder / "seed=0" / "metrics.json")
    assert set(metrics["metrics"]) == {"accuracy"}  # matched only: no accuracy_mismatched, no placeholder
    assert list(metrics["missing_splits"]) == ["mismatched"] and list(metrics["evaluate"]) == ["matched"]
    assert not list((result.folder / "seed=0").glob("predictions-mismatched*"))
    assert "no mismatched evaluation split" in (result.folder / "seed=0" / "run.log").read_text()


def test_rerun_skips_finished_seeds_and_force_reruns(real_data, tmp_path):
    cfg = tiny(real_data)
    run_experiment(cfg, root=tmp_path)
    again = run_experiment(cfg, root=tmp_path)
    assert [o.state for o in again.seeds] == ["skipped"]
    forced = run_experiment(cfg, root=tmp_path, force=True)
    assert [o.state for o in forced.seeds] == ["done"]
    # the forced rerun reuses the cached fine-tuned checkpoint
    assert read_json(forced.folder / "seed=0" / "metrics.json")["finetune"]["cached"] is True


def test_a_failing_forced_rerun_keeps_the_finished_results(real_data, tmp_path, monkeypatch):
    """--force reruns beside the finished seed and replaces it only once the new results exist."""
    import qbert.pipeline.run as run_module

    cfg = tiny(real_data)
    seed = run_experiment(cfg, root=tmp_path).folder / "seed=0"
    before = {p.name: p.read_bytes() for p in seed.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("checkpoint is damaged")

    monkeypatch.setattr(run_module, "run_seed", broken)
    with pytest.raises(RuntimeError, match="damaged"):
        run_experiment(cfg, root=tmp_path, force=True)
    assert {p.name: p.read_bytes() for p in seed.iterdir() if p.is_file()} == before
    assert read_json(seed.with_name(".seed=0.rerun") / "status.json")["state"] == "failed"

    monkeypatch.undo()
    forced = run_experiment(cfg, root=tmp_path, force=True)
    assert [o.state for o in forced.seeds] == ["done"] and read_json(seed / "status.json")["state"] == "done"
    assert not seed.with_name(".seed=0.rerun").exists() and not seed.with_name(".seed=0.old").exists()
    assert read_json(seed / "metrics.json")["metrics"] == json.loads(before["metrics.json"])["metrics"]


def test_a_seed_being_run_elsewhere_is_not_run_twice_and_ls_tells_running_from_orphaned(real_data, tmp_path):
    from qbert.runs import list_runs, seed_lock

    cfg = tiny(real_data, seeds=[0, 1])
    folder = tmp_path / cfg.name / cfg.config_hash()
    with seed_lock(folder / "seed=1") as holder:  # another process, as far as the run can tell
        assert holder is None
        result = run_experiment(cfg, root=tmp_path)
    assert [o.state for o in result.seeds] == ["done", "busy"]
    assert "another process" in result.seeds[1].error and not (folder / "seed=1").exists()

    (folder / "seed=1").mkdir()
    (folder / "seed=1" / "status.json").write_text(json.dumps({"state": "running"}))
    assert list_runs(tmp_path)[0]["states"]["1"] == "orphaned"  # killed: nobody holds its lock
    with seed_lock(folder / "seed=1"):
        import subprocess
        import sys

        code = ("import sys; from pathlib import Path; from qbert.runs import list_runs; "
                "print(list_runs(Path(sys.argv[1]))[0]['states']['1'])")
        seen = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert seen.stdout.strip() == "running"


def test_interrupted_seed_restarts_cleanly(real_data, tmp_path):
    cfg = tiny(real_data)
    result = run_experiment(cfg, root=tmp_path)
    seed = result.folder / "seed=0"
    (seed / "metrics.json").unlink()
    (seed / "status.json").write_text(json.dumps({"state": "running", "pid": 999999}))
    (seed / "leftover.tmp").write_text("half-written")
    again = run_experiment(cfg, root=tmp_path)
    assert [o.state for o in again.seeds] == ["done"]
    assert not (seed / "leftover.tmp").exists()
    assert read_json(seed / "status.json")["state"] == "done"


def test_same_config_and_seed_give_identical_metrics(real_data, tmp_path):
    cfg = tiny(real_data, finetune__epochs=2)
    first = run_experiment(cfg, root=tmp_path / "a")
    second = run_experiment(cfg, root=tmp_path / "b")  # separate cache: trains again
    m1 = read_json(first.folder / "seed=0" / "metrics.json")
    m2 = read_json(second.folder / "seed=0" / "metrics.json")
    assert m2["finetune"]["cached"] is False
    assert m1["metrics"] == m2["metrics"]
    assert m1["finetune"]["final_loss"] == m2["finetune"]["final_loss"]
    other_seed = run_experiment(tiny(real_data, finetune__epochs=2, seeds=[1]), root=tmp_path / "a")
    other = read_json(other_seed.folder / "seed=1" / "metrics.json")
    assert other["finetune"]["final_loss"] != m1["finetune"]["final_loss"]


def test_checkpoint_is_shared_by_configs_that_differ_after_finetuning(real_data, tmp_path):
    run_experiment(tiny(real_data), root=tmp_path)
    other = run_experiment(tiny(real_data, evaluate__batch_size=8), root=tmp_path)
    assert read_json(other.folder / "seed=0" / "metrics.json")["finetune"]["cached"] is True
    changed = run_experiment(tiny(real_data, finetune__lr=5e-5), root=tmp_path)
    assert read_json(changed.folder / "seed=0" / "metrics.json")["finetune"]["cached"] is False


def test_tokenized_features_are_cached_beside_the_checkpoints(real_data, tmp_path):
    first = run_experiment(tiny(real_data), root=tmp_path)
    cache = tmp_path / ".cache" / "features"
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert sorted(name.rsplit("-", 1)[0] for name in files) == ["mrpc-dev", "mrpc-train"]
    other = run_experiment(tiny(real_data, evaluate__batch_size=8), root=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == files  # read, not written again
    assert "tokenized features from the cache" in (other.folder / "seed=0" / "run.log").read_text()
    assert other.seeds[0].metrics == first.seeds[0].metrics
    run_experiment(tiny(real_data, data__max_train_samples=48), root=tmp_path)  # other examples: another file
    assert len(list(cache.iterdir())) == 3


def test_median_over_seeds(real_data, tmp_path):
    result = run_experiment(tiny(real_data, seeds=[0, 1, 2]), root=tmp_path)
    values = sorted(read_json(result.folder / f"seed={s}" / "metrics.json")["metrics"]["accuracy"]
                    for s in (0, 1, 2))
    agg = result.summary["metrics"]["accuracy"]
    assert (agg["median"], agg["min"], agg["max"], agg["n"]) == (values[1], values[0], values[2], 3)


def test_regression_task_end_to_end(real_data, tmp_path):
    result = run_experiment(tiny(real_data, task="stsb"), root=tmp_path)
    assert set(result.seeds[0].metrics) == {"pearson", "spearman"}


def test_squad_end_to_end_on_real_articles(real_data, tmp_path):
    cfg = tiny(real_data, task="squad", data={"dir": str(real_data), "train_from_eval": 0.75,
                                              "max_train_samples": 32, "max_eval_samples": 16},
               finetune={"epochs": 1, "batch_size": 8, "max_seq_len": 192, "doc_stride": 64})
    result = run_experiment(cfg, root=tmp_path)
    metrics = result.seeds[0].metrics
    assert set(metrics) == {"exact_match", "f1"}
    rows = [json.loads(x) for x in (result.folder / "seed=0" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(isinstance(r["prediction"], str) for r in rows)


def test_mnli_reports_matched_and_mismatched(fixture_data, tmp_path):
    cfg = parse_config({"model": "tiny-random", "task": "mnli", "seeds": [0], "data": {"dir": str(fixture_data)},
                        "finetune": {"epochs": 1, "batch_size": 4, "max_seq_len": 32}})
    result = run_experiment(cfg, root=tmp_path)
    assert set(result.seeds[0].metrics) == {"accuracy", "accuracy_mismatched"}
    assert (result.folder / "seed=0" / "predictions-mismatched.jsonl").is_file()


def test_schedule_warms_up_then_decays_to_zero():
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup_decay(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def _tsv_labels(path, column, limit):
    rows = path.read_text(encoding="utf-8-sig").splitlines()
    header = rows[0].split("\t")
    return [row.split("\t")[header.index(column)] for row in rows[1:limit + 1]]


def test_fp32_baseline_is_compared_with_the_majority_class(real_data, tmp_path, capsys):
    """metrics.json ``trivial``: the training subset's majority class scored on the dev subset, computed here
    from the TSV files with scikit-learn; the run is flagged weak exactly when it does not beat it."""
    from sklearn.metrics import accuracy_score, f1_score

    from qbert.tables import WEAK_MARK, Value, ours_text

    result = run_experiment(tiny(real_data), root=tmp_path)
    record = read_json(result.folder / "seed=0" / "metrics.json")
    train = _tsv_labels(real_data / "glue" / "MRPC" / "train.tsv", "Quality", 64)
    dev = [int(x) for x in _tsv_labels(real_data / "glue" / "MRPC" / "dev.tsv", "Quality", 32)]
    majority = max(set(train), key=train.count)
    constant = [int(majority)] * len(dev)
    assert record["trivial"]["predictor"] == f"always {majority!r}"
    assert record["trivial"]["metrics"]["f1"] == pytest.approx(100 * f1_score(dev, constant))
    assert record["trivial"]["metrics"]["accuracy"] == pytest.approx(100 * accuracy_score(dev, constant))
    weak = record["metrics"]["f1"] <= record["trivial"]["metrics"]["f1"] + 0.5
    assert record["trivial"]["weak"] is weak
    assert ("no better than the input-blind predictor" in capsys.readouterr().err) is weak
    assert ours_text(Value("ok", 80.0, n=1, weak=True)).endswith(WEAK_MARK)

    quantized = run_experiment(tiny(real_data, recipe={"name": "w8a8_ptq"}, calibrate={"batches": 1}), root=tmp_path)
    assert read_json(quantized.folder / "seed=0" / "metrics.json")["trivial"] is None  # only the FP32 baseline


def test_regression_baseline_is_a_constant_with_zero_correlation(real_data, tmp_path):
    record = read_json(run_experiment(tiny(real_data, task="stsb"), root=tmp_path).folder / "seed=0" / "metrics.json")
    train = [float(x) for x in _tsv_labels(real_data / "glue" / "STS-B" / "train.tsv", "score", 64)]
    assert record["trivial"]["predictor"] == f"constant {sum(train) / len(train):.2f}"
    assert record["trivial"]["metrics"] == {"pearson": 0.0, "spearman": 0.0}


def test_finished_work_reruns_without_writing_so_a_read_only_results_folder_is_fine(real_data, tmp_path,
                                                                                    monkeypatch):
    import errno

    import qbert.runs

    cfg = tiny(real_data)
    first = run_experiment(cfg, root=tmp_path)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(args[0] if args else ""))

    monkeypatch.setattr(qbert.runs.tempfile, "mkstemp", read_only)
    again = run_experiment(cfg, root=tmp_path)  # every seed finished: nothing to write
    assert [o.state for o in again.seeds] == ["skipped"] and again.summary == first.summary
    with pytest.raises(PermissionError):
        run_experiment(tiny(real_data, seeds=[0, 1]), root=tmp_path)  # new work needs the folder writable


def _stop_before_call(monkeypatch, call: int) -> None:
    """Training stops as at Ctrl-C just before its ``call``-th optimisation step in this process (counted over
    the fine-tune and QAT loops)."""
    from qbert.pipeline import finetune as loop

    real, calls = loop.training_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", step)


@pytest.mark.parametrize("recipe, stops, resumed", [
    # learned-free W8A8 QAT from the fine-tuned checkpoint with Quant-Noise (random masks each step): stopped in
    # the fine-tune after 2 of its 4 steps, then in QAT after 5 of its 8 (one step into the second epoch)
    ({"name": "w8a8_qat", "epochs": 2, "batch_size": 16, "lr": 1e-4, "quant_noise": 0.5}, [3, 8],
     {"finetune": [2], "qat": [5]}),
    # Q8BERT from the pretrained model: quantization delay of 3 steps, then EMA ranges; stopped after step 5
    ({"name": "q8bert", "epochs": 2, "batch_size": 16, "lr": 1e-4, "start_step": 3}, [6], {"qat": [5]}),
])
def test_interrupted_training_resumes_where_it_stopped_with_the_same_results(
        real_data, tmp_path, monkeypatch, recipe, stops, resumed):
    from qbert.pipeline import finetune as loop
    from tests.conftest import tiny_config

    cfg = tiny_config(real_data, recipe)
    whole = read_json(run_experiment(cfg, root=tmp_path / "whole").folder / "seed=0" / "metrics.json")

    monkeypatch.setattr(loop, "SAVE_EVERY", 0.0)  # a save after every step
    for call in stops:
        with monkeypatch.context() as patch:
            _stop_before_call(patch, call)
            with pytest.raises(KeyboardInterrupt):
                run_experiment(cfg, root=tmp_path / "stopped")
    seed = run_experiment(cfg, root=tmp_path / "stopped").folder / "seed=0"
    again = read_json(seed / "metrics.json")

    assert again["metrics"] == whole["metrics"]
    assert again["recipe_report"]["ranges"] == whole["recipe_report"]["ranges"]
    for stage in ("finetune", "qat"):
        if whole[stage] is not None:
            assert again[stage]["final_loss"] == whole[stage]["final_loss"], stage
            assert again[stage].get("resumed_at_steps") == resumed.get(stage), stage
            assert "resumed_at_steps" not in whole[stage]
    # run.log holds the attempts since QAT first saved (a resumed one appends to it); the saved states are gone once
    # the results are stored
    log = (seed / "run.log").read_text()
    assert log.count("seed 0: tiny-random on mrpc") == 1 + len(resumed["qat"])
    assert log.count("QAT resumes at step") == len(resumed["qat"])
    assert not (seed / "resume").exists()
    assert not list((tmp_path / "stopped").rglob("*.resume.pt"))


def test_a_saved_training_state_of_another_training_is_not_continued(tmp_path, caplog):
    import torch

    from qbert.pipeline.finetune import load_training_state, save_training_state

    path = tmp_path / "qat.pt"
    save_training_state(path, {"identity": "abc", "step": 3})
    assert load_training_state(path, "abc")["step"] == 3
    assert load_training_state(tmp_path / "none.pt", "abc") is None
    assert load_training_state(path, "other") is None
    assert "belongs to another training" in caplog.text
    path.write_bytes(b"not a torch file")
    assert load_training_state(path, "abc") is None
    assert "cannot read the saved training state" in caplog.text
    torch.save({"identity": "abc", "hook": print}, path)  # not plain data: refused, not unpickled
    assert load_training_state(path, "abc") is None


def test_emulated_bf16_is_told_from_the_cpu_flags():
    import platform

    import torch

    from qbert.pipeline.finetune import bf16_keys, emulated_bf16

    cpu = torch.device("cpu")
    avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})  # an AMD EPYC (Zen 3), this project's machine since 2026-12
    sapphire = avx2 | {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert emulated_bf16(cpu, avx2) is x86
    assert emulated_bf16(cpu, sapphire) is False and emulated_bf16(cpu, avx2 - {"avx2"} | {"avx512_bf16"}) is False
    assert emulated_bf16(torch.device("meta"), avx2) is False  # not a CPU: autocast is the device's own
    cfg = parse_config({"name": "b", "model": "tiny-random", "task": "mrpc", "finetune": {"precision": "bf16"},
                        "recipe": {"name": "w8a8_qat", "precision": "fp32"}})
    assert bf16_keys(cfg) == ["finetune.precision"]


def test_an_int8_gemm_without_vnni_is_told_from_the_cpu_flags():
    import platform

    import torch

    from qbert.pipeline.finetune import slow_int8_gemm

    cpu, x86 = torch.device("cpu"), platform.machine().lower() in ("x86_64", "amd64")
    assert slow_int8_gemm(cpu, frozenset({"avx2", "fma"})) is x86  # an AMD EPYC (Zen 3)
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert slow_int8_gemm(cpu, frozenset({"avx2", flag})) is False



def test_integer_evaluation_runs_on_onnxruntime_where_int_mm_is_slow(real_data, tmp_path, monkeypatch, capsys):
    import qbert.pipeline.run as run_module
    from qbert.runs import read_json

    monkeypatch.setattr(run_module, "slow_int8_gemm", lambda device: True)
    result = run_experiment(tiny(real_data, recipe={"name": "w8a8_ptq"}, evaluate={"integer": True}), root=tmp_path)
    integer = read_json(result.folder / "seed=0" / "metrics.json")["integer"]
    assert integer["gemms"]["kernel"].startswith("onnxruntime") and "x64quantprecision=1" in integer["gemms"]["kernel"]
    assert len(integer["gemms"]["integer"]) == 14 and integer["agreement"]["dev"]["equal_predictions"] >= 0.9
    assert "int8 dot-product" not in capsys.readouterr().err
    assert not list((result.folder / "seed=0").glob(".integer-onnx-*"))  # the temporary export is gone
    monkeypatch.setattr(run_module, "onnxruntime_available", lambda: False)  # without it: torch._int_mm, warned
    result = run_experiment(tiny(real_data, recipe={"name": "w8a8_ptq"}, evaluate={"integer": True}),
                            root=tmp_path / "without")
    assert "warning: evaluate.integer: this CPU has no int8 dot-product instructions" in capsys.readouterr().err
    kernel = read_json(result.folder / "seed=0" / "metrics.json")["integer"]["gemms"]["kernel"]
    assert kernel.startswith("torch._int_mm")


def test_bf16_on_a_cpu_that_emulates_it_is_a_warning_naming_the_keys(real_data, tmp_path, monkeypatch, capsys):
    import qbert.pipeline.run as run_module

    monkeypatch.setattr(run_module, "emulated_bf16", lambda device: True)
    result = run_experiment(tiny(real_data, evaluate={"precision": "bf16"}), root=tmp_path)
    err = capsys.readouterr().err
    assert "warning: evaluate.precision: bf16 on a CPU without native bf16" in err
    assert "set evaluate.precision=fp32 for speed" in err
    assert "bf16 on a CPU without native bf16" in (result.folder / "seed=0" / "run.log").read_text()
    monkeypatch.setattr(run_module, "emulated_bf16", lambda device: False)
    run_experiment(tiny(real_data, name="tiny2", evaluate={"precision": "bf16"}), root=tmp_path)
    assert "native bf16" not in capsys.readouterr().err


def test_auto_precision_is_decided_at_run_start_and_the_sweep_and_tables_find_the_run(real_data, tmp_path,
                                                                                      monkeypatch):
    """`precision: auto` stays in the config until the run starts; the run saves and hashes the machine's choice
    (fp32 on an AVX2-only CPU), and a sweep cell or table lookup of the same auto config finds that run."""
    import yaml

    import qbert.pipeline.finetune as finetune
    from qbert.sweep import Cell
    from qbert.tables import seed_records

    monkeypatch.setattr(finetune, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    config = tiny(real_data, finetune__precision="auto", finetune__device="cpu")
    assert config.finetune.precision == "auto"
    result = run_experiment(config, root=tmp_path)
    saved = yaml.safe_load((result.folder / "config.yaml").read_text())
    assert saved["finetune"]["precision"] == "fp32"
    fp32 = tiny(real_data, finetune__precision="fp32", finetune__device="cpu")
    assert result.folder.name == fp32.config_hash() != config.config_hash()
    cell = Cell(config, {}, "test")
    assert cell.hash == fp32.config_hash() and set(seed_records(tmp_path, cell)) == {0}
