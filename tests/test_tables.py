"""qbert table: specs rendered against hand-made run folders, numbers checked by hand."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qbert.errors import QbertError
from qbert.sweep import expand, load_sweep
from qbert.tables import build_table, spec_files, to_csv, to_latex, to_markdown

ROOT = Path(__file__).resolve().parents[1]


def _config(folder: Path, name: str, task: str, recipe: str) -> None:
    data = {"model": "tiny-random", "task": task, "seeds": [1, 2, 3], "recipe": {"name": recipe}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))


@pytest.fixture
def paper(tmp_path: Path) -> Path:
    """A two-task, three-row table spec with its sweep and configs."""
    for task in ("mrpc", "rte"):
        for method in ("fp32", "w8a8_ptq"):
            _config(tmp_path, f"{task}_{method}", task, method)
    (tmp_path / "t.sweep.yaml").write_text(yaml.safe_dump({
        "name": "t", "config": "{task}_{method}.yaml",
        "vars": {"task": ["mrpc", "rte"], "method": ["fp32", "w8a8_ptq"]},
    }))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({
        "title": "Test table", "source": "hand-made", "model": "tiny-random", "sweep": "t.sweep.yaml",
        "rows": {"by": "method", "items": [
            {"value": "fp32", "label": "FP32", "paper": {"mrpc": 88.0, "rte": 70.0, "qqp": 89.0}},
            {"value": "w8a8_ptq", "label": "W8A8", "paper": {"mrpc": 87.0, "rte": 65.0}},
            {"value": "other", "label": "Other method", "missing": "no recipe: other"},
        ]},
        "columns": {"by": "task", "items": [
            {"value": "mrpc", "label": "MRPC", "metric": ["f1", "accuracy"]},
            {"value": "rte", "label": "RTE", "metric": "accuracy"},
            {"value": "qqp", "label": "QQP", "metric": ["f1", "accuracy"]},
        ]},
        "glue": True,
    }))
    return tmp_path


def _write_seed(root: Path, name: str, config_hash: str, seed: int, metrics: dict, simulated: bool,
                state: str = "done") -> None:
    folder = root / name / config_hash / f"seed={seed}"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"state": state}))
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "headline": "accuracy",
                                                     "simulated": simulated, "recipe_report": {"size": {"mb": 2.5}}}))


def _cells(paper: Path) -> dict:
    spec, base = load_sweep(paper / "t.sweep.yaml")
    return {(c.coords["task"], c.coords["method"]): c for c in expand(spec, base)}


def test_table_cells_are_medians_of_the_seed_runs_beside_the_paper(paper, tmp_path):
    root = tmp_path / "runs"
    cells = _cells(paper)
    fp32 = cells["mrpc", "fp32"]
    # per seed: mean of f1 and accuracy -> 85, 87, 80; median 85, min 80, max 87
    for seed, (f1, acc) in zip((1, 2, 3), ((86.0, 84.0), (88.0, 86.0), (81.0, 79.0)), strict=True):
        _write_seed(root, "any_name", fp32.hash, seed, {"f1": f1, "accuracy": acc}, simulated=False)
    q = cells["mrpc", "w8a8_ptq"]
    for seed, (f1, acc) in zip((1, 2), ((80.0, 70.0), (84.0, 76.0)), strict=True):  # 75, 80 -> median 77.5
        _write_seed(root, "q", q.hash, seed, {"f1": f1, "accuracy": acc}, simulated=True)
    _write_seed(root, "q", q.hash, 3, {"f1": 0.0, "accuracy": 0.0}, simulated=True, state="running")  # unfinished
    for seed, acc in zip((1, 2, 3), (60.0, 64.0, 62.0), strict=True):
        _write_seed(root, "r", cells["rte", "fp32"].hash, seed, {"accuracy": acc}, simulated=False)
    table = build_table(paper / "t.yaml", root)
    v = table.values
    assert (v[0, 0].median, v[0, 0].low, v[0, 0].high, v[0, 0].n) == (85.0, 80.0, 87.0, 3)
    assert v[0, 0].delta == pytest.approx(-3.0) and not v[0, 0].simulated
    assert (v[1, 0].median, v[1, 0].n, v[1, 0].planned, v[1, 0].simulated) == (77.5, 2, 3, True)
    assert (v[0, 1].median, v[0, 1].paper) == (62.0, 70.0)
    assert v[1, 1].status == "not run" and v[0, 2].status == "not in sweep" and v[2, 0].status == "no recipe"
    # GLUE over the tasks the sweep covers (MRPC, RTE): ours (85 + 62) / 2, the paper's (88 + 70) / 2
    assert table.glue[0].median == pytest.approx(73.5) and table.glue[0].paper == pytest.approx(79.0)
    assert table.glue[1].status == "incomplete"
    md = to_markdown(table)
    assert "| FP32 | 85.00 (80.00-87.00) n=3 | 88.00 | -3.00 |" in md
    assert "77.50 (75.00-80.00) n=2/3†" in md and "not run" in md and "no recipe" in md
    assert "† simulated" in md
    assert "1 cells not run; fill them with: qbert sweep" in md and "t.sweep.yaml model=tiny-random" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    first = rows[0]
    assert (first["row"], first["column"], float(first["median"]), first["n"], first["paper"]) == (
        "FP32", "MRPC", 85.0, "3", "88.0")
    tex = to_latex(table)
    assert r"\begin{tabular}" in tex and "85.00 (80.00-87.00) n=3" in tex and r"$^\dagger$" in tex


def test_model_override_retargets_and_metric_paths(paper, tmp_path):
    root = tmp_path / "runs"
    cells = _cells(paper)
    _write_seed(root, "x", cells["rte", "w8a8_ptq"].hash, 1, {"accuracy": 50.0}, simulated=True)
    # the spec's model is tiny-random; another model is another hash: nothing found
    other = build_table(paper / "t.yaml", root, ["model=minilm-l6"])
    assert other.model == "minilm-l6" and all(v.status != "ok" for v in other.values.values())
    assert "model=minilm-l6" in other.fill_command
    spec = yaml.safe_load((paper / "t.yaml").read_text())
    spec["columns"]["items"].append({"value": "size", "label": "MB", "where": {"task": "rte"},
                                     "metric": "recipe_report.size.mb"})
    (paper / "t.yaml").write_text(yaml.safe_dump(spec))
    table = build_table(paper / "t.yaml", root)
    assert table.values[1, 3].median == 2.5
    assert table.values[1, 1].median == 50.0


def test_a_metric_with_alternatives_takes_the_first_the_record_has():
    from qbert.records import SeedRecord
    from qbert.tables import lookup_metric

    gobo = SeedRecord(exports={"packed": {"compression": 7.69}}, metrics={"accuracy": 71.3})
    uniform = SeedRecord(exports={"integer": {"compression": 3.9}}, metrics={"accuracy": 70.1})
    either = "exports.packed.compression|exports.integer.compression"
    assert lookup_metric(gobo, either) == 7.69 and lookup_metric(uniform, either) == 3.9
    both = SeedRecord(exports={"packed": {"compression": 8.0}, "integer": {"compression": 4.0}}, metrics={})
    assert lookup_metric(both, either) == 8.0
    assert lookup_metric(SeedRecord(metrics={}), either) is None
    assert lookup_metric(uniform, "f1|accuracy") == 70.1


def test_spec_errors_are_one_line(paper):
    spec = yaml.safe_load((paper / "t.yaml").read_text())
    spec["colums"] = spec.pop("columns")
    (paper / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(QbertError, match="unknown key"):
        build_table(paper / "bad.yaml", paper / "runs")


def test_every_paper_spec_renders(tmp_path):
    """Every spec under configs/papers renders (here without runs: cells say not run, with the command)."""
    specs = spec_files(ROOT / "configs" / "papers")
    assert len(specs) >= 11
    specs += sorted((ROOT / "configs").glob("*.table.yaml"))
    for path in specs:
        table = build_table(path, tmp_path / "empty")
        statuses = {v.status for v in table.values.values()}
        assert "ok" not in statuses, path
        assert table.not_run > 0 and table.fill_command.startswith("qbert sweep "), path
        assert Path(table.fill_command.split()[2]).is_file(), path
        assert "not run" in to_markdown(table)


def test_cli_table_writes_markdown_csv_latex(paper, tmp_path):
    env = {**os.environ, "QBERT_RUNS_DIR": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "-m", "cli", "table", str(paper / "t.yaml"), "--md", str(tmp_path / "t.md"),
                          "--csv", str(tmp_path / "t.csv"), "--tex", str(tmp_path / "t.tex")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Test table" in out.stdout
    for suffix in ("md", "csv", "tex"):
        assert (tmp_path / f"t.{suffix}").stat().st_size > 0


def test_versus_row_gives_deltas_within_one_model(paper, tmp_path):
    spec = yaml.safe_load((paper / "t.yaml").read_text())
    spec["versus"] = "FP32"
    (paper / "v.yaml").write_text(yaml.safe_dump(spec))
    root = tmp_path / "runs"
    cells = _cells(paper)
    for seed, acc in zip((1, 2, 3), (70.0, 72.0, 71.0), strict=True):  # median 71
        _write_seed(root, "f", cells["rte", "fp32"].hash, seed, {"accuracy": acc}, simulated=False)
    for seed, acc in zip((1, 2, 3), (60.0, 66.5, 61.0), strict=True):  # median 61
        _write_seed(root, "q", cells["rte", "w8a8_ptq"].hash, seed, {"accuracy": acc}, simulated=True)
    table = build_table(paper / "v.yaml", root)
    rte = next(r for r in csv.DictReader(io.StringIO(to_csv(table))) if (r["row"], r["column"]) == ("W8A8", "RTE"))
    assert float(rte["delta_versus"]) == -10.0 and float(rte["paper_delta_versus"]) == -5.0
    md = to_markdown(table)
    header = next(line for line in md.splitlines() if line.startswith("|  |"))
    assert "RTE Δ vs FP32" in header and "RTE paper Δ vs FP32" in header and "RTE Δ |" not in header
    w8a8 = next(line for line in md.splitlines() if line.startswith("| W8A8"))
    assert "| -10.00 |" in w8a8 and "| -5.00 |" in w8a8  # ours 61 - 71; the paper's 65 - 70
    assert "Δ vs FP32: ours minus our FP32 row" in md
    assert to_latex(table).count("multicolumn{4}") == 3  # ours, Δ, paper, paper Δ per column with paper numbers
    spec["versus"] = "Nope"
    (paper / "v.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(QbertError, match="versus: no row is labelled 'Nope'"):
        build_table(paper / "v.yaml", root)


def test_columns_option_renders_only_those_columns_without_glue(paper, tmp_path):
    root = tmp_path / "runs"
    cells = _cells(paper)
    for seed, acc in zip((1, 2, 3), (70.0, 72.0, 71.0), strict=True):
        _write_seed(root, "f", cells["rte", "fp32"].hash, seed, {"accuracy": acc}, simulated=False)
    table = build_table(paper / "t.yaml", root, columns=["RTE"])
    md = to_markdown(table)
    header = next(line for line in md.splitlines() if line.startswith("|  |"))
    assert "RTE ours" in header and "MRPC" not in header and "GLUE" not in header
    assert "| 71.00 (70.00-72.00) n=3 |" in next(line for line in md.splitlines() if line.startswith("| FP32"))
    with pytest.raises(QbertError, match="columns: no column is labelled 'QNLI'"):
        build_table(paper / "t.yaml", root, columns=["QNLI"])
