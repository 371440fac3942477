"""SQuAD: windows, answer positions, n-best search, article split, on fixtures and the real dev file."""

import numpy as np
import pytest

from qbert.config import DataConfig
from qbert.models import load_tokenizer, resolve_model
from qbert.tasks import get_task
from qbert.tasks.squad import Squad


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("minilm-l6"))


def test_fixture_loading(fixture_data):
    task = get_task("squad")
    train = task.load("train", DataConfig(dir=str(fixture_data)))
    assert len(train) == 6
    assert train[1].answers == ("Norse raiders and pirates", "Norse raiders")


def test_real_dev_and_article_split(real_data):
    task = get_task("squad")
    assert len(task.load("dev", DataConfig(dir=str(real_data)))) == 10570
    data = DataConfig(dir=str(real_data), train_from_eval=0.75)
    train, dev = task.load("train", data), task.load("dev", data)
    assert len(train) + len(dev) == 10570
    assert not {e.title for e in train} & {e.title for e in dev}  # articles never shared
    assert len({e.title for e in train}) == 36


def test_train_windows_point_at_the_answer(fixture_data, tokenizer):
    task = Squad(doc_stride=8)
    examples = task.load("train", DataConfig(dir=str(fixture_data)))[:2]
    features = task.encode_train(tokenizer, examples, max_len=32)  # short windows: several per context
    assert len(features) > len(examples)
    found = 0
    for f in features:
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0  # answer cut off: points at [CLS]
            continue
        found += 1
        text = tokenizer.decode(f["input_ids"][s : e + 1])
        assert text in ("france", "norse raiders and pirates")
    assert found >= 2


def test_nbest_search_recovers_answers(fixture_data, tokenizer):
    task = Squad(doc_stride=8, n_best=5, max_answer_len=30)
    examples = task.load("dev", DataConfig(dir=str(fixture_data)))
    features = task.encode_eval(tokenizer, examples, max_len=32)
    outputs = []
    for f in features:
        n = len(f["input_ids"])
        start, end = np.zeros(n), np.zeros(n)
        ex = examples[f["example_index"]]
        a0 = ex.answer_starts[0]
        a1 = a0 + len(ex.answers[-1])
        for t, off in enumerate(f["offsets"]):
            if off is not None and off[0] == a0:
                start[t] = 5.0
            if off is not None and off[1] == a1:
                end[t] = 5.0
        start[0] = end[0] = 9.0  # [CLS] is never a valid answer
        outputs.append((start, end))
    out = task.score(examples, features, outputs)
    assert out.metrics == {"exact_match": 100.0, "f1": 100.0}
    assert out.predictions[1]["prediction"] == "Norse raiders"


def test_max_answer_len_is_enforced(fixture_data, tokenizer):
    task = Squad(doc_stride=32, n_best=20, max_answer_len=2)
    examples = task.load("dev", DataConfig(dir=str(fixture_data)))[1:2]
    features = task.encode_eval(tokenizer, examples, max_len=128)
    f = features[0]
    n = len(f["input_ids"])
    start, end = np.zeros(n), np.zeros(n)
    ctx = [t for t, o in enumerate(f["offsets"]) if o is not None]
    start[ctx[0]], end[ctx[5]] = 10.0, 10.0  # a 6-token span scores best but is too long
    end[ctx[1]] = 1.0
    spans = task.best_spans(examples, features, [(start, end)])
    text = spans[0][0]
    assert text == examples[0].context[f["offsets"][ctx[0]][0] : f["offsets"][ctx[1]][1]]
