"""qbert sweep: grid expansion, identity by hash, resume, failure isolation, the local and Ray executors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qbert.config import load_config
from qbert.errors import QbertError
from qbert.runs import aggregate, read_json, read_status
from qbert.sweep import _expand_part, expand, list_sweeps, load_sweep, parse_grid_option, parse_seeds_option, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(folder: Path, real_data: Path, name: str = "tiny", **extra) -> Path:
    data = {
        "name": name,
        "model": "tiny-random",
        "task": "mrpc",
        "seeds": [0],
        "data": {"dir": str(real_data), "max_train_samples": 32, "max_eval_samples": 16},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 32, "threads": 1},
        "recipe": {"name": "fp32"},
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_sweep(folder: Path, data: dict) -> Path:
    path = folder / "grid.sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------- expansion


def test_grid_is_the_product_of_vars_and_keys_with_overrides_and_seeds(tmp_path):
    for task in ("mrpc", "rte"):
        for method, batch in (("a", 8), ("b", 16)):
            (tmp_path / f"{task}_{method}.yaml").write_text(yaml.safe_dump(
                {"model": "tiny-random", "task": task, "finetune": {"batch_size": batch}, "recipe": {"name": "fp32"}}))
    path = write_sweep(tmp_path, {
        "config": "{task}_{method}.yaml",
        "vars": {"task": ["mrpc", "rte"], "method": ["a", "b"]},
        "grid": {"finetune.lr": [1e-5, 2e-5, 3e-5]},
        "set": {"finetune.epochs": 2},
        "seeds": [1, 2],
    })
    spec, base = load_sweep(path)
    cells = expand(spec, base, overrides=["evaluate.batch_size=8"])
    assert spec.name == "grid"
    assert len(cells) == 2 * 2 * 3
    assert [c.coords for c in cells[:3]] == [
        {"task": "mrpc", "method": "a", "finetune.lr": lr} for lr in (1e-5, 2e-5, 3e-5)]
    first = cells[0].config
    assert (first.task, first.finetune.lr, first.finetune.epochs, first.evaluate.batch_size, first.seeds) == (
        "mrpc", 1e-5, 2, 8, [1, 2])
    assert cells[0].config.name == "mrpc_a-lr-1e-05"
    assert len({c.hash for c in cells}) == 12
    # the command line's --grid replaces a var's values or a key's, and --seeds the seeds
    narrowed = expand(spec, base, grid={"task": ["rte"], "finetune.lr": [5e-5]}, seeds=[7])
    assert [(c.config.task, c.coords["method"], c.config.finetune.lr, c.config.seeds) for c in narrowed] == [
        ("rte", "a", 5e-5, [7]), ("rte", "b", 5e-5, [7])]


def test_a_grid_selects_among_the_values_of_a_var_the_config_path_does_not_use(tmp_path):
    """Table 6's MNLI part names its task in a label var beside a path without {task}: --grid task=... keeps it
    only when the grid names its task (re-targeting it would run the MNLI configs under every task)."""
    for name in ("rte_a", "rte_b", "mnli_minilm_a", "mnli_minilm_b"):
        task = name.split("_")[0]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            {"model": "tiny-random", "task": task, "recipe": {"name": "fp32"}, "finetune": {"epochs": 1}}))
    path = write_sweep(tmp_path, {"parts": [
        {"config": "{task}_{method}.yaml", "vars": {"task": ["rte"], "method": ["a", "b"]}},
        {"config": "mnli_minilm_{method}.yaml", "vars": {"task": ["mnli"], "method": ["a", "b"]}},
    ]})
    spec, base = load_sweep(path)
    assert [c.config.name for c in expand(spec, base)] == ["rte_a", "rte_b", "mnli_minilm_a", "mnli_minilm_b"]
    assert [c.config.name for c in expand(spec, base, grid={"task": ["rte"]})] == ["rte_a", "rte_b"]
    assert [c.config.name for c in expand(spec, base, grid={"task": ["rte"], "method": ["b"]})] == ["rte_b"]
    assert [c.config.name for c in expand(spec, base, grid={"method": ["b"]})] == ["rte_b", "mnli_minilm_b"]


def test_parts_and_plain_configs_and_option_parsing(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": "tiny-random", "recipe": {"name": "fp32"}}))
    path = write_sweep(tmp_path, {"parts": [
        {"config": "base.yaml", "vars": {"row": ["fp32"]}},
        {"config": "base.yaml", "grid": {"recipe": [{"name": "peg", "groups": 2}, {"name": "w8a8_ptq"}]}},
    ]})
    spec, base = load_sweep(path)
    cells = expand(spec, base)
    assert [c.config.recipe.name for c in cells] == ["fp32", "peg", "w8a8_ptq"]
    assert cells[0].coords == {"row": "fp32"} and cells[1].coords == {"recipe": {"name": "peg", "groups": 2}}
    # an experiment config is a sweep of one cell
    spec, base = load_sweep(tmp_path / "base.yaml")
    assert [c.config.name for c in expand(spec, base, grid={"finetune.epochs": [1, 2]})] == [
        "base-epochs-1", "base-epochs-2"]
    assert parse_grid_option("recipe.sites=[a,b],{x: 1},3") == ("recipe.sites", [["a", "b"], {"x": 1}, 3])
    assert parse_seeds_option("1000..1004") == [1000, 1001, 1002, 1003, 1004]
    assert parse_seeds_option("42,43") == [42, 43]
    with pytest.raises(QbertError, match="--seeds"):
        parse_seeds_option("5..1")
    with pytest.raises(QbertError, match="key=v1,v2"):
        parse_grid_option("finetune.lr")


def test_sweep_file_errors_name_the_file_and_key(tmp_path):
    path = write_sweep(tmp_path, {"config": "{task}.yaml", "gird": {}})
    with pytest.raises(QbertError, match="gird: unknown key") as err:
        load_sweep(path)
    assert str(path) in err.value.render()
    path = write_sweep(tmp_path, {"config": "{task}.yaml"})
    spec, base = load_sweep(path)
    with pytest.raises(QbertError, match=r"\{task\}.*has no values"):
        expand(spec, base)
    path = write_sweep(tmp_path, {"config": "missing.yaml"})
    spec, base = load_sweep(path)
    with pytest.raises(QbertError, match="not found"):
        expand(spec, base)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.sweep.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_expands_to_valid_cells(path):
    spec, base = load_sweep(path)
    cells = expand(spec, base, overrides=["model=minilm-l6"])
    assert cells and all(c.config.model == "minilm-l6" for c in cells)
    # as written (not re-targeted), no two cells of a sweep file are the same run
    raw = [c for part in spec.resolved_parts()
           for c in _expand_part(spec, part, base, {}, ["model=minilm-l6"], spec.seeds)]
    assert len(raw) == len(cells), "two cells of one sweep are the same run"


def test_config_hash_does_not_depend_on_key_order(tmp_path):
    a = {"model": "tiny-random", "task": "rte", "finetune": {"lr": 3e-5, "epochs": 2}, "recipe": {"name": "peg",
         "groups": 2, "permute": False}}
    b = {"recipe": {"permute": False, "groups": 2, "name": "peg"}, "finetune": {"epochs": 2, "lr": 3e-5},
         "task": "rte", "model": "tiny-random"}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(a, sort_keys=False))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(b, sort_keys=False))
    ha, hb = load_config(tmp_path / "a.yaml").config_hash(), load_config(tmp_path / "b.yaml").config_hash()
    assert ha == hb
    # names and seeds are not part of the identity; any other key is
    assert load_config(tmp_path / "a.yaml", ["name=other", "seeds=[5]"]).config_hash() == ha
    assert load_config(tmp_path / "a.yaml", ["finetune.lr=4e-5"]).config_hash() != ha


def test_aggregate_on_known_numbers():
    assert aggregate([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert aggregate([5.0]) == {"median": 5.0, "min": 5.0, "max": 5.0, "n": 1}


# ---------------------------------------------------------------- running


def test_failures_are_isolated_and_finished_cells_skipped(real_data, tmp_path):
    config = tiny_config(tmp_path, real_data)
    spec, base = load_sweep(config)
    cells = expand(spec, base, grid={"data.dir": [str(real_data), str(tmp_path / "nowhere")]}, seeds=[0, 1])
    root = tmp_path / "runs"
    result = run_sweep(cells, name="iso", root=root, workers=1)
    states = [("nowhere" in o.name, o.state) for o in result.outcomes]
    assert states == [(False, "done"), (False, "done"), (True, "failed"), (True, "failed")]
    failed = result.outcomes[2]
    assert "does not exist" in failed.error and Path(failed.log).is_file()
    assert "Traceback" in Path(failed.log).read_text()
    summary = read_json(root / cells[0].config.name / cells[0].hash / "summary.json")
    assert summary["metrics"]["f1"]["n"] == 2
    # rerun: finished seeds are skipped, also under another run name with the same resolved config
    renamed = expand(spec, base, overrides=["name=renamed"], grid={"data.dir": [str(real_data)]}, seeds=[0, 1])
    again = run_sweep(renamed, name="iso", root=root)
    assert [o.state for o in again.outcomes] == ["skipped", "skipped"]
    assert [r["name"] for r in list_sweeps(root)] == ["iso"]


def test_progress_counts_outcomes_names_running_seeds_and_estimates_the_time_left(real_data, tmp_path):
    from qbert.runs import seed_dir, seed_lock, write_status
    from qbert.sweep import Job, SweepProgress, TaskOutcome

    spec, base = load_sweep(tiny_config(tmp_path, real_data))
    cell = expand(spec, base, seeds=[0, 1, 2, 3])[0]
    jobs = [Job(cell, seed) for seed in (0, 1, 2, 3)]
    root = tmp_path / "runs"
    progress = SweepProgress(root, jobs, skipped=2, workers=2)
    progress.finish(jobs[0], TaskOutcome("tiny", cell.hash, 0, "done", seconds=100.0))
    progress.finish(jobs[1], TaskOutcome("tiny", cell.hash, 1, "failed", seconds=300.0))
    running = seed_dir(root, *jobs[2].key)
    running.mkdir(parents=True)
    write_status(running, "running")
    (running / "run.log").write_text("2026-12-02 10:00:00,000 INFO qbert: seed 2: start\n"
                                     "2026-12-02 10:00:05,000 INFO qbert: finetune step 50/230 loss 0.5123\n")
    # seed 3 says running, but its process was killed (nobody holds its lock): not running, not counted as spent
    orphaned = seed_dir(root, *jobs[3].key)
    orphaned.mkdir(parents=True)
    write_status(orphaned, "running")
    clock = (running / "status.json").stat().st_mtime + 40
    progress.clock = lambda: clock
    with seed_lock(running) as holder:
        assert holder is None
        line = progress.line()
    # 2 left at a mean of 200 s each, 40 s of them spent, 2 workers: (400 - 40) / 2 = 180 s
    assert line == ("sweep: 4/6 seeds finished (1 ran, 2 skipped, 1 failed); running tiny seed 2 for 40s: "
                    "finetune step 50/230 loss 0.5123; about 3m00s left")
    # a cell with no seed that ran yet is counted at the median of the cells' means, and the line says so
    other = expand(spec, base, grid={"finetune.lr": [3e-4]}, seeds=[0])[0]
    progress.jobs.append(Job(other, 0))
    progress.total += 1
    with seed_lock(running):
        assert progress.line().endswith("about 4m40s left (1 in cells not timed yet, counted at 3m20s each)")
    # the same seed once its process is gone: no longer listed, and its 40 s no longer taken off the time left
    assert progress.line() == ("sweep: 4/7 seeds finished (1 ran, 2 skipped, 1 failed); "
                               "about 5m00s left (1 in cells not timed yet, counted at 3m20s each)")


def test_a_sweep_reports_progress_while_it_runs_and_after_each_seed(real_data, tmp_path):
    spec, base = load_sweep(tiny_config(tmp_path, real_data))
    cells = expand(spec, base, seeds=[0, 1])
    lines: list[str] = []
    run_sweep(cells, name="live", root=tmp_path / "runs", workers=1, on_progress=lines.append, heartbeat_s=0.2)
    assert any(" running tiny seed 0 for " in line for line in lines)  # the heartbeat, while seed 0 ran
    assert lines[-1] == "sweep: 2/2 seeds finished (2 ran, 0 skipped, 0 failed)"
    # the stages' progress goes to the seed's run.log, whose last line the heartbeat shows
    log = (tmp_path / "runs" / cells[0].config.name / cells[0].hash / "seed=0" / "run.log").read_text()
    progress = [line.split(": ", 1)[1] for line in log.splitlines() if " INFO qbert.progress: " in line]
    assert any(line.startswith("evaluate: 0/") for line in progress), log
    assert any(re.match(r"evaluate: (\d+)/\1 \(100%\)", line) for line in progress), log


def test_cli_sweep_ends_with_a_table_and_exit_1_on_failure(real_data, tmp_path):
    config = tiny_config(tmp_path, real_data)
    env = {**os.environ, "QBERT_RUNS_DIR": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "-m", "cli", "sweep", str(config), "--grid",
                          f"data.dir={real_data},{tmp_path / 'nowhere'}", "--seeds", "0"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stderr
    assert "1 ran, 0 skipped (finished before), 1 failed" in " ".join(out.stdout.split())
    assert "Traceback" not in out.stderr


def _wait_for(predicate, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def _workers(pid: int) -> list[int]:
    """The pool's worker processes of a sweep (children running multiprocessing's spawn_main)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def test_a_killed_worker_fails_its_seed_and_the_rerun_resumes(real_data, tmp_path):
    config = tiny_config(tmp_path, real_data, data={"dir": str(real_data), "max_train_samples": 128,
                                                    "max_eval_samples": 32})
    root = tmp_path / "runs"
    env = {**os.environ, "QBERT_RUNS_DIR": str(root)}
    command = [sys.executable, "-m", "cli", "sweep", str(config), "--grid", "finetune.lr=1e-4,2e-4",
               "--seeds", "0..1", "--workers", "2", "--threads", "1"]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        running = lambda: [p for p in root.glob("*/*/seed=*") if read_status(p).state == "running"]  # noqa: E731
        assert _wait_for(lambda: running() and _workers(proc.pid), 240)
        os.kill(_workers(proc.pid)[0], signal.SIGKILL)  # one worker dies mid-run; the sweep goes on
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, output
    assert "worker process died" in output
    finished = {p.parent for p in root.glob("*/*/seed=*/metrics.json")}
    assert len(finished) < 4
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert f"{4 - len(finished)} ran, {len(finished)} skipped" in text
    for folder in root.glob("*/*/seed=*"):
        assert read_status(folder).state == "done"


def test_ray_executor_gives_the_local_numbers(real_data, tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'qbert[ray]')")
    config = tiny_config(tmp_path, real_data, recipe={"name": "w8a8_ptq"},
                         calibrate={"batches": 2, "batch_size": 4})
    spec, base = load_sweep(config)
    cells = expand(spec, base, grid={"calibrate.batches": [1, 2]}, seeds=[0, 1])
    local = run_sweep(cells, name="local", root=tmp_path / "local", workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(cells, name="ray", root=tmp_path / "ray", executor="ray", threads=1)
    finally:
        ray.shutdown()
    assert [o.state for o in remote.outcomes] == ["done"] * 4
    assert [o.metrics for o in remote.outcomes] == [o.metrics for o in local.outcomes]
    for cell in cells:  # the same runs/ layout, summaries included
        folder = tmp_path / "ray" / cell.config.name / cell.hash
        assert read_json(folder / "summary.json")["metrics"]["f1"]["n"] == 2
        assert (folder / "seed=1" / "run.log").is_file()


def test_ray_missing_is_a_one_line_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from qbert.sweep import ray_module

    with pytest.raises(QbertError, match=r"pip install 'qbert\[ray\]'"):
        ray_module()


def test_sweep_workers_die_with_a_killed_sweep(tmp_path):
    """kill -9 of the sweep process takes its worker processes with it (they would otherwise hold
    ~640 MB each for ever)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent(f"""
        import concurrent.futures as futures, multiprocessing, os, time
        from qbert.sweep import _worker_init

        def work(_):
            open(os.path.join({str(tmp_path)!r}, f"worker-{{os.getpid()}}"), "w").close()
            time.sleep(600)

        if __name__ == "__main__":
            pool = futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_worker_init, initargs=(1, os.getpid()))
            [pool.submit(work, i) for i in range(2)]
            time.sleep(600)
    """)
    (tmp_path / "sweep.py").write_text(script)
    sweep = subprocess.Popen([sys.executable, str(tmp_path / "sweep.py")])
    deadline = time.time() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert len(workers) == 2
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for init to reap it is dead too
            return stat.read().split(")")[-1].split()[0] != "Z"

    deadline = time.time() + 10
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)


def test_two_grids_of_one_sweep_file_keep_two_records(real_data, tmp_path):
    from qbert.cli.main import app
    from typer.testing import CliRunner

    sweep = write_sweep(tmp_path, {"config": tiny_config(tmp_path, real_data).name, "seeds": [0]})
    runs = tmp_path / "runs"
    for lr in ("1e-4", "2e-4"):
        result = CliRunner().invoke(app, ["sweep", str(sweep), "--grid", f"finetune.lr={lr}", "--runs-dir", str(runs)])
        assert result.exit_code == 0, result.output
    plain = CliRunner().invoke(app, ["sweep", str(sweep), "--grid", "finetune.lr=1e-4", "--runs-dir", str(runs)])
    assert "0 ran, 1 skipped" in " ".join(plain.output.split())
    records = sorted(p.name for p in (runs / ".sweeps").glob("*.json"))
    assert len(records) == 2 and all(r.startswith("grid-") for r in records)
    assert {row["counts"].get("done") for row in list_sweeps(runs)} == {1}


def _ignore_sigterm_and_sleep(marker: str, seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(marker).touch()
    time.sleep(seconds)


def _sleep(marker: str, seconds: float) -> None:
    Path(marker).touch()
    time.sleep(seconds)


def test_stopping_workers_kills_one_that_ignores_sigterm_after_the_grace(tmp_path, capsys):
    """A worker that does not end on SIGTERM (a seed that never reaches its interrupt) is killed after the grace
    period, with a warning, so a stopped sweep ends instead of waiting for its training."""
    import concurrent.futures as futures
    import multiprocessing

    from qbert.sweep import _stop_workers

    pool = futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(_ignore_sigterm_and_sleep, str(tmp_path / "stubborn"), 120)
    pool.submit(_sleep, str(tmp_path / "plain"), 120)
    processes = list(pool._processes.values())
    while not ((tmp_path / "stubborn").exists() and (tmp_path / "plain").exists()):  # both are in their task
        time.sleep(0.1)
    start = time.monotonic()
    _stop_workers(pool, grace=2.0)
    assert 2.0 <= time.monotonic() - start < 20
    end = time.monotonic() + 30
    while any(p.exitcode is None for p in processes) and time.monotonic() < end:  # the pool's thread reaps them
        time.sleep(0.1)
    assert sorted(p.exitcode for p in processes) == sorted([-signal.SIGKILL, -signal.SIGTERM])
    pool.shutdown(wait=True)
    assert "did not stop within 2 s of SIGTERM: killed" in capsys.readouterr().err
