"""The Python API and starting from your own fine-tuned model: the same numbers as the pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import qbert
from qbert.config import parse_config
from qbert.errors import QbertError
from qbert.models import check_finetuned, resolve_model
from qbert.pipeline.run import run_experiment
from qbert.runs import read_json
from qbert.tasks import get_task
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def tiny(real_data: Path, recipe: dict, **extra) -> object:
    return tiny_config(real_data, recipe, name=extra.pop("name", f"api_{recipe['name']}"), **extra)


@pytest.fixture(scope="module")
def finetuned(real_data, tmp_path_factory) -> Path:
    """A finished fp32 run of the tiny model: its seed folder (which names the checkpoint)."""
    root = tmp_path_factory.mktemp("runs")
    result = run_experiment(tiny(real_data, {"name": "fp32"}), root=root)
    return result.folder / "seed=0"


def test_own_checkpoint_skips_finetuning_and_equals_the_pipeline(real_data, finetuned, tmp_path):
    record = read_json(finetuned / "metrics.json")
    cached = Path(record["checkpoint"])
    # the same PEG recipe: once from scratch (reusing the cached checkpoint), once from the folder,
    # once from the run's seed folder; identical metrics and predictions
    scratch = run_experiment(tiny(real_data, {"name": "peg", "groups": 4}), root=finetuned.parents[2])
    outcomes = [scratch]
    for model in (str(cached), str(finetuned)):
        cfg = tiny(real_data, {"name": "peg", "groups": 4}, model=model, finetune=None, name="own")
        assert cfg.skips_finetuning and cfg.finetune.max_seq_len == 128
        outcomes.append(run_experiment(cfg.model_copy(update={"finetune": cfg.finetune.model_copy(
            update={"max_seq_len": 64})}), root=tmp_path / model.replace("/", "_")))
    records = [read_json(o.folder / "seed=0" / "metrics.json") for o in outcomes]
    assert records[1]["finetune"] is None and records[1]["checkpoint"] == str(cached.resolve())
    assert "finetune" in records[0]["timings"]
    assert records[0]["metrics"] == records[1]["metrics"] == records[2]["metrics"]
    predictions = [(o.folder / "seed=0" / "predictions.jsonl").read_text() for o in outcomes]
    assert predictions[0] == predictions[1] == predictions[2]
    ranges = [r["recipe_report"]["activation_ranges"] for r in records]
    assert ranges[0] == ranges[1] == ranges[2]


def test_python_api_matches_the_pipeline(real_data, finetuned, tmp_path):
    checkpoint = Path(read_json(finetuned / "metrics.json")["checkpoint"])
    cfg = tiny(real_data, {"name": "w8a8_ptq"}, model=str(checkpoint), finetune={"epochs": 0, "max_seq_len": 64},
               export={"formats": ["integer"]})
    record = read_json(run_experiment(cfg, root=tmp_path).folder / "seed=0" / "metrics.json")

    q = qbert.quantize(str(finetuned), "w8a8_ptq", calibration="mrpc", data_dir=real_data, max_seq_len=64,
                       data={"max_train_samples": 64}, calibrate={"batches": 2, "batch_size": 4}, seed=0)
    assert isinstance(q, qbert.Quantized) and q.simulated and q.arithmetic == "simulated"
    assert len(q.quantizers) == record["recipe_report"]["plan"]["activation"]["quantized"] + \
        record["recipe_report"]["plan"]["weight"]["quantized"]
    assert all(quantizer.state == "fixed" for quantizer in q.quantizers.values())
    assert q.report["activation_ranges"] == record["recipe_report"]["activation_ranges"]
    metrics = qbert.evaluate(q, "mrpc", data_dir=real_data, max_seq_len=64, max_eval_samples=32)
    assert metrics == record["metrics"]
    written = qbert.export(q, "integer", tmp_path / "integer")
    assert written["bit_exact"] and Path(written["path"]).is_file()
    assert (tmp_path / "integer" / "tokenizer.json").is_file()


def test_python_api_on_a_model_object_and_texts_equals_features(real_data, finetuned):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    checkpoint = read_json(finetuned / "metrics.json")["checkpoint"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    task = get_task("mrpc")
    examples = task.load("train", parse_config({"data": {"dir": str(real_data), "max_train_samples": 16}}).data)
    pairs = [(e.text_a, e.text_b) for e in examples]
    features = task.encode_train(tokenizer, examples, 64)
    results = []
    for calibration in (pairs, features):
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
        q = qbert.quantize(model, {"name": "peg", "groups": 4}, calibration=calibration, tokenizer=tokenizer,
                           calibrate={"batches": 4, "batch_size": 4}, max_seq_len=64, seed=3)
        results.append(q.report["activation_ranges"])
    assert results[0] == results[1]
    # a recipe without calibration needs none; a recipe that calibrates says what to pass
    gobo = qbert.quantize(AutoModelForSequenceClassification.from_pretrained(checkpoint), "gobo")
    assert gobo.arithmetic == "decoded" and gobo.codes and not gobo.simulated
    with pytest.raises(QbertError, match="needs calibration data"):
        qbert.quantize(AutoModelForSequenceClassification.from_pretrained(checkpoint), "w8a8_ptq")


def test_qat_goes_through_prepare_and_convert(real_data, finetuned):
    from transformers import AutoModelForSequenceClassification

    checkpoint = read_json(finetuned / "metrics.json")["checkpoint"]
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    with pytest.raises(QbertError, match="qbert.prepare"):
        qbert.quantize(model, "w8a8_qat", calibration="mrpc", data_dir=real_data, max_seq_len=64)
    q = qbert.prepare(model, "w8a8_qat", calibration="mrpc", data_dir=real_data, max_seq_len=64,
                      calibrate={"batches": 2, "batch_size": 4})
    assert all(quantizer.state == "learn" for quantizer in q.quantizers.values())
    trainable = [p for quantizer in q.quantizers.values() for p in quantizer.parameters() if p.requires_grad]
    assert trainable
    done = qbert.convert(q)
    assert all(quantizer.state == "fixed" for quantizer in done.quantizers.values())
    assert set(done.report["ranges"]["head.output"]) == {"initial", "learned"}


def _folder(tmp_path: Path, config: dict, tokenizer: bool = True) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **config}))
    if tokenizer:
        (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return folder


@pytest.mark.parametrize(("task", "config", "message"), [
    ("stsb", {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"}},
     r"2 output\(s\) but stsb needs a regression head"),
    ("mrpc", {"architectures": ["BertForQuestionAnswering"]}, "does not fit task mrpc"),
    ("squad", {"architectures": ["BertForSequenceClassification"]}, "does not fit task squad"),
    ("mrpc", {"architectures": ["BertModel"]}, "not a sequence classification head"),
    ("mnli", {"architectures": ["BertForSequenceClassification"],
              "id2label": {"0": "contradiction", "1": "entailment", "2": "neutral"}},
     "reorder the classifier rows"),
    ("rte", {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "positive", "1": "negative"}},
     "not rte's"),
])
def test_a_head_that_does_not_fit_the_task_is_refused(tmp_path, task, config, message):
    source = resolve_model(str(_folder(tmp_path, config)))
    with pytest.raises(QbertError, match=message) as info:
        check_finetuned(source, get_task(task))
    assert info.value.key == "model"


def test_fitting_heads_and_missing_tokenizers(tmp_path):
    generic = {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "LABEL_0", "1": "LABEL_1",
                                                                                  "2": "LABEL_2"}}
    check_finetuned(resolve_model(str(_folder(tmp_path, generic))), get_task("mnli"))
    with pytest.raises(QbertError, match="no tokenizer files"):
        check_finetuned(resolve_model(str(_folder(tmp_path / "b", generic, tokenizer=False))), get_task("mnli"))
    with pytest.raises(QbertError, match="not a fine-tuned folder"):
        check_finetuned(resolve_model("minilm-l6"), get_task("mrpc"))


def test_a_run_folder_without_a_checkpoint_is_refused(tmp_path):
    seed = tmp_path / "runs" / "x" / "abc" / "seed=0"
    seed.mkdir(parents=True)
    (seed / "metrics.json").write_text(json.dumps({"metrics": {"f1": 80.0}, "checkpoint": None}))
    with pytest.raises(QbertError, match="recorded no fine-tuned checkpoint"):
        resolve_model(str(seed))
    (seed / "metrics.json").write_text("{trunc")
    with pytest.raises(QbertError, match="not a readable run record"):
        resolve_model(str(seed))


def test_qat_from_an_own_model_needs_its_epochs():
    with pytest.raises(QbertError, match="recipe.epochs"):
        parse_config({"task": "mrpc", "finetune": None, "recipe": {"name": "q8bert"}})
    parse_config({"task": "mrpc", "finetune": None, "recipe": {"name": "w8a8_qat"}})  # Table 10 has MRPC's


BLOCK_TORCH = """
import importlib.abc, sys
class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "datasets", "onnx", "onnxruntime"):
            raise ImportError(f"{name} is not installed (made unimportable by the test)")
sys.meta_path.insert(0, Unimportable())
"""
"""Prepended to a subprocess's code: torch, transformers, datasets and onnx(runtime) cannot be imported."""


def test_validating_every_config_needs_no_torch():
    """`qbert validate` on every YAML under configs/ (experiment configs, sweeps, table specs) with torch and
    transformers unimportable, as on a machine without them: every file is checked, none skipped."""
    import subprocess

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
    code = BLOCK_TORCH + ("import sys; from qbert.cli.main import app; import qbert; qbert.__version__; "
                          "app(['validate', *sys.argv[1:]])")
    done = subprocess.run([sys.executable, "-c", code, *files], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    checked = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert len(checked) == len(files) > 100
    assert any("sweep" in line for line in checked) and any("table spec" in line for line in checked)
    assert torch.__version__  # the tests themselves do use torch


def test_the_readme_python_example_runs(real_data, tmp_path, monkeypatch):
    """The README's Python block, on the tiny model (the MRPC config swapped for a small one)."""
    import re

    import yaml

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"### From Python\n.*?```python\n(.*?)```", readme, re.S).group(1)
    small = tmp_path / "mrpc_small.yaml"
    small.write_text(yaml.safe_dump({
        "model": "tiny-random", "task": "mrpc", "seeds": [42],
        "data": {"dir": str(real_data), "max_train_samples": 64, "max_eval_samples": 32},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 64},
    }))
    assert 'qbert.run("configs/mrpc_fp32.yaml"' in block
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QBERT_DATA_DIR", str(real_data))
    code = block.replace("configs/mrpc_fp32.yaml", str(small)).replace('"groups": 6', '"groups": 4')  # hidden 64
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "out" / "mrpc_peg" / "model.safetensors").is_file()
