"""Tokenized features cached on disk by the content they come from.

A run tokenizes its training split (fine-tuning, calibration, QAT) and its evaluation splits once per seed and per
method; MNLI's 76k training pairs take seconds to tokenize every time. The cache key is a hash of everything the
features depend on: the examples themselves (every field, in order), the tokenizer's full state (its vocabulary,
normalizer, pre-tokenizer and post-processor, special tokens, padding side), the maximum length, the encoding
function's code and the task's settings (SQuAD's doc stride). Any change gives a new key; nothing is trusted by
name or date. A file that cannot be read back is tokenized again and rewritten.

Files live beside the fine-tuned checkpoints: ``$QBERT_CACHE_DIR/features``, else ``<runs>/.cache/features``, one
``.npz`` per split (numpy columns, no pickle: lists of token ids stored flat with their lengths).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qbert.config import stable_hash
from qbert.runs import atomic_write_bytes

log = logging.getLogger("qbert")

FORMAT = 1
"""Bumped when what a cached file holds changes shape."""

Encoder = Callable[[Any, list[Any], int], list[dict[str, Any]]]


def features_root(runs_root: Path) -> Path:
    """Where cached features live: ``$QBERT_CACHE_DIR/features``, else ``<runs>/.cache/features``."""
    env = os.environ.get("QBERT_CACHE_DIR")
    return Path(env) / "features" if env else Path(runs_root) / ".cache" / "features"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of the tokenizer's whole state (None for a tokenizer without a ``tokenizers`` backend: not cached).
    The backend's truncation and padding settings are left out: they are set by each call, not by the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    # the backend writes its state in a fixed order: hashed as it comes (sorting 30k vocabulary keys costs 50 ms)
    backend_digest = hashlib.sha256(json.dumps(state, separators=(",", ":")).encode()).hexdigest()
    special = {name: str(getattr(tokenizer, name, None)) for name in ("cls_token", "sep_token", "pad_token",
                                                                        "unk_token", "mask_token")}
    return stable_hash({"class": type(tokenizer).__name__, "backend": backend_digest, "special": special,
                        "padding_side": getattr(tokenizer, "padding_side", None)}, length=32)


def examples_digest(examples: list[Any]) -> str:
    """SHA-256 over every field of every example, in order (their ``repr``: a dataclass's names every field, and
    the repr of a string or a float gives back that exact value)."""
    return hashlib.sha256("\n".join(map(repr, examples)).encode()).hexdigest()


def _encoder_identity(encoder: Encoder) -> dict[str, Any]:
    owner = getattr(encoder, "__self__", None)
    function = getattr(encoder, "__func__", encoder)
    try:
        code = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
    except (OSError, TypeError):
        code = None
    settings = dict(vars(owner)) if owner is not None else {}
    return {"task": type(owner).__name__ if owner is not None else None, "function": function.__qualname__,
            "code": code, "settings": settings}


class _Unsupported(Exception):
    """A feature value the columnar file cannot hold exactly (those features are not cached)."""


def _kind(values: list[Any]) -> str:
    first = values[0]
    if all(type(v) is int for v in values):
        return "ints"
    if all(type(v) is float for v in values):
        return "floats"
    if isinstance(first, list) and all(isinstance(v, list) and all(type(x) is int for x in v) for v in values):
        return "int_lists"
    if isinstance(first, list) and all(isinstance(v, list) and all(x is None or (type(x) is tuple and len(x) == 2
                                                                              and all(type(y) is int for y in x))
                                                                    for x in v) for v in values):
        return "pair_lists"  # SQuAD's character offsets: (start, end) or None
    raise _Unsupported(type(first).__name__)


def _pack(features: list[dict[str, Any]]) -> bytes:
    """The features as flat numpy columns (one ``.npz``, no pickle): lists become one array and their lengths."""
    keys = list(features[0]) if features else []
    if any(list(f) != keys for f in features):
        raise _Unsupported("features with different keys")
    arrays: dict[str, np.ndarray] = {}
    kinds = []
    for i, key in enumerate(keys):
        values = [f[key] for f in features]
        kind = _kind(values)
        kinds.append(f"{kind}:{key}")
        if kind in ("ints", "floats"):
            arrays[f"c{i}"] = np.array(values, dtype=np.int64 if kind == "ints" else np.float64)
            continue
        arrays[f"c{i}_lengths"] = np.array([len(v) for v in values], dtype=np.int64)
        flat = [x for v in values for x in v]
        if kind == "int_lists":
            wide = flat and (min(flat) < -(2**31) or max(flat) >= 2**31)
            arrays[f"c{i}"] = np.array(flat, dtype=np.int64 if wide else np.int32)  # token ids fit int32
        else:
            arrays[f"c{i}_none"] = np.array([x is None for x in flat], dtype=bool)
            arrays[f"c{i}"] = np.array([(0, 0) if x is None else x for x in flat], dtype=np.int64).reshape(-1, 2)
    arrays["kinds"] = np.array(kinds, dtype=str)
    arrays["count"] = np.array(len(features), dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _unpack(path: Path) -> list[dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        count = int(data["count"])
        columns: list[tuple[str, list[Any]]] = []
        for i, entry in enumerate(data["kinds"].tolist()):
            kind, _, key = entry.partition(":")
            if kind in ("ints", "floats"):
                columns.append((key, data[f"c{i}"].tolist()))
                continue
            flat = data[f"c{i}"].tolist()
            if kind == "pair_lists":
                flat = [None if none else tuple(pair) for pair, none in zip(flat, data[f"c{i}_none"].tolist(),
                                                                            strict=True)]
            ends = np.cumsum(data[f"c{i}_lengths"]).tolist()
            columns.append((key, [flat[end - length:end] for end, length in
                                  zip(ends, data[f"c{i}_lengths"].tolist(), strict=True)]))
    if any(len(values) != count for _, values in columns):
        raise ValueError("columns of different lengths")
    return [{key: values[n] for key, values in columns} for n in range(count)]


def encode_cached(encoder: Encoder, tokenizer: Any, examples: list[Any], max_len: int, root: Path | None,
                  label: str) -> list[dict[str, Any]]:
    """``encoder(tokenizer, examples, max_len)``, read from ``root`` when the same content was tokenized before,
    else computed and written there (atomically). ``root`` None: no cache. ``label`` names the file
    (``mrpc-train``)."""
    fingerprint = tokenizer_fingerprint(tokenizer) if root is not None else None
    if root is None or fingerprint is None:
        return encoder(tokenizer, examples, max_len)
    key = stable_hash({"format": FORMAT, "encoder": _encoder_identity(encoder), "tokenizer": fingerprint,
                       "max_len": max_len, "examples": examples_digest(examples)}, length=20)
    path = Path(root) / f"{label}-{key}.npz"
    if path.is_file():
        try:
            features = _unpack(path)
            log.info("tokenized features from the cache: %s", path)
            return features
        except Exception as exc:  # a damaged or foreign file: tokenize again and replace it
            log.warning("cached features %s cannot be read (%s: %s); tokenizing again", path, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
    features = encoder(tokenizer, examples, max_len)
    try:
        atomic_write_bytes(path, _pack(features))
    except _Unsupported as exc:
        log.info("features of %s not cached (a %s value)", label, exc)
    except OSError as exc:  # a read-only cache still runs, it only tokenizes every time
        log.warning("cannot write the features cache %s (%s); continuing without it", path, exc.strerror)
    return features
