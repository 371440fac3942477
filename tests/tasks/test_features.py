"""The tokenized-features cache: same features as tokenizing, read back instead of recomputed, a new file for
any change of content, and a damaged file tokenized again."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from qbert.models import load_tokenizer, resolve_model
from qbert.tasks import get_task
from qbert.tasks.features import encode_cached, features_root
from qbert.tasks.squad import SquadExample


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny-random"))


@pytest.fixture()
def mrpc(real_data):
    from qbert.config import DataConfig

    task = get_task("mrpc")
    return task, task.load("train", DataConfig(dir=str(real_data)))[:200]


class Counting:
    """An encoder that counts its calls (so the test sees whether the cache answered)."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, 0
        self.__self__, self.__func__ = encoder.__self__, encoder.__func__

    def __call__(self, *args):
        self.calls += 1
        return self.encoder(*args)


def test_a_second_call_reads_the_file_and_gets_the_same_features(mrpc, tokenizer, tmp_path):
    task, examples = mrpc
    expected = task.encode_train(tokenizer, examples, 64)  # the direct computation
    encoder = Counting(task.encode_train)
    first = encode_cached(encoder, tokenizer, examples, 64, tmp_path, "mrpc-train")
    second = encode_cached(encoder, tokenizer, examples, 64, tmp_path, "mrpc-train")
    assert encoder.calls == 1
    assert first == expected and second == expected
    assert [p.name.split("-")[:2] for p in tmp_path.iterdir()] == [["mrpc", "train"]]


def test_any_change_of_content_gets_its_own_file(mrpc, tokenizer, tmp_path):
    task, examples = mrpc
    encoder = Counting(task.encode_train)
    encode_cached(encoder, tokenizer, examples, 64, tmp_path, "x")
    edited = [dataclasses.replace(examples[0], text_a=examples[0].text_a + " indeed"), *examples[1:]]
    relabelled = [dataclasses.replace(examples[0], label=1 - examples[0].label), *examples[1:]]
    changed = encode_cached(encoder, tokenizer, edited, 64, tmp_path, "x")
    assert changed[0]["input_ids"] != task.encode_train(tokenizer, examples[:1], 64)[0]["input_ids"]
    assert encode_cached(encoder, tokenizer, relabelled, 64, tmp_path, "x")[0]["labels"] == 1 - examples[0].label
    encode_cached(encoder, tokenizer, examples, 32, tmp_path, "x")  # another maximum length
    encode_cached(encoder, tokenizer, examples[::-1], 64, tmp_path, "x")  # another order
    other = load_tokenizer(resolve_model("tiny-random"))
    other.add_tokens(["qbertword"])  # another vocabulary
    encode_cached(encoder, other, examples, 64, tmp_path, "x")
    assert encoder.calls == 6
    assert len(list(tmp_path.iterdir())) == 6


def test_a_damaged_file_is_tokenized_again_and_replaced(mrpc, tokenizer, tmp_path, caplog):
    task, examples = mrpc
    encoder = Counting(task.encode_train)
    expected = encode_cached(encoder, tokenizer, examples, 64, tmp_path, "x")
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="qbert"):
        again = encode_cached(encoder, tokenizer, examples, 64, tmp_path, "x")
    assert again == expected and encoder.calls == 2
    assert "cannot be read" in caplog.text
    assert encode_cached(encoder, tokenizer, examples, 64, tmp_path, "x") == expected and encoder.calls == 2


def test_squad_windows_with_offsets_and_none_survive_the_round_trip(tokenizer, tmp_path):
    context = "The quick brown fox jumps over the lazy dog. " * 12
    examples = [SquadExample("a", "t", "What jumps?", context, ("fox",), (16,)),
                SquadExample("b", "t", "Over what?", context, ("the lazy dog",), (31,))]
    task = get_task("squad")
    task.doc_stride = 16
    expected = task.encode_eval(tokenizer, examples, 48)
    assert len(expected) > 2 and any(o is None for o in expected[0]["offsets"])
    assert encode_cached(task.encode_eval, tokenizer, examples, 48, tmp_path, "s") == expected
    assert encode_cached(task.encode_eval, tokenizer, examples, 48, tmp_path, "s") == expected
    task.doc_stride = 8  # the task's settings are part of the key
    assert encode_cached(task.encode_eval, tokenizer, examples, 48, tmp_path, "s") == task.encode_eval(
        tokenizer, examples, 48)
    assert len(list(tmp_path.iterdir())) == 2


def test_no_root_no_cache(mrpc, tokenizer, tmp_path, monkeypatch):
    task, examples = mrpc
    encoder = Counting(task.encode_train)
    encode_cached(encoder, tokenizer, examples, 64, None, "x")
    encode_cached(encoder, tokenizer, examples, 64, None, "x")
    assert encoder.calls == 2
    assert features_root(tmp_path) == tmp_path / ".cache" / "features"
    monkeypatch.setenv("QBERT_CACHE_DIR", str(tmp_path / "c"))
    assert features_root(tmp_path) == tmp_path / "c" / "features"


def test_values_the_file_cannot_hold_exactly_are_returned_and_not_cached(tokenizer, tmp_path):
    class Task:
        def encode(self, tokenizer, examples, max_len):
            return [{"input_ids": [1, 2], "labels": None} for _ in examples]

    encoded = encode_cached(Task().encode, tokenizer, ["a", "b"], 8, tmp_path, "odd")
    assert encoded == [{"input_ids": [1, 2], "labels": None}] * 2
    assert list(tmp_path.iterdir()) == []
