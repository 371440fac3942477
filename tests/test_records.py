"""Run records: one typed reader; every command survives a record it cannot parse and says which file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qbert.config import parse_config
from qbert.pipeline.run import run_experiment
from qbert.records import RECORD_VERSION, SeedRecord, read_record, read_status
from qbert.runs import finished_seeds, list_runs


def tiny(real_data: Path, name: str, seeds: list[int]) -> object:
    return parse_config({
        "name": name, "model": "tiny-random", "task": "mrpc", "seeds": seeds,
        "data": {"dir": str(real_data), "max_train_samples": 32, "max_eval_samples": 16},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 32},
        "evaluate": {"save_predictions": False},
    })


@pytest.fixture(scope="module")
def finished(real_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    run_experiment(tiny(real_data, "first", [0, 1]), root=root)
    return root


def test_records_are_versioned_and_typed(finished):
    folder = next(finished.glob("first/*/seed=0"))
    record = read_record(folder)
    assert isinstance(record, SeedRecord)
    assert record.version == RECORD_VERSION and record.arithmetic == "float" and record.seed == 0


def test_run_and_sweep_agree_a_hash_finished_under_another_name_is_skipped(real_data, finished, capsys):
    result = run_experiment(tiny(real_data, "renamed", [0, 1, 2]), root=finished)
    states = {o.seed: o.state for o in result.seeds}
    assert states == {0: "skipped", 1: "skipped", 2: "done"}
    assert result.seeds[0].folder.parts[-3] == "first"
    assert result.summary["metrics"]["f1"]["n"] == 3  # the seeds found under "first" count
    assert result.summary["name"] == "renamed"  # the summary is this folder's, whoever finished the seeds
    row = next(r for r in list_runs(finished) if r["path"].parent.name == "renamed")
    assert row["states"] == {"0": "done", "1": "done", "2": "done"}  # ls agrees with the summary (3/3)


@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "not an object"])
def test_a_broken_metrics_json_is_reported_and_skipped_not_counted(real_data, tmp_path, capsys, damage):
    root = tmp_path / "runs"
    config = tiny(real_data, "broken", [0, 1])
    run_experiment(config, root=root)
    path = next(root.glob("broken/*/seed=1/metrics.json"))
    text = {"truncated": path.read_text()[:40], "wrong shape": json.dumps({"metrics": "high"}),
            "not an object": "[1, 2]"}[damage]
    path.write_text(text)
    assert set(finished_seeds(root, config.config_hash())) == {0}
    err = capsys.readouterr().err
    assert f"warning: skipping {path}" in err and "--force" in err
    # ls survives and shows the seed as damaged (not finished); a rerun redoes only that seed
    rows = list_runs(root)
    assert rows and rows[0]["states"]["1"] == "damaged"
    again = run_experiment(config, root=root)
    assert {o.seed: o.state for o in again.seeds} == {0: "skipped", 1: "done"}
    assert read_record(path.parent).metrics and again.summary["metrics"]["f1"]["n"] == 2


def test_broken_status_summary_and_config_files_do_not_crash_ls(real_data, tmp_path, capsys):
    root = tmp_path / "runs"
    run_experiment(tiny(real_data, "ls_case", [0]), root=root)
    folder = next(root.glob("ls_case/*"))
    (folder / "summary.json").write_text("{")
    (folder / "seed=0" / "status.json").write_text("nope")
    other = root / "other" / "abc"
    other.mkdir(parents=True)
    (other / "config.yaml").write_text("a: [unclosed")
    rows = list_runs(root)
    assert len(rows) == 1 and rows[0]["summary"] is None and rows[0]["states"] == {"0": "unreadable"}
    assert read_status(folder / "seed=0").state == "unreadable"
    err = capsys.readouterr().err
    assert "summary.json" in err and "status.json" in err and "config.yaml" in err


def test_table_and_ls_commands_survive_a_broken_record(real_data, tmp_path):
    from qbert.cli.main import app
    from typer.testing import CliRunner

    root = tmp_path / "runs"
    run_experiment(tiny(real_data, "cli_case", [0, 1]), root=root)
    next(root.glob("cli_case/*/seed=0/metrics.json")).write_text("{")
    next(root.glob("cli_case/*/summary.json")).write_text("[]")
    runner = CliRunner()
    listed = runner.invoke(app, ["ls", "--runs-dir", str(root)])
    assert listed.exit_code == 0, listed.output
    assert "skipping" in listed.output and "cli_case" in listed.output


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_results_are_written_with_the_users_umask(tmp_path, umask, mode):
    import os
    import stat

    from qbert.runs import atomic_write_json

    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("x")  # what open() makes under the same umask
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def test_exports_and_checkpoints_get_the_users_umask_not_safetensors_0600(real_data, tmp_path):
    """safetensors writes 0600 whatever the umask: the fine-tuned checkpoint, the packed, integer and hf
    exports were unreadable to the user's group under umask 022."""
    import os
    import stat

    root = tmp_path / "runs"
    runs = [{"recipe": {"name": "gobo", "bits": 3}, "export": {"formats": ["packed"]}},
            {"recipe": {"name": "w8a8_ptq"}, "export": {"formats": ["integer", "hf"]}}]
    previous = os.umask(0o022)
    try:
        for i, extra in enumerate(runs):
            run_experiment(parse_config({**tiny(real_data, f"umask{i}", [0]).resolved(), **extra}), root=root)
    finally:
        os.umask(previous)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" and "finetuned" in str(p) for p in files)
    assert {p.parent.name for p in files if p.name == "model.safetensors"} >= {"packed", "integer", "hf"}
    assert {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
            if stat.S_IMODE(p.stat().st_mode) != 0o644} == {}


def test_every_reader_of_a_seed_or_config_record_goes_through_records_py():
    """No module but qbert/records.py reads metrics.json, status.json or summary.json itself (writers may name
    them): the readers get the typed records."""
    import ast

    root = Path(__file__).resolve().parents[1]
    names = ("metrics.json", "status.json", "summary.json")
    readers = ("read_json", "loads", "load", "read_text", "open")
    found = []
    for path in [*(root / "qbert").rglob("*.py"), *(root / "cli").rglob("*.py"), *(root / "recipes").rglob("*.py")]:
        if path.name == "records.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func in readers and any(name in ast.unparse(node) for name in names):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []
