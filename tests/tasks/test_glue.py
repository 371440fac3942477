"""GLUE loaders on the real files (row counts of the official splits) and on written fixtures."""

import numpy as np
import pytest

from qbert.config import DataConfig
from qbert.errors import QbertError
from qbert.tasks import get_task

REAL_COUNTS = {
    "cola": {"train": 8551, "dev": 1043},
    "sst2": {"train": 67349, "dev": 872},
    "mrpc": {"train": 3668, "dev": 408},
    "stsb": {"train": 5749, "dev": 1500},
    "rte": {"train": 2490, "dev": 277},
    "wnli": {"train": 635, "dev": 71},
    "qnli": {"dev": 5463},
    "mnli": {"train": 76293, "matched": 9815},  # a real subset of train; dev_matched complete
}


@pytest.mark.parametrize("task_name", sorted(REAL_COUNTS))
def test_real_glue_counts(real_data, task_name):
    task = get_task(task_name)
    for split, count in REAL_COUNTS[task_name].items():
        examples = task.load(split, DataConfig(dir=str(real_data)))
        assert len(examples) == count
        assert all(e.text_a for e in examples)


def test_real_formats(real_data):
    data = DataConfig(dir=str(real_data))
    cola = get_task("cola").load("dev", data)
    assert cola[0].text_a == "The sailors rode the breeze clear of the rocks." and cola[0].label == 1
    mrpc = get_task("mrpc").load("dev", data)
    # byte-order mark stripped, literal quote kept (quoting off)
    assert mrpc[0].text_b.startswith('" The foodservice pie business')
    assert mrpc[0].label == 1
    stsb = get_task("stsb").load("dev", data)
    assert stsb[0].label == 5.0 and isinstance(stsb[0].label, float)
    rte = get_task("rte").load("dev", data)
    assert {e.label for e in rte} == {0, 1}
    assert rte[0].label == 1  # not_entailment is class 1, as on the hub


def test_missing_train_split_says_how_to_fix(real_data):
    with pytest.raises(QbertError, match="train_from_eval"):
        get_task("qnli").load("train", DataConfig(dir=str(real_data)))


def test_train_from_eval_splits_rows_without_overlap(real_data):
    data = DataConfig(dir=str(real_data), train_from_eval=0.8)
    task = get_task("qnli")
    train, dev = task.load("train", data), task.load("dev", data)
    assert len(train) + len(dev) == 5463
    assert len(train) == round(5463 * 0.8)
    assert not {e.guid for e in train} & {e.guid for e in dev}


def test_sample_limits(real_data):
    data = DataConfig(dir=str(real_data), max_train_samples=10, max_eval_samples=5)
    task = get_task("sst2")
    assert len(task.load("train", data)) == 10 and len(task.load("dev", data)) == 5


def test_mnli_fixture(fixture_data):
    task = get_task("mnli")
    data = DataConfig(dir=str(fixture_data))
    assert task.eval_splits == ("matched", "mismatched")
    train = task.load("train", data)
    assert len(train) == 12
    assert [e.label for e in train[:3]] == [0, 1, 2]  # entailment, neutral, contradiction
    assert train[0].text_a == "A man is playing a guitar."
    assert len(task.load("matched", data)) == 6 and len(task.load("mismatched", data)) == 6


def test_qqp_fixture_skips_and_counts_malformed_rows(fixture_data, caplog):
    task = get_task("qqp")
    train = task.load("train", DataConfig(dir=str(fixture_data)))
    assert len(train) == 6
    assert "skipped 1 malformed row" in caplog.text
    assert train[1].text_b == "What is the best way to learn chess?" and train[1].label == 1


def test_qnli_train_fixture(fixture_data):
    train = get_task("qnli").load("train", DataConfig(dir=str(fixture_data)))
    assert [e.label for e in train[:2]] == [0, 1]


def test_bad_label_is_a_one_line_error(tmp_path):
    from tests.conftest import write_tsv

    write_tsv(tmp_path / "glue" / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"],
              [["0", "a", "b", "maybe"]])
    with pytest.raises(QbertError, match="label 'maybe'"):
        get_task("rte").load("train", DataConfig(dir=str(tmp_path)))


def test_scoring_classification_and_regression():
    from qbert.tasks.glue import GlueExample

    task = get_task("mrpc")
    examples = [GlueExample(str(i), "a", "b", label) for i, label in enumerate([1, 0, 1, 1])]
    logits = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    out = task.score(examples, [], logits)
    assert out.metrics["accuracy"] == 75.0
    assert out.metrics["f1"] == pytest.approx(80.0)  # TP 2, FN 1, FP 0
    assert out.predictions[2] == {"guid": "2", "label": "1", "prediction": "0"}
    stsb = get_task("stsb")
    reg = [GlueExample(str(i), "a", "b", float(v)) for i, v in enumerate([1, 2, 3])]
    out = stsb.score(reg, [], np.array([[1.0], [2.0], [4.0]]))
    assert out.metrics["spearman"] == pytest.approx(100.0)


def test_a_missing_later_split_is_skipped_and_said(real_data, fixture_data):
    task = get_task("mnli")
    missing = task.missing_splits(DataConfig(dir=str(real_data)))  # these machines have no dev_mismatched
    assert list(missing) == ["mismatched"] and "dev_mismatched.tsv not found" in missing["mismatched"]
    assert task.present_splits(DataConfig(dir=str(real_data))) == ("matched",)
    assert task.missing_splits(DataConfig(dir=str(fixture_data))) == {}  # the fixture has both
    with pytest.raises(QbertError, match="mismatched split not found"):  # never read as empty
        task.load("mismatched", DataConfig(dir=str(real_data)))
