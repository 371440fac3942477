"""Run records: the typed, versioned shape of a seed's ``metrics.json`` and ``status.json`` and of a
config's ``summary.json``, read in one place.

Every reader of a seed's or a config's files (``qbert run``'s skip check, ``ls``, ``table``, ``sweep``,
``plot``, ``inspect``, ``export``, the search, a seed folder given as ``model:``) goes through
:func:`read_record`, :func:`read_status` and :func:`read_summary`, which return the typed records: a file
that cannot be parsed is reported on stderr once (``warning: skipping <file>: <reason>``) and treated as
absent, so a truncated or foreign file never crashes a command and is never silently counted.

Versions: 1 = records written before the version field existed (read as they are); 2 = adds
``version`` and ``arithmetic`` (what the evaluated model computed: float, simulated, integer, decoded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

RECORD_VERSION = 2

State = Literal["running", "done", "failed", "interrupted", "missing", "unreadable"]


class Record(BaseModel):
    """Base: known fields typed, unknown ones kept (newer writers may add fields)."""

    model_config = ConfigDict(extra="allow")


class SeedRecord(Record):
    """``metrics.json`` of one seed."""

    version: int = 1
    metrics: dict[str, float]
    """The one field every reader needs; the others are what qbert writes (readers tolerate older and
    hand-made records without them)."""
    name: str | None = None
    config_hash: str | None = None
    seed: int | None = None
    model: str | None = None
    task: str | None = None
    recipe: str | None = None
    headline: str | None = None
    simulated: bool | None = None
    arithmetic: str | None = None
    integer: dict[str, Any] | None = None
    """``evaluate.integer``: the metrics of the model on integer GEMMs, their agreement with the
    simulated ones, which GEMMs are integer."""
    onnx: dict[str, Any] | None = None
    """``export.formats: [onnx]``: the metrics of the exported file on onnxruntime and their agreement
    with the simulated ones."""
    finetune: dict[str, Any] | None = None
    qat: dict[str, Any] | None = None
    checkpoint: str | None = None
    evaluate: dict[str, Any] = Field(default_factory=dict)
    missing_splits: dict[str, str] = Field(default_factory=dict)
    """Evaluation splits the data lacks (split -> why, e.g. MNLI's dev_mismatched): no metric was computed."""
    trivial: dict[str, Any] | None = None
    """FP32 runs: the input-blind predictor (majority class, constant regression), its metrics and whether
    the run is no better (``weak``)."""
    recipe_report: dict[str, Any] = Field(default_factory=dict)
    exports: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)


class Status(Record):
    """``status.json`` of one seed."""

    state: State
    error: str | None = None


class Summary(Record):
    """``summary.json`` of one config: median, min, max and n of each metric over finished seeds."""

    name: str | None = None
    config_hash: str
    task: str | None = None
    model: str | None = None
    recipe: str | None = None
    headline: str | None = None
    simulated: bool | None = None
    seeds: list[int]
    metrics: dict[str, dict[str, float]]
    per_seed: dict[str, dict[str, float]] = Field(default_factory=dict)


_reported: set[str] = set()


def unreadable(path: Path, reason: str) -> None:
    """Say once per file, on stderr, that ``path`` is skipped and why."""
    key = str(path)
    if key not in _reported:
        _reported.add(key)
        print(f"warning: skipping {path}: {reason}", file=sys.stderr)


class UnreadableRecord(ValueError):
    """A record file that exists but cannot be read or parsed; the message says why."""


def _parse(path: Path, model: type[Record]) -> Record | None:
    """The record in ``path``; None when there is no such file; :class:`UnreadableRecord` saying why not."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnreadableRecord(f"cannot read it ({exc.strerror})") from None
    try:
        return model.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise UnreadableRecord(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise UnreadableRecord(f"not a qbert {model.__name__} record ({where}: {err['msg']})") from None


def _read(path: Path, model: type[Record]) -> Record | None:
    try:
        return _parse(path, model)
    except UnreadableRecord as exc:
        hint = "" if str(exc).startswith("cannot read") else "; delete it or rerun with --force"
        unreadable(path, f"{exc}{hint}")
        return None


def read_record(folder: Path) -> SeedRecord | None:
    """A seed's ``metrics.json``, or None when missing or unparseable (reported)."""
    return _read(Path(folder) / "metrics.json", SeedRecord)  # type: ignore[return-value]


def load_record(folder: Path) -> SeedRecord | None:
    """A seed's ``metrics.json`` for a caller that reports a broken one itself: None when missing,
    :class:`UnreadableRecord` (saying why) when it cannot be read."""
    return _parse(Path(folder) / "metrics.json", SeedRecord)  # type: ignore[return-value]


def read_status(folder: Path) -> Status:
    """A seed's ``status.json``; state ``missing`` without one, ``unreadable`` when broken."""
    path = Path(folder) / "status.json"
    if not path.is_file():
        return Status(state="missing")
    status = _read(path, Status)
    return status if status is not None else Status(state="unreadable")  # type: ignore[return-value]


def read_summary(folder: Path) -> Summary | None:
    """A config's ``summary.json``, or None when missing or unparseable (reported)."""
    return _read(Path(folder) / "summary.json", Summary)  # type: ignore[return-value]


def as_data(record: Record) -> dict[str, Any]:
    """A record as the JSON data it was read from (fields unset in the file left out: None or empty)."""
    return record.model_dump(mode="json", exclude_none=True)


WRITTEN = ("name", "config_hash", "seed", "model", "task", "recipe", "headline", "simulated", "arithmetic")
"""Fields qbert always writes (optional only when reading)."""


def seed_record(**fields: Any) -> dict[str, Any]:
    """A new ``metrics.json`` record, checked against :class:`SeedRecord` (with every written field set)."""
    missing = [key for key in WRITTEN if fields.get(key) is None]
    if missing:
        raise ValueError(f"a seed record needs {', '.join(missing)}")
    return SeedRecord.model_validate({"version": RECORD_VERSION, **fields}).model_dump(mode="json")
