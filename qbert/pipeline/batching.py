"""Dynamic padding and length-grouped batches, shared by every stage that feeds the model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
TARGETS = ("labels", "start_positions", "end_positions")


def pad_batch(
    features: Sequence[dict[str, Any]], pad_token_id: int, length: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack features padded to the longest in the batch (not to max_seq_len), or to ``length``.

    Model inputs are padded on the right (ids with the pad token, masks and type ids with 0);
    targets are stacked as they are (float labels stay float, for regression).
    """
    longest = max([len(f["input_ids"]) for f in features] + [length or 0])
    batch: dict[str, torch.Tensor] = {}
    for key in MODEL_INPUTS:
        if key not in features[0]:
            continue
        fill = pad_token_id if key == "input_ids" else 0
        rows = [list(f[key]) + [fill] * (longest - len(f[key])) for f in features]
        batch[key] = torch.tensor(rows, dtype=torch.long)
    for key in TARGETS:
        if key in features[0]:
            values = [f[key] for f in features]
            dtype = torch.float32 if isinstance(values[0], float) else torch.long
            batch[key] = torch.tensor(values, dtype=dtype)
    return batch


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, group_by_length: bool = True,
    mega_batch_factor: int = 50,
) -> list[list[int]]:
    """One epoch of shuffled batches of indices, each holding examples of similar length.

    Indices are shuffled, cut into mega-batches of ``mega_batch_factor * batch_size``, sorted by
    length inside each mega-batch and cut into batches, whose order is shuffled again: batches stay
    random while padding shrinks (the scheme of HuggingFace's LengthGroupedSampler). Deterministic
    for a given generator state.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = mega_batch_factor * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Evaluation batches: indices sorted by length (least padding); callers restore the order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, with_targets: bool) -> dict[str, torch.Tensor]:
    """The tensors the model's forward takes, moved to ``device``."""
    keys = MODEL_INPUTS + (TARGETS if with_targets else ())
    return {k: v.to(device) for k, v in batch.items() if k in keys}
