"""GLUE tasks from the original TSV layout (or the hub's ``nyu-mll/glue``), tokenizing and scoring.

TSV quirks handled here: CoLA has no header; MRPC starts with a byte-order mark; quote characters
are literal, so files are read with quoting off; MNLI's label is the last column (``gold_label``).
"""

from __future__ import annotations

import csv
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qbert.errors import QbertError
from qbert.tasks import metrics as M
from qbert.tasks.base import EvalOutput, Task, data_dir, file_digest, require_hub, split_point

log = logging.getLogger(__name__)

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class GlueExample:
    """One sentence or sentence pair with its label (class index, or a float for STS-B)."""

    guid: str
    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class GlueSpec:
    """How one GLUE task's files and hub columns look."""

    folder: str
    hub_config: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None
    """Label strings in class-index order (the hub's order); None for regression."""
    hub_columns: tuple[str, str | None]
    header: bool = True
    eval_files: tuple[tuple[str, str, str], ...] = (("dev", "dev.tsv", "validation"),)
    """(split name, file name, hub split) per evaluation set."""


SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec("CoLA", "cola", 3, None, 1, ("0", "1"), ("sentence", None), header=False),
    "sst2": GlueSpec("SST-2", "sst2", "sentence", None, "label", ("0", "1"), ("sentence", None)),
    "mrpc": GlueSpec("MRPC", "mrpc", "#1 String", "#2 String", "Quality", ("0", "1"),
                     ("sentence1", "sentence2")),
    "stsb": GlueSpec("STS-B", "stsb", "sentence1", "sentence2", "score", None, ("sentence1", "sentence2")),
    "qqp": GlueSpec("QQP", "qqp", "question1", "question2", "is_duplicate", ("0", "1"),
                    ("question1", "question2")),
    "mnli": GlueSpec("MNLI", "mnli", "sentence1", "sentence2", "gold_label",
                     ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
                     eval_files=(("matched", "dev_matched.tsv", "validation_matched"),
                                 ("mismatched", "dev_mismatched.tsv", "validation_mismatched"))),
    "qnli": GlueSpec("QNLI", "qnli", "question", "sentence", "label", ("entailment", "not_entailment"),
                     ("question", "sentence")),
    "rte": GlueSpec("RTE", "rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
                    ("sentence1", "sentence2")),
    "wnli": GlueSpec("WNLI", "wnli", "sentence1", "sentence2", "label", ("0", "1"),
                     ("sentence1", "sentence2")),
}


def task_folder(root: Path, spec: GlueSpec) -> Path:
    """``<root>/glue/<TASK>``, or ``<root>/<TASK>`` when root is the glue folder itself."""
    for candidate in (root / "glue" / spec.folder, root / spec.folder):
        if candidate.is_dir():
            return candidate
    return root / "glue" / spec.folder


def read_tsv(path: Path, spec: GlueSpec) -> list[GlueExample]:
    """Parse one GLUE TSV file into examples; rows missing a needed column are counted and logged."""
    try:
        examples, skipped = _parse_tsv(path, spec)
    except UnicodeDecodeError as exc:
        raise QbertError(f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start:,}); "
                         "save the file as UTF-8", source=str(path)) from None
    except csv.Error as exc:
        raise QbertError(f"not a tab-separated file ({exc})", source=str(path)) from None
    if not examples:
        raise QbertError(f"no usable rows ({skipped} malformed): expected the GLUE layout, tab-separated"
                         + (" with a header line" if spec.header else ""), source=str(path))
    if skipped:
        log.warning("%s: skipped %d malformed row(s) of %d", path, skipped, skipped + len(examples))
    return examples


def _parse_tsv(path: Path, spec: GlueSpec) -> tuple[list[GlueExample], int]:
    examples: list[GlueExample] = []
    skipped = 0
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) if spec.header else None
        if spec.header and header is None:
            raise QbertError("the file is empty: expected a header line and one example per line", source=str(path))

        def column(key: str | int) -> int:
            if isinstance(key, int):
                return key
            if key == "gold_label" and header and header[-1] == "gold_label":
                return len(header) - 1
            if header is None or key not in header:
                raise QbertError(f"column {key!r} not found in header {header}", source=str(path))
            return header.index(key)

        ia, il = column(spec.text_a), column(spec.label)
        ib = column(spec.text_b) if spec.text_b is not None else None
        needed = max(i for i in (ia, ib, il) if i is not None)
        for row_number, row in enumerate(reader):
            if len(row) <= needed:
                skipped += 1
                continue
            raw_label = row[il].strip()
            try:
                label: int | float = float(raw_label) if spec.labels is None else spec.labels.index(raw_label)
                if not math.isfinite(label):
                    raise ValueError
            except ValueError:
                raise QbertError(
                    f"row {row_number + 1}: label {raw_label!r} is not "
                    + (f"one of {spec.labels}" if spec.labels else "a finite number"),
                    source=str(path),
                ) from None
            examples.append(
                GlueExample(str(row_number), row[ia], row[ib] if ib is not None else None, label)
            )
    return examples, skipped


class GlueTask(Task):
    """One GLUE task; subclasses below fix the spec and the metrics."""

    spec: GlueSpec

    def __init__(self) -> None:
        self.spec = SPECS[self.name]

    # ---------------------------------------------------------------- loading

    def _files(self, data: Any) -> tuple[Path | None, dict[str, Path]]:
        root = data_dir(data.dir)
        if root is None:
            return None, {}
        folder = task_folder(root, self.spec)
        files = {"train": folder / "train.tsv"}
        files.update({name: folder / file for name, file, _ in self.spec.eval_files})
        return folder, files

    def missing_splits(self, data: Any) -> dict[str, str]:
        folder, files = self._files(data)
        if folder is None:  # the hub has every split
            return {}
        return {split: f"{files[split]} not found" for split in self.eval_splits[1:] if not files[split].is_file()}

    def _read_split(self, split: str, data: Any) -> list[GlueExample]:
        folder, files = self._files(data)
        if folder is None:
            require_hub(self.name)
            return self._read_hub(split)
        path = files[split]
        if not path.is_file():
            fix = (
                "add the file, or set data.train_from_eval to train on part of the evaluation file"
                if split == "train"
                else "add the file (GLUE layout: <dir>/glue/<TASK>/dev.tsv)"
            )
            raise QbertError(f"{self.name} {split} split not found at {path}: {fix}", key="data.dir")
        return read_tsv(path, self.spec)

    def _read_hub(self, split: str) -> list[GlueExample]:
        from datasets import load_dataset

        hub_split = "train" if split == "train" else dict((n, h) for n, _, h in self.spec.eval_files)[split]
        rows = load_dataset("nyu-mll/glue", self.spec.hub_config, split=hub_split)
        col_a, col_b = self.spec.hub_columns
        return [
            GlueExample(str(row.get("idx", i)), row[col_a], row[col_b] if col_b else None,
                        float(row["label"]) if self.spec.labels is None else int(row["label"]))
            for i, row in enumerate(rows)
        ]

    def load(self, split: str, data: Any) -> list[GlueExample]:
        if data.train_from_eval is not None:
            first_eval = self.eval_splits[0]
            if split in ("train", first_eval):
                rows = self._read_split(first_eval, data)
                cut = split_point(len(rows), data.train_from_eval)
                examples = rows[:cut] if split == "train" else rows[cut:]
            else:
                examples = self._read_split(split, data)
        else:
            examples = self._read_split(split, data)
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        return examples[:limit] if limit else examples

    def data_fingerprint(self, data: Any) -> dict[str, Any]:
        folder, files = self._files(data)
        source_split = self.eval_splits[0] if data.train_from_eval is not None else "train"
        if folder is None:
            source = {"hub": f"nyu-mll/glue/{self.spec.hub_config}", "split": source_split}
        else:
            path = files[source_split]
            source = {"file": path.name, "sha256": file_digest(path) if path.is_file() else None}
        return {**source, "train_from_eval": data.train_from_eval, "max_train_samples": data.max_train_samples}

    # ---------------------------------------------------------------- tokenizing

    def _encode(self, tokenizer: Any, examples: list[GlueExample], max_len: int) -> list[dict[str, Any]]:
        texts_a = [e.text_a for e in examples]
        texts_b = [e.text_b for e in examples] if self.spec.text_b is not None else None
        enc = tokenizer(texts_a, texts_b, truncation=True, max_length=max_len)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
        return [
            {**{k: enc[k][i] for k in keys}, "labels": e.label} for i, e in enumerate(examples)
        ]

    encode_train = _encode
    encode_eval = _encode

    # ---------------------------------------------------------------- scoring

    def predictions_from(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, 0] if self.spec.labels is None else logits.argmax(axis=-1)

    def compute(self, labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def trivial(self, train: list[GlueExample], examples: list[GlueExample]) -> tuple[str, dict[str, float]]:
        """The predictor that ignores its input (the training split's majority class; regression: its mean
        label, whose correlations are 0) and its metrics on ``examples``."""
        labels = np.asarray([e.label for e in examples])
        train_labels = np.asarray([e.label for e in train])
        if self.spec.labels is None:
            value = float(train_labels.mean())
            return f"constant {value:.2f}", {name: 0.0 for name in self.metrics}
        classes, counts = np.unique(train_labels, return_counts=True)
        majority = int(classes[counts.argmax()])
        return f"always {self.spec.labels[majority]!r}", self.compute(labels, np.full(len(labels), majority))

    def score(self, examples: list[GlueExample], features: list[dict[str, Any]], outputs: Any) -> EvalOutput:
        logits = np.asarray(outputs, dtype=np.float64)
        preds = self.predictions_from(logits)
        labels = np.asarray([e.label for e in examples])
        names = self.spec.labels
        predictions = [
            {
                "guid": e.guid,
                "label": names[int(e.label)] if names else float(e.label),
                "prediction": names[int(p)] if names else float(p),
            }
            for e, p in zip(examples, preds, strict=True)
        ]
        return EvalOutput(self.compute(labels, preds), predictions)


class Cola(GlueTask):
    name, head, num_labels = "cola", "classification", 2
    metrics, headline = ("matthews",), "matthews"

    def compute(self, labels, preds):
        return {"matthews": M.matthews(labels, preds)}


class _Accuracy(GlueTask):
    head, num_labels = "classification", 2
    metrics, headline = ("accuracy",), "accuracy"

    def compute(self, labels, preds):
        return {"accuracy": M.accuracy(labels, preds)}


class Sst2(_Accuracy):
    name = "sst2"


class Qnli(_Accuracy):
    name = "qnli"


class Rte(_Accuracy):
    name = "rte"


class Wnli(_Accuracy):
    name = "wnli"


class Mnli(_Accuracy):
    name, num_labels = "mnli", 3
    eval_splits = ("matched", "mismatched")


class _F1Accuracy(GlueTask):
    head, num_labels = "classification", 2
    metrics, headline = ("f1", "accuracy"), "f1"

    def compute(self, labels, preds):
        return {"f1": M.binary_f1(labels, preds), "accuracy": M.accuracy(labels, preds)}


class Mrpc(_F1Accuracy):
    name = "mrpc"


class Qqp(_F1Accuracy):
    name = "qqp"


class Stsb(GlueTask):
    name, head, num_labels = "stsb", "regression", 1
    label_range = (0.0, 5.0)
    metrics, headline = ("pearson", "spearman"), "pearson"

    def compute(self, labels, preds):
        return {"pearson": M.pearson(labels, preds), "spearman": M.spearman(labels, preds)}
