"""Dynamic padding and length-grouped batching."""

import torch

from qbert.pipeline.batching import length_grouped_batches, pad_batch, sorted_batches


def test_pad_batch_pads_to_longest_on_the_right():
    batch = pad_batch([
        {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0], "labels": 1},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "token_type_ids": [0, 0], "labels": 0},
    ], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].dtype == torch.long


def test_float_labels_stay_float():
    batch = pad_batch([{"input_ids": [1], "labels": 2.5}], pad_token_id=0)
    assert batch["labels"].dtype == torch.float32


def test_length_grouped_batches_cover_every_index_once_and_are_deterministic():
    lengths = [(i * 37) % 101 for i in range(1000)]
    a = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(3))
    b = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(3))
    assert a == b
    assert sorted(i for batch in a for i in batch) == list(range(1000))
    c = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(4))
    assert a != c


def test_length_grouping_reduces_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(2000)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(0))
    plain = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(0), group_by_length=False)
    assert padding(grouped) < padding(plain) / 5


def test_sorted_batches():
    assert list(sorted_batches([3, 1, 2, 5], 2)) == [[3, 0], [2, 1]]
