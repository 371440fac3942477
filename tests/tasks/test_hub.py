"""The hub path (used when no local folder is set and QBERT_ONLINE=1), with datasets.load_dataset faked.

The hub cannot be reached from the test machines, so this checks how qbert maps the hub's columns
and splits, and that offline use without local data fails at once with the fix.
"""

import datasets
import pytest

from qbert.config import DataConfig
from qbert.errors import QbertError
from qbert.tasks import get_task


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path == "rajpurkar/squad":
            return [{"id": "q1", "title": "T1", "context": "Paris is in France.", "question": "Where is Paris?",
                     "answers": {"text": ["France"], "answer_start": [12]}},
                    {"id": "q2", "title": "T2", "context": "Rome is in Italy.", "question": "Where is Rome?",
                     "answers": {"text": ["Italy"], "answer_start": [11]}}]
        if name == "mnli":
            return [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 5}]
        if name == "stsb":
            return [{"sentence1": "a", "sentence2": "b", "label": 3.5, "idx": 0}]
        return [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}]

    monkeypatch.delenv("QBERT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_glue_hub_columns_and_splits(fake_hub):
    mnli = get_task("mnli").load("mismatched", DataConfig())
    assert fake_hub[-1] == ("nyu-mll/glue", "mnli", "validation_mismatched")
    assert (mnli[0].text_a, mnli[0].text_b, mnli[0].label, mnli[0].guid) == ("p", "h", 2, "5")
    rte = get_task("rte").load("train", DataConfig())
    assert fake_hub[-1] == ("nyu-mll/glue", "rte", "train") and rte[0].label == 1
    stsb = get_task("stsb").load("dev", DataConfig())
    assert fake_hub[-1] == ("nyu-mll/glue", "stsb", "validation") and stsb[0].label == 3.5


def test_squad_hub_groups_articles_by_title(fake_hub):
    task = get_task("squad")
    train = task.load("train", DataConfig(train_from_eval=0.5))
    dev = task.load("dev", DataConfig(train_from_eval=0.5))
    assert fake_hub[-1] == ("rajpurkar/squad", None, "validation")
    assert [e.id for e in train] == ["q1"] and [e.id for e in dev] == ["q2"]


def test_offline_without_local_data_fails_with_the_fix(monkeypatch):
    monkeypatch.delenv("QBERT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QbertError) as info:
        get_task("mrpc").load("train", DataConfig())
    assert "set data.dir (or QBERT_DATA_DIR)" in info.value.render() and "QBERT_ONLINE=1" in info.value.render()
