"""The command line: help with examples, one-line errors without tracebacks, run / ls / validate."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from qbert.cli.main import app
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("command", ["run", "search", "validate", "ls", "sweep", "table", "export", "plot",
                                     "inspect sites", "inspect outliers", "inspect weights"])
def test_every_help_ends_with_an_example(command):
    result = invoke(*command.split(), "--help")
    assert result.exit_code == 0
    assert "Example: qbert " + command in result.output.strip().splitlines()[-1] or \
        "Example: qbert " + command in result.output


def test_top_level_help_is_light():
    """`qbert --help` must not import torch or transformers (it answers in well under a second)."""
    code = ("import sys; from qbert.cli.main import app; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("finetune: {lrr: 1}\n", [], "finetune.lrr: unknown key (did you mean 'lr'?)"),
        ("finetune: {epochs: many}\n", [], "finetune.epochs: Input should be a valid number"),
        ("task: mnlii\n", [], "task: 'mnlii' is not valid"),
        ("model: bert-base-uncased\n", [], "model: 'bert-base-uncased' is not an alias or a local folder"),
        ("task: [\n", [], "invalid YAML"),
        ("seeds: [1]\nseeds: [2]\n", [], "duplicate key 'seeds'"),
        ("task: mrpc\n", ["finetune.lr"], "is not key.path=value"),
        ("task: mrpc\n", ["finetune.batch_size=-1"], "finetune.batch_size: Input should be greater than 0"),
    ],
)
def test_run_errors_are_one_line(tmp_path, real_data, text, overrides, expected):
    result = invoke("run", write(tmp_path, text), *overrides)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.output


def test_missing_config_file(tmp_path):
    result = invoke("run", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2
    assert "config file not found" in result.output and "Traceback" not in result.output


def test_missing_data_folder(tmp_path):
    result = invoke("run", write(tmp_path, "model: tiny-random\ndata: {dir: /no/such/dir}\n"))
    assert result.exit_code == 2
    assert "data.dir: data folder '/no/such/dir' does not exist" in result.output


def test_validate_reports_each_file(tmp_path):
    good = write(tmp_path, "task: rte\n", "good.yaml")
    bad = write(tmp_path, "task: rte\nfoo: 1\n", "bad.yaml")
    result = invoke("validate", good, bad)
    assert result.exit_code == 2
    assert f"ok {good}" in result.output
    assert f"error: {bad}: foo: unknown key" in result.output


def test_validate_takes_overrides_like_run_and_knows_sweeps_and_tables(tmp_path):
    good = write(tmp_path, "task: rte\nrecipe: {name: peg}\n", "good.yaml")
    result = invoke("validate", good, "recipe.groups=3", "finetune=null")
    assert result.exit_code == 0, result.output
    bad = invoke("validate", good, "recipe.grups=3")
    assert bad.exit_code == 2 and "recipe.grups: unknown key (did you mean 'groups'?)" in bad.output
    configs = ROOT / "configs"
    papers = invoke("validate", str(configs / "default.sweep.yaml"), str(configs / "default.table.yaml"))
    assert papers.exit_code == 0, papers.output
    assert "sweep default, 5 cells" in papers.output and "table spec" in papers.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("qbert ")


def test_validate_preflight_catches_offline_hub_id(tmp_path):
    path = write(tmp_path, "model: bert-base-uncased\n")
    assert invoke("validate", path).exit_code == 0
    result = invoke("validate", "--preflight", path)
    assert result.exit_code == 2 and "hub is offline" in result.output


def _tiny_rte(tmp_path: Path, real_data: Path, name: str) -> str:
    """A config that runs one seed (7) of the tiny model on 32 RTE pairs in seconds."""
    return write(tmp_path, f"""
name: {name}
model: tiny-random
task: rte
seeds: [7]
data: {{dir: {real_data}, max_train_samples: 32, max_eval_samples: 16}}
finetune: {{epochs: 1, batch_size: 16, max_seq_len: 32}}
""")


def test_run_then_ls(tmp_path, real_data, monkeypatch):
    cfg = _tiny_rte(tmp_path, real_data, "cli_smoke")
    runs = tmp_path / "runs"
    first = invoke("run", cfg, "--runs-dir", str(runs), "-q")
    assert first.exit_code == 0, first.output
    assert "seed 7: done" in first.output and "median" in first.output
    second = invoke("run", cfg, "--runs-dir", str(runs), "-q")
    assert "seed 7: skipped" in second.output
    listing = invoke("ls", "--runs-dir", str(runs))
    assert listing.exit_code == 0
    assert "cli_smoke" in listing.output and "1/1" in listing.output and "accuracy" in listing.output


def test_run_piped_to_a_file_prints_progress_lines_and_quiet_prints_none(tmp_path, real_data):
    cfg = write(tmp_path, f"""
name: piped
model: tiny-random
task: mrpc
seeds: [0]
recipe: {{name: w8a8_ptq}}
data: {{dir: {real_data}, max_train_samples: 64, max_eval_samples: 16}}
finetune: {{epochs: 1, batch_size: 16, max_seq_len: 32}}
""")
    qbert = str(Path(sys.executable).with_name("qbert"))
    log = tmp_path / "run.txt"
    with open(log, "w") as out:
        done = subprocess.run([qbert, "run", cfg, "--runs-dir", str(tmp_path / "runs")], stdout=out, stderr=out)
    text = log.read_text()
    assert done.returncode == 0, text
    for stage in ("fine-tune: 0/4 (0%)", "fine-tune: 4/4 (100%)", "calibrate: 16/16 (100%)", "evaluate: 1/1 (100%)"):
        assert stage in text
    assert "\x1b[" not in text  # plain lines, no terminal control codes
    quiet = subprocess.run([qbert, "run", cfg, "--runs-dir", str(tmp_path / "quiet"), "-q"], capture_output=True,
                           text=True)
    assert quiet.returncode == 0 and "fine-tune:" not in quiet.stdout + quiet.stderr


def test_inspect_outliers_and_weights_of_a_run_write_numbers_and_figures(tmp_path, real_data):
    pytest.importorskip("matplotlib", reason="the viz extra (make setup installs it)")
    cfg = _tiny_rte(tmp_path, real_data, "inspected")
    runs = tmp_path / "runs"
    missing = invoke("inspect", "outliers", cfg, "--runs-dir", str(runs))
    assert missing.exit_code == 2 and "no fine-tuned checkpoint of inspected seed 7" in missing.output
    assert "qbert run" in missing.output and "Traceback" not in missing.output
    assert invoke("run", cfg, "--runs-dir", str(runs), "-q").exit_code == 0
    result = invoke("inspect", "outliers", cfg, "--runs-dir", str(runs), "--sequences", "4")
    assert result.exit_code == 0, result.output
    assert "inspected seed 7: 4 dev sequences" in result.output and "attention per layer" in result.output
    folder = runs / "inspect" / "inspected-seed7" / "outliers"
    assert {"outliers.json", "dimension_ranges.csv", "attention.png", "token_ranges.png"} <= {
        p.name for p in folder.iterdir()}
    seed_folder = next(runs.glob("inspected/*/seed=7"))
    result = invoke("inspect", "weights", str(seed_folder), "--out", str(tmp_path / "w"), "--histograms",
                    "layer.1.ffn.*")
    assert result.exit_code == 0, result.output
    assert "outliers per FC layer" in result.output and "K-means settles after" in result.output
    assert (tmp_path / "w" / "histogram_layer_1_ffn_output.png").is_file()
    bad = invoke("inspect", "weights", str(seed_folder), "--histograms", "nothing.*")
    assert bad.exit_code == 2 and "matches no weight site" in bad.output


def test_plot_draws_accuracy_against_size_and_the_leave_out_grid(tmp_path):
    pytest.importorskip("matplotlib", reason="the viz extra (make setup installs it)")
    from tests.inspection.test_results import finished

    runs = tmp_path / "runs"
    empty = invoke("plot", "--task", "mrpc", "--model", "tiny-random", "--runs-dir", str(runs))
    assert empty.exit_code == 2 and "no finished mrpc run of tiny-random" in empty.output
    finished(runs, {"name": "fp32"}, "p_fp32", {1: 80.0})
    finished(runs, {"name": "w32a8_ptq", "leave_out": []}, "p_lo", {1: 60.0})
    finished(runs, {"name": "w32a8_ptq", "leave_out": ["ffn.residual_sum"]}, "p_lo", {1: 70.0},
             {"size": {"mb": 8.0}})
    result = invoke("plot", "--task", "mrpc", "--model", "tiny-random", "--runs-dir", str(runs))
    assert result.exit_code == 0, result.output
    assert "p_fp32" in result.output and "sensitivity.png" in result.output
    folder = runs / "plots" / "mrpc-tiny-random"
    assert (folder / "accuracy_size.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "sensitivity.csv").read_text().splitlines() == ["family,all", "ffn.residual_sum,10.0"]
    bad = invoke("plot", "--task", "mrcp")
    assert bad.exit_code == 2 and "unknown task 'mrcp'" in bad.output


def test_ls_empty(tmp_path):
    result = invoke("ls", "--runs-dir", str(tmp_path))
    assert result.exit_code == 0 and "no runs under" in result.output


def test_inspect_sites_help_has_an_example():
    result = invoke("inspect", "sites", "--help")
    assert result.exit_code == 0 and "Example: qbert inspect sites" in result.output


def test_inspect_sites_shows_the_placement():
    """MiniLM-L6 under gemm: per layer 8 of 13 activations (Q, K, V, probabilities, context, FFN input, GELU output,
    layer output), plus the embeddings output and the pooled output."""
    result = invoke("inspect", "sites", str(ROOT / "configs" / "mrpc_w8a8_ptq.yaml"), "recipe.placement=gemm")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "placement gemm" in text and "activation sites: 82 (50 at 8 bits; 32 in floating point)" in text


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.yaml")
                                         if not p.name.endswith((".sweep.yaml", ".table.yaml"))), ids=lambda p: p.name)
def test_inspect_sites_works_for_every_config(path):
    result = invoke("inspect", "sites", str(path), "--summary")
    assert result.exit_code == 0, result.output
    assert "activation sites:" in result.output or "no static quantization sites" in result.output


def test_inspect_sites_lists_the_bert_base_plan():
    result = invoke("inspect", "sites", str(ROOT / "configs" / "mnli_peg.yaml"), "--kind", "activation")
    assert result.exit_code == 0
    assert "activation sites: 160 (160 at 8 bits; 0 in floating point)" in " ".join(result.output.split())
    assert "layer.11.ffn.residual_sum" in result.output and "PEG K=6+P" in result.output


def test_inspect_sites_bad_rule_is_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: tiny-random\ntask: mrpc\nrecipe: {name: w8a8_ptq, sites: {ffn.residul_sum: null}}\n")
    result = invoke("inspect", "sites", str(cfg))
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "recipe.sites.ffn.residul_sum" in line and "matches no site" in line and str(cfg) in line


def test_export_a_finished_run_without_training_it_again(tmp_path, real_data):
    import qbert
    from qbert.pipeline.run import run_experiment
    from qbert.runs import read_json
    from tests.conftest import tiny_config

    cfg = tiny_config(real_data, {"name": "peg", "groups": 4}, name="late_export")
    seed = run_experiment(cfg, root=tmp_path).folder / "seed=0"
    assert read_json(seed / "metrics.json")["exports"] == {}
    result = invoke("export", str(seed), "--format", "hf", "--format", "integer", "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert "hf: export/hf/config.json" in result.output and "integer: export/integer/model.safetensors" in result.output
    record = read_json(seed / "metrics.json")
    assert record["exports"]["integer"]["bit_exact"] and record["exports"]["hf"]["bit_exact"]
    assert record["onnx"]["agreement"]["dev"]["examples"] == 32  # the ONNX file was evaluated too
    loaded = qbert.load(seed)  # the integer export runs again
    assert loaded.arithmetic == "integer" and len(loaded.report["gemms"]["integer"]) == 14
    assert (seed / "export" / "hf" / "quantizers.json").is_file()
    bad = invoke("export", str(seed), "--format", "packed")
    assert bad.exit_code == 2 and "recipe peg cannot write 'packed'" in bad.output
    missing = invoke("export", str(tmp_path), "--format", "hf")
    assert missing.exit_code == 2 and "is not a finished seed folder" in missing.output


def test_a_run_whose_only_seed_is_busy_says_so_in_whole_lines(tmp_path, real_data):
    """A second `qbert run` of a config whose seed another process holds: it says who, prints no empty
    table (an empty table squeezed its title into a column 8 characters wide), and leaves the seed alone."""
    from qbert.config import load_config
    from qbert.runs import seed_lock

    cfg = _tiny_rte(tmp_path, real_data, "busy_case")
    runs = tmp_path / "runs"
    seed = runs / "busy_case" / load_config(cfg).config_hash() / "seed=7"
    with seed_lock(seed) as holder:
        assert holder is None
        result = invoke("run", cfg, "--runs-dir", str(runs), "-q")
    assert result.exit_code == 0, result.output
    assert f"seed 7: busy: another process (pid {os.getpid()}) is running it" in result.output
    assert "no seed of this config has finished yet" in result.output and "median" not in result.output
    assert not seed.exists()


def _commands(typer_app):
    yield from typer_app.registered_commands
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance)


def test_help_paragraphs_are_reflowed_and_examples_quote_brackets_for_zsh():
    import shlex

    for info in _commands(app):
        assert info.help and "\n" not in info.help.replace("\n\n", ""), info.help
        for example in (info.epilog or "").removeprefix("Example: ").split("; "):
            for word in shlex.split(example, posix=False):
                if any(c in word for c in "[]{}"):
                    assert word[0] in "'\"", f"unquoted {word} in {info.epilog}: zsh globs it"


def _wait_for(predicate, timeout: float = 120.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


def _states(runs: Path) -> list[str]:
    """The recorded state of every seed folder under ``runs`` (a status being written is not counted yet)."""
    from qbert.runs import read_json

    records = (read_json(path) for path in runs.glob("*/*/seed=*/status.json"))
    return [record["state"] for record in records if isinstance(record, dict) and "state" in record]


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_sigterm_stops_like_ctrl_c_and_marks_the_seeds_interrupted(tmp_path, real_data, command):
    """A scheduler's time limit sends SIGTERM: the run died with its seed marked "running"; the sweep waited
    for every running cell to finish before it exited."""
    import signal
    import time

    cfg = write(tmp_path, f"""
name: term
model: tiny-random
task: mrpc
seeds: [0]
data: {{dir: {real_data}, max_train_samples: 3000, max_eval_samples: 16}}
finetune: {{epochs: 50, batch_size: 16, max_seq_len: 32}}
""")
    runs = tmp_path / "runs"
    args = [str(Path(sys.executable).with_name("qbert")), command, cfg, "--runs-dir", str(runs)]
    if command == "sweep":
        args += ["--seeds", "0,1", "--workers", "3", "--threads", "1"]  # one worker idle: it just ends
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group: killed whole if it hangs
    expected = 2 if command == "sweep" else 1
    _wait_for(lambda: _states(runs).count("running") == expected)
    time.sleep(1.0)  # well inside the 50 epochs
    if command == "run":  # SIGUSR1 prints where the run is and does not stop it
        process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert process.poll() is None
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # say what was left running and what it printed, not just "timed out"
        ps = subprocess.run(["ps", "-o", "pid,ppid,stat,wchan:24,etime,args", "--sid", str(process.pid)],
                            capture_output=True, text=True).stdout
        os.killpg(process.pid, signal.SIGUSR1)  # qbert's processes print their threads' stacks
        time.sleep(2.0)
        os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate()
        pytest.fail(f"still running 60 s after SIGTERM; seeds {_states(runs)}; processes:\n{ps}\n"
                    f"stderr:\n{err[-12000:]}")
    assert process.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - start < 30  # not the rest of the training
    assert "interrupted: finished seeds are kept" in err and "Traceback" not in err and "Process" not in err
    assert _states(runs) == ["interrupted"] * expected, err
    if command == "run":
        assert "(most recent call first)" in err and "qbert/pipeline/" in err, err
