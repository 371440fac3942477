"""The bad-input suite: every way a user (or an adversary) can hand qbert a broken config, override, sweep,
table spec, data file, model or run folder ends in one line naming the file, the key and the fix, exit
status 2, no traceback, no hang, and nothing already finished changed.

Each case runs the real command line (typer's runner) against a runs folder that already holds a
finished seed, whose files are compared byte for byte afterwards."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from qbert.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()

TINY = "model: tiny-random\ntask: mrpc\nseeds: [0]\nfinetune: {epochs: 1, batch_size: 8, max_seq_len: 32}\n"
"""A valid config that needs no data to validate."""

BOMB = "".join(
    [f"a0: &a0 [{', '.join(['x'] * 9)}]\n"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)]
)
"""A 'billion laughs' document: 9 levels of 9 aliases, 387 million strings once expanded, ~470 bytes."""


@pytest.fixture
def finished_runs(tmp_path, monkeypatch) -> Path:
    """A runs folder holding one finished seed (as ``qbert run`` writes it); the commands use it."""
    runs = tmp_path / "runs"
    seed = runs / "done_before" / "0123456789ab" / "seed=1"
    seed.mkdir(parents=True)
    (seed / "metrics.json").write_text(json.dumps({
        "version": 2, "metrics": {"accuracy": 70.0}, "name": "done_before", "config_hash": "0123456789ab", "seed": 1,
        "model": "tiny-random", "task": "rte", "recipe": "fp32", "headline": "accuracy", "simulated": False,
        "arithmetic": "float"}))
    (seed / "status.json").write_text(json.dumps({"state": "done"}))
    (seed.parent / "config.yaml").write_text("name: done_before\nmodel: tiny-random\ntask: rte\nseeds: [1]\n")
    monkeypatch.setenv("QBERT_RUNS_DIR", str(runs))
    return runs


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


PROGRESS_LINE = re.compile(r"^[\w ()-]+: \d+/\d+ \(\d+%\)")
"""A progress line (``fine-tune: 0/2 (0%), 0s elapsed``), which a command not in a terminal prints on stderr."""


def one_line_error(runs: Path, args: list[str], expected: str) -> str:
    """Run ``qbert args``; assert exit 2, one ``error:`` line containing ``expected``, no traceback, and the
    runs folder's finished files unchanged. Returns the line."""
    before = _snapshot(runs)
    result = runner.invoke(app, args)
    # stdout may hold what the command set out to do, stderr the progress lines of the work that failed
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert len(lines[0]) < 600, lines[0]
    after = _snapshot(runs)
    assert {k: v for k, v in after.items() if k in before} == before
    return lines[0]


def write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> str:
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


# ---------------------------------------------------------------- YAML files and overrides


@pytest.mark.parametrize("command", ["run", "validate", "sweep", "table"])
def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, finished_runs, command):
    path = write(tmp_path, TINY + BOMB.replace("a0:", "x0:", 0))
    line = one_line_error(finished_runs, [command, path], "expands to more than 100,000 values")
    assert path in line


def test_an_alias_bomb_in_an_override_is_refused(tmp_path, finished_runs):
    value = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
            "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]"
    one_line_error(finished_runs, ["run", write(tmp_path, TINY), f"finetune.lr={value}"], "override finetune.lr")


def test_deep_nesting_is_refused(tmp_path, finished_runs):
    one_line_error(finished_runs, ["validate", write(tmp_path, "name: " + "[" * 500 + "]" * 500 + "\n")],
                   "nest")


def test_a_huge_config_file_is_refused_unread(tmp_path, finished_runs):
    path = write(tmp_path, TINY + "# " + "x" * (2 << 20) + "\n")
    one_line_error(finished_runs, ["run", path], "too large for a config")


@pytest.mark.parametrize("text, expected", [
    (b"task: mrpc\nname: caf\xe9\n", "not a UTF-8 text file"),
    (b"- task: mrpc\n", "the top level must be a mapping"),
    (b"task: mrpc\n\tseeds: [1]\n", "invalid YAML"),
    ("name: " + "a" * 300 + "\n", "at most 100 characters"),
    ("seeds: [-1]\n", "seed -1 is out of range"),
    (f"seeds: [{2**32}]\n", "is out of range"),
    (f"seeds: [{', '.join(str(i) for i in range(1001))}]\n", "more than 1,000"),
    ("seeds: []\n", "seeds: List should have at least 1 item"),
    ("finetune: {epochs: .inf}\n", "finetune.epochs: Input should be a finite number"),
    ("finetune: {lr: .nan}\n", "finetune.lr"),
    ("finetune: {lr: 1e10}\n", "finetune.lr: Input should be less than or equal to 1"),
    ("finetune: {warmup: .nan}\n", "finetune.warmup"),
    ("estimator: {momentum: .inf}\n", "estimator.momentum"),
    ("seeds: [true]\n", "seeds: expected a number, not a boolean"),  # was run as seed 1
    ("finetune: {epochs: true}\n", "finetune.epochs: expected a number, not a boolean"),
    ("recipe: {name: gobo, bits: true}\n", "recipe.bits: expected a number, not a boolean"),
])
def test_bad_config_values(tmp_path, finished_runs, text, expected):
    path = write(tmp_path, text if isinstance(text, bytes) else "model: tiny-random\ntask: mrpc\n" + text)
    line = one_line_error(finished_runs, ["run", path], expected)
    assert path in line


def test_a_long_value_is_cut_in_the_error(tmp_path, finished_runs):
    line = one_line_error(finished_runs, ["run", write(tmp_path, TINY), "name=" + "a" * 5000], "(5,002 chars)")
    assert "a" * 100 not in line


def test_validate_takes_an_argument_longer_than_a_file_name(tmp_path, finished_runs):
    one_line_error(finished_runs, ["validate", "b" * 300 + ".yaml"], "File name too long (the name is longer")
    one_line_error(finished_runs, ["validate", write(tmp_path, TINY), "b" * 300 + "=1"], "unknown key")


# ---------------------------------------------------------------- sweeps


def test_seeds_option_too_many(tmp_path, finished_runs):
    one_line_error(finished_runs, ["sweep", write(tmp_path, TINY), "--seeds", "0..100000000", "--dry-run"],
                   "names 100,000,001 seeds, more than 1,000")


@pytest.mark.parametrize("seeds", ["", ","])
def test_seeds_option_naming_no_seed(tmp_path, finished_runs, seeds):
    """``--seeds ''`` was taken as no option at all: the config's seeds ran."""
    one_line_error(finished_runs, ["sweep", write(tmp_path, TINY), "--seeds", seeds, "--dry-run"],
                   f"--seeds {seeds!r} is not a range A..B or a list A,B,C")


@pytest.mark.parametrize("sweep, expected", [
    ("config: c.yaml\ngrid: {finetune.lr: []}\n", "grid: finetune.lr has no values"),
    ("parts: [{config: s.sweep.yaml}]\n", "s.sweep.yaml is not an experiment config (it is a sweep file)"),
    ("config: '{task}_x.yaml'\nvars: {task: []}\n", "vars: task has no values"),
    ("parts: [{config: c.yaml, grid: {finetune.lr: []}}]\n", "parts.0.grid: finetune.lr has no values"),
    ("config: '{task_x.yaml'\nvars: {task: [a]}\n", "config template '{task_x.yaml' is not valid"),
    ("config: c.yaml\ngrid: {finetune.lr: [" + ", ".join(f"{i + 1}e-6" for i in range(101)) + "],\n"
     "  finetune.batch_size: [" + ", ".join(str(i + 1) for i in range(100)) + "]}\n", "more than 10,000"),
])
def test_bad_sweeps(tmp_path, finished_runs, sweep, expected):
    write(tmp_path, TINY)
    path = write(tmp_path, sweep, "s.sweep.yaml")
    one_line_error(finished_runs, ["sweep", path, "--dry-run"], expected)


# ---------------------------------------------------------------- the file system


def test_a_runs_folder_that_cannot_be_created_is_one_line(tmp_path, finished_runs, real_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = write(tmp_path, TINY + f"data: {{dir: {real_data}, max_train_samples: 16, max_eval_samples: 8}}\n")
    line = one_line_error(finished_runs, ["run", config, "--runs-dir", str(blocker / "runs")], str(blocker))
    assert "Not a directory" in line


# ---------------------------------------------------------------- data files


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
MRPC_ROW = "1\t1\t2\tthe cat sat\ta cat sat\n"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def _glue(tmp_path: Path, task: str, folder: str, train: bytes | str, dev: str) -> str:
    data = tmp_path / "data" / "glue" / folder
    data.mkdir(parents=True)
    (data / "train.tsv").write_bytes(train if isinstance(train, bytes) else train.encode())
    (data / "dev.tsv").write_text(dev)
    return write(tmp_path, TINY.replace("task: mrpc", f"task: {task}") + f"data: {{dir: {tmp_path / 'data'}}}\n")


@pytest.mark.parametrize("train, expected", [
    ("", "the file is empty"),
    (MRPC_HEADER, "no usable rows (0 malformed)"),
    (MRPC_HEADER + "1\tonly two columns\n", "no usable rows (1 malformed)"),
    ((MRPC_HEADER + "1\t1\t2\tcaf\xe9\tcafe\n").encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    (MRPC_HEADER + "2\t1\t2\ta\tb\n", "label '2' is not one of ('0', '1')"),
    ("Quality\t#1 ID\t#2 ID\t#1 String\n" + "1\t1\t2\ta\n", "column '#2 String' not found in header"),
])
def test_bad_glue_files(tmp_path, finished_runs, train, expected):
    config = _glue(tmp_path, "mrpc", "MRPC", train, MRPC_HEADER + MRPC_ROW)
    line = one_line_error(finished_runs, ["run", config], expected)
    assert "train.tsv" in line


@pytest.mark.parametrize("score", ["nan", "inf", "five"])
def test_a_non_finite_regression_label_is_named(tmp_path, finished_runs, score):
    rows = STSB_HEADER + f"0\tg\tf\t2012\t0\ts\ts\ta cat\ta dog\t{score}\n"
    config = _glue(tmp_path, "stsb", "STS-B", rows, STSB_HEADER + "0\tg\tf\t2012\t0\ts\ts\ta\tb\t1.0\n")
    one_line_error(finished_runs, ["run", config], f"row 1: label '{score}' is not a finite number")


def _squad(tmp_path: Path, payload: bytes | str) -> str:
    data = tmp_path / "data" / "squad"
    data.mkdir(parents=True)
    (data / "dev-v1.1.json").write_bytes(payload if isinstance(payload, bytes) else payload.encode())
    return write(tmp_path, TINY.replace("task: mrpc", "task: squad").replace("max_seq_len: 32", "max_seq_len: 64, "
                 "doc_stride: 32") + f"data: {{dir: {tmp_path / 'data'}, train_from_eval: 0.5}}\n")


def _squad_json(answers: list[dict]) -> str:
    context = "The cat sat on the mat."
    return json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "Where did the cat sit?", "answers": answers}]}]}]})


@pytest.mark.parametrize("payload, expected", [
    (_squad_json([{"text": "the mat", "answer_start": 200}]), "question 'q1': answer 'the mat' at answer_start 200"),
    (_squad_json([{"text": "the mat", "answer_start": 3}]), "is not that span of its context"),
    (_squad_json([{"text": "the mat", "answer_start": "15"}]), "at answer_start '15'"),
    (_squad_json([{"text": "", "answer_start": 0}]), "is not that span"),
    (_squad_json([]), "question 'q1' has no answers"),
    (_squad_json([{"answer_start": 15}]), "not a SQuAD v1.1 file (KeyError"),
    ('{"data": []}', "no questions in the file"),
    ("{not json", "not a SQuAD v1.1 file (JSONDecodeError"),
    ('{"data": [{"paragraphs": [{"context": "caf\xe9"}]}]}'.encode("latin-1"), "not UTF-8 text"),
])
def test_bad_squad_files(tmp_path, finished_runs, payload, expected):
    line = one_line_error(finished_runs, ["run", _squad(tmp_path, payload)], expected)
    assert "dev-v1.1.json" in line


# ---------------------------------------------------------------- models


def _model_folder(tmp_path: Path, files: tuple[str, ...]) -> Path:
    """A model folder holding links to some of the packaged MiniLM's files."""
    from qbert.models import packaged_minilm_dir

    folder = tmp_path / "model"
    folder.mkdir()
    for name in files:
        (folder / name).symlink_to(packaged_minilm_dir() / name)
    return folder


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path, finished_runs, real_data):
    folder = _model_folder(tmp_path, ("config.json", "model.safetensors"))
    config = write(tmp_path, TINY.replace("tiny-random", str(folder))
                   + f"data: {{dir: {real_data}, max_train_samples: 16, max_eval_samples: 8}}\n")
    line = one_line_error(finished_runs, ["run", config], "has no tokenizer files (tokenizer.json, vocab.txt)")
    assert "tokenizer.save_pretrained" in line


# ---------------------------------------------------------------- listing and tables


def test_ls_shows_whole_names_when_piped_and_finds_a_model_folder_by_its_name(tmp_path, finished_runs):
    cfg = finished_runs / "done_before" / "0123456789ab" / "config.yaml"
    long_name = "a_rather_long_run_name_that_would_not_fit_in_eighty_columns_" + "x" * 30
    cfg.write_text(f"name: {long_name}\nmodel: /models/bert-base-uncased\ntask: rte\nseeds: [1]\n")
    result = runner.invoke(app, ["ls", "--model", "bert-base-uncased"])
    assert result.exit_code == 0 and long_name in result.output.replace("\n", "").replace("│", "").replace(" ", "")


def test_table_fill_command_keeps_the_runs_dir(tmp_path):
    from pathlib import Path as P

    spec = P(__file__).resolve().parents[1] / "configs" / "papers" / "bondarenko2021" / "reference_qat.yaml"
    result = runner.invoke(app, ["table", str(spec), "--runs-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0
    # a path longer than the 80 columns is folded by the terminal wherever it is: compare without whitespace
    assert f"--runs-dir{tmp_path / 'elsewhere'}" in "".join(result.output.split())


def test_inspect_sites_of_dynamic_int8_says_its_whole_first_paragraph():
    from pathlib import Path as P

    config = P(__file__).resolve().parents[1] / "configs" / "mrpc_dynamic_int8.yaml"
    result = runner.invoke(app, ["inspect", "sites", str(config)])
    assert result.exit_code == 0
    assert "softmax and GELU stay in FP32." in " ".join(result.output.split())


# ---------------------------------------------------------------- more overrides, specs, run folders, models


@pytest.mark.parametrize("override, expected", [
    ("recipe.name=nosuch", "recipe"),
    ("seeds=[1, 1]", "seeds must be distinct"),
    ("finetune.batch_size=abc", "finetune.batch_size"),
    ("calibrate.padding=sometimes", "calibrate.padding"),
    ("export.formats=[nope]", "unknown export format 'nope'"),
    ("finetune.epochs.x=1", "cannot set finetune.epochs.x: finetune.epochs is not a mapping"),
    ("evaluate.clamp_regression=true", "not a regression task"),
])
def test_bad_overrides(tmp_path, finished_runs, override, expected):
    one_line_error(finished_runs, ["run", write(tmp_path, TINY), override], expected)


def _spec(tmp_path: Path, text: str) -> str:
    write(tmp_path, TINY)
    write(tmp_path, "config: c.yaml\n", "s.sweep.yaml")
    return write(tmp_path, text, "t.yaml")


@pytest.mark.parametrize("text, args, expected", [
    ("title: t\nsweep: s.sweep.yaml\nrows: {items: [{label: a}]}\ncolumns: {items: [{label: b}]}\ncolour: red\n",
     [], "colour: unknown key"),
    ("title: t\nsweep: gone.sweep.yaml\nrows: {items: [{label: a}]}\ncolumns: {items: [{label: b}]}\n",
     [], "gone.sweep.yaml"),
    ("title: t\nsweep: s.sweep.yaml\nversus: z\nrows: {items: [{label: a}]}\ncolumns: {items: [{label: b}]}\n",
     [], "no row is labelled 'z'"),
    ("title: t\nsweep: s.sweep.yaml\nrows: {items: [{label: a}]}\ncolumns: {items: [{label: b}]}\n",
     ["--columns", "MNLI"], "no column is labelled 'MNLI'"),
])
def test_bad_table_specs(tmp_path, finished_runs, text, args, expected):
    one_line_error(finished_runs, ["table", _spec(tmp_path, text), *args], expected)


def test_export_of_a_folder_that_is_not_a_finished_seed(tmp_path, finished_runs):
    one_line_error(finished_runs, ["export", str(tmp_path), "--format", "hf"], "is not a finished seed folder")


def test_a_seed_folder_with_a_broken_record_as_model(tmp_path, finished_runs):
    seed = tmp_path / "seed=3"
    seed.mkdir()
    (seed / "metrics.json").write_text('{"metrics": {"f1": 8')
    config = write(tmp_path, TINY.replace("tiny-random", str(seed)).replace("epochs: 1", "epochs: 0"))
    one_line_error(finished_runs, ["run", config], "is not a readable run record")


@pytest.mark.parametrize("weights, expected", [
    (b"\x00" * 64, "cannot load model"),
    (b"", "cannot load model"),
])
def test_unreadable_model_weights_are_one_line(tmp_path, finished_runs, real_data, weights, expected):
    folder = _model_folder(tmp_path, ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    (folder / "model.safetensors").write_bytes(weights)
    config = write(tmp_path, TINY.replace("tiny-random", str(folder))
                   + f"data: {{dir: {real_data}, max_train_samples: 16, max_eval_samples: 8}}\n")
    one_line_error(finished_runs, ["run", config], expected)


def test_a_model_folder_without_config_json(tmp_path, finished_runs):
    folder = _model_folder(tmp_path, ("model.safetensors", "tokenizer.json"))
    one_line_error(finished_runs, ["run", write(tmp_path, TINY.replace("tiny-random", str(folder)))],
                   "has no config.json")


def test_a_diverging_training_is_one_line_naming_the_learning_rate(tmp_path, finished_runs, real_data, monkeypatch):
    import torch

    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    config = write(tmp_path, TINY + f"data: {{dir: {real_data}, max_train_samples: 16, max_eval_samples: 8}}\n")
    line = one_line_error(finished_runs, ["run", config], "finetune.lr: training loss is nan at step 1 of 2")
    assert "lower the learning rate" in line


def test_a_five_megabyte_run_name_is_refused_at_once(tmp_path, finished_runs):
    import time

    start = time.perf_counter()
    one_line_error(finished_runs, ["validate", write(tmp_path, TINY), "name=" + "n" * (5 << 20)],
                   "at most 100 characters")
    assert time.perf_counter() - start < 30


def test_a_full_disk_is_one_line_and_says_finished_seeds_are_kept(tmp_path, finished_runs, real_data, monkeypatch):
    import errno

    import qbert.runs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(kwargs.get("dir", "")))

    monkeypatch.setattr(qbert.runs.tempfile, "mkstemp", full)
    config = write(tmp_path, TINY + f"data: {{dir: {real_data}, max_train_samples: 16, max_eval_samples: 8}}\n")
    line = one_line_error(finished_runs, ["run", config], "No space left on device")
    assert "free space and rerun the same command (finished seeds are kept)" in line


def test_a_full_disk_reported_inside_a_library_error_is_one_line(tmp_path, finished_runs, real_data, monkeypatch):
    """safetensors (Rust) raises its own error type for a full disk, naming the OS error only in its text."""
    from safetensors import SafetensorError

    import qbert.pipeline.run

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(qbert.pipeline.run, "run_seed", full)
    config = write(tmp_path, TINY + f"data: {{dir: {real_data}, max_train_samples: 16, max_eval_samples: 8}}\n")
    line = one_line_error(finished_runs, ["run", config], "No space left on device")
    assert "internal error" not in line and "finished seeds are kept" in line


@pytest.mark.parametrize("command, text, expected", [
    ("run", "name: s\nparts: [{config: a.yaml}]\n", "this is a sweep file, not an experiment config: use `qbert sweep"),
    ("run", "title: t\nsweep: s.sweep.yaml\nrows: {items: [{label: a}]}\n", "this is a table spec, not an experiment"),
    ("table", TINY, "this is an experiment config, not a table spec: use `qbert run"),
    ("table", "name: s\nparts: [{config: a.yaml}]\n", "this is a sweep file, not a table spec: use `qbert sweep"),
    ("sweep", "title: t\nsweep: s.sweep.yaml\nrows: {items: [{label: a}]}\n", "this is a table spec, not a sweep"),
])
def test_a_file_given_to_the_wrong_command_names_the_right_one(tmp_path, finished_runs, command, text, expected):
    one_line_error(finished_runs, [command, write(tmp_path, text)], expected)


def test_a_table_folder_without_specs_says_so(tmp_path, finished_runs):
    """It printed nothing and exited 0."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "only.sweep.yaml").write_text("config: c.yaml\n")
    one_line_error(finished_runs, ["table", str(tmp_path / "specs")], "no table specs")
