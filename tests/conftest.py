"""Shared fixtures: the real data folder and small task files in the official formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QBERT_DATA_DIR") or ROOT.parent / "shared" / "data")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core) each worker takes its share of the cores:
    two workers of two torch threads each on two cores wait on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real GLUE/SQuAD folder beside the project (../shared/data or $QBERT_DATA_DIR)."""
    if not (SHARED_DATA / "glue").is_dir():
        pytest.skip(f"real task data not found at {SHARED_DATA} (set QBERT_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Each test has its own runs folder and checkpoint cache, offline."""
    monkeypatch.setenv("QBERT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("QBERT_CACHE_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    """Tests run the eager fake-quantize kernels (compiling the fused ones costs each process 15-40 s); the tests
    of the fused kernels (tests/quant/test_fused.py) and of every recipe's outputs on the fast paths
    (tests/pipeline/test_simulation_unchanged.py) switch them on."""
    from qbert.quant import fused

    monkeypatch.setenv("QBERT_COMPILE", "0")  # CLI subprocesses too
    before = fused.enabled()
    fused.set_enabled(False)
    yield
    fused.set_enabled(before)


def tiny_config(real_data: Path, recipe: dict, name: str | None = None, **extra):
    """The tiny end-to-end experiment: tiny-random on 64 real MRPC training and 32 dev examples, 1 epoch."""
    from qbert.config import parse_config

    return parse_config({
        "name": name or f"tiny_{recipe['name']}", "model": "tiny-random", "task": "mrpc", "seeds": [0],
        "data": {"dir": str(real_data), "max_train_samples": 64, "max_eval_samples": 32},
        "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 16, "max_seq_len": 64},
        "recipe": recipe, "calibrate": {"batches": 2, "batch_size": 4}, **extra,
    })


PAIRS = [("the cat sat on the mat", "a dog ran in the park"), ("one two three", "four five six seven")] * 8
"""Calibration text pairs for the tiny model."""


def tiny_model():
    """The 2-layer tiny-random classifier (seed 0, eval mode) and its tokenizer."""
    import torch

    from qbert.models import load_model, load_tokenizer, resolve_model

    source = resolve_model("tiny-random")
    torch.manual_seed(0)
    return load_model(source, "classification", 2).eval(), load_tokenizer(source)


def frozen_quantizer(spec, data, ranges=None, channels: int = 12):
    """A quantizer of ``spec`` over the last dimension: its permutation (when ``spec.permute``) from
    ``data``, its range from ``ranges`` (default ``data``), frozen."""
    from qbert.quant.estimators import CurrentMinMax
    from qbert.quant.quantizer import Quantizer

    q = Quantizer(spec, CurrentMinMax(), channels=channels)
    if spec.permute:
        q.track_dimensions = True
        q.observe(data)
        q.set_permutation(q.range_permutation())
        q.restart_estimation()
    q.observe(data if ranges is None else ranges)
    q.freeze()
    return q


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


MNLI_DEV_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2", "label3",
                   "label4", "label5", "gold_label"]
MNLI_TRAIN_HEADER = MNLI_DEV_HEADER[:11] + ["gold_label"]


def mnli_row(i: int, premise: str, hypothesis: str, label: str, dev: bool) -> list[str]:
    parse = "( x )"
    labels = [label] * (5 if dev else 1)
    return [str(i), str(1000 + i), f"{1000 + i}e", "fiction", parse, parse, parse, parse, premise, hypothesis,
            *labels, label]


SQUAD_CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
                 "a region in France. They were descended from Norse raiders and pirates from Denmark, "
                 "Iceland and Norway.")


def squad_payload(n_articles: int = 3) -> dict:
    data = []
    for a in range(n_articles):
        data.append({"title": f"Article_{a}", "paragraphs": [{
            "context": SQUAD_CONTEXT,
            "qas": [
                {"id": f"q{a}-0", "question": "In what country is Normandy located?",
                 "answers": [{"answer_start": SQUAD_CONTEXT.index("France"), "text": "France"}]},
                {"id": f"q{a}-1", "question": "Who were the Normans descended from?",
                 "answers": [{"answer_start": SQUAD_CONTEXT.index("Norse"), "text": "Norse raiders and pirates"},
                             {"answer_start": SQUAD_CONTEXT.index("Norse"), "text": "Norse raiders"}]},
            ],
        }]})
    return {"version": "1.1", "data": data}


@pytest.fixture
def fixture_data(tmp_path) -> Path:
    """A data folder in the GLUE layout holding the splits missing on this machine."""
    root = tmp_path / "data"
    glue = root / "glue"
    pairs = [("A man is playing a guitar.", "A man plays music.", "entailment"),
             ("The cat sleeps on the mat.", "The dog runs.", "neutral"),
             ("Nobody is in the room.", "A crowd fills the room.", "contradiction")]
    write_tsv(glue / "MNLI" / "train.tsv", MNLI_TRAIN_HEADER,
              [mnli_row(i, *pairs[i % 3], dev=False) for i in range(12)])
    for split in ("dev_matched", "dev_mismatched"):
        write_tsv(glue / "MNLI" / f"{split}.tsv", MNLI_DEV_HEADER,
                  [mnli_row(i, *pairs[(i + 1) % 3], dev=True) for i in range(6)])
    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    qqp_rows = [[str(i), str(2 * i), str(2 * i + 1), f"How do I learn {w}?", f"What is the best way to learn {w}?",
                 str(i % 2)] for i, w in enumerate(["python", "chess", "piano", "french", "math", "go"])]
    write_tsv(glue / "QQP" / "train.tsv", qqp_header, qqp_rows + [["99", "x", "a truncated row"]])
    write_tsv(glue / "QQP" / "dev.tsv", qqp_header, qqp_rows[:4])
    write_tsv(glue / "QNLI" / "train.tsv", ["index", "question", "sentence", "label"],
              [[str(i), "Where is Normandy?", "Normandy is in France.", ["entailment", "not_entailment"][i % 2]]
               for i in range(8)])
    (root / "squad").mkdir(parents=True)
    (root / "squad" / "train-v1.1.json").write_text(json.dumps(squad_payload(3)), encoding="utf-8")
    (root / "squad" / "dev-v1.1.json").write_text(json.dumps(squad_payload(2)), encoding="utf-8")
    return root
