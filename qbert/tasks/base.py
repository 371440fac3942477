"""What every task provides to the pipeline, and where task data comes from."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qbert.errors import QbertError
from qbert.models import Head, hub_offline


@dataclass
class EvalOutput:
    """What the evaluate stage hands back to a task for scoring."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    outputs: Any = None
    """The model's raw outputs (logits, or start/end logits per feature) the metrics came from."""


class Task:
    """A GLUE or SQuAD task: loading, tokenizing and scoring. Knows nothing about quantization."""

    name: ClassVar[str]
    head: ClassVar[Head]
    num_labels: ClassVar[int] = 1
    label_range: ClassVar[tuple[float, float] | None] = None
    """Regression: the range the labels lie in (``evaluate.clamp_regression`` clamps predictions to it)."""
    metrics: ClassVar[tuple[str, ...]]
    headline: ClassVar[str]
    """The metric `qbert ls` and the results table show first."""
    eval_splits: ClassVar[tuple[str, ...]] = ("dev",)
    """Named evaluation sets; metrics of all but the first carry the split name as a suffix."""

    def load(self, split: str, data: Any) -> list[Any]:
        """Examples of ``split`` ('train' or one of ``eval_splits``) for a ``DataConfig``."""
        raise NotImplementedError

    def missing_splits(self, data: Any) -> dict[str, str]:
        """Evaluation splits after the first that ``data`` does not have (split -> why): they are skipped
        and recorded, never scored. The first evaluation split is required (``load`` says how to add it)."""
        return {}

    def present_splits(self, data: Any) -> tuple[str, ...]:
        """The evaluation splits to score: ``eval_splits`` without the missing ones."""
        missing = self.missing_splits(data)
        return tuple(split for split in self.eval_splits if split not in missing)

    def data_fingerprint(self, data: Any) -> dict[str, Any]:
        """What identifies the training data (for checkpoint cache keys)."""
        raise NotImplementedError

    def encode_train(self, tokenizer: Any, examples: list[Any], max_len: int) -> list[dict[str, Any]]:
        """Token ids plus targets, one dict per training feature (unpadded)."""
        raise NotImplementedError

    def encode_eval(self, tokenizer: Any, examples: list[Any], max_len: int) -> list[dict[str, Any]]:
        """Token ids per evaluation feature (unpadded), plus whatever scoring needs."""
        raise NotImplementedError

    def trivial(self, train: list[Any], examples: list[Any]) -> tuple[str, dict[str, float]] | None:
        """The input-blind predictor a trained model must beat, and its metrics on ``examples``
        (None where there is no meaningful one, e.g. span extraction)."""
        return None

    def score(self, examples: list[Any], features: list[dict[str, Any]], outputs: Any) -> EvalOutput:
        """Metrics and per-example predictions from the model outputs of ``features``."""
        raise NotImplementedError


def data_dir(configured: str | None) -> Path | None:
    """The local data folder: ``data.dir``, else ``$QBERT_DATA_DIR``, else None (use the hub)."""
    raw = configured or os.environ.get("QBERT_DATA_DIR") or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        key = "data.dir" if configured else None
        origin = "" if configured else " (from QBERT_DATA_DIR)"
        raise QbertError(f"data folder {raw!r}{origin} does not exist", key=key)
    return path


def require_hub(task: str) -> None:
    """Fail at once when a task would need the hub but qbert is offline."""
    if hub_offline():
        raise QbertError(
            f"no local data for {task}: set data.dir (or QBERT_DATA_DIR) to a folder in the GLUE "
            "layout (<dir>/glue/<TASK>/train.tsv, <dir>/squad/dev-v1.1.json), or set QBERT_ONLINE=1 "
            "to download from the HuggingFace hub",
            key="data.dir",
        )


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (cheap for GLUE-sized files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def split_point(n_groups: int, fraction: float) -> int:
    """How many leading groups go to training under ``data.train_from_eval``; both parts non-empty."""
    if n_groups < 2:
        raise QbertError(f"cannot split {n_groups} group(s) into training and evaluation parts",
                         key="data.train_from_eval")
    return min(max(1, round(n_groups * fraction)), n_groups - 1)
