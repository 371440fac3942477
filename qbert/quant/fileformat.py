"""What qbert's own safetensors formats (packed GOBO files, integer files) share when read: the file must
prove what it is before anything in it is trusted.

- a checksum over every tensor's name, dtype, shape and bytes, written into the metadata and checked on read
  (a flipped byte in an index stream or a codebook is otherwise a silently different model);
- metadata parsed as JSON with one-line errors;
- the model class chosen from a fixed set of heads, never looked up by a name the file supplies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qbert.errors import QbertError

CHECKSUM_KEY = "sha256"
"""The metadata key of the tensors' checksum."""


def tensors_checksum(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over every tensor (by name: its name, dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (readers see the old file or the new one), with the tensors'
    checksum in its metadata and the mode of a new file under the user's umask."""
    from safetensors.numpy import save_file

    from qbert.files import apply_umask, fsync_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**metadata, CHECKSUM_KEY: tensors_checksum(tensors)})
    apply_umask(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)


def check_checksum(path: str | Path, metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> None:
    """Raise when the file's tensors do not match the checksum it was written with (files from before
    checksums were written have none and are read as they are)."""
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_checksum(tensors) != expected:
        raise QbertError("the tensors do not match the file's checksum (the file is damaged: export it again)",
                         source=str(path))


def metadata_json(path: str | Path, metadata: dict[str, str], key: str) -> Any:
    """A JSON value of the file's metadata, or a one-line error."""
    if key not in metadata:
        raise QbertError(f"the metadata has no {key!r} (not a complete qbert file: export it again)",
                         source=str(path))
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise QbertError(f"metadata {key!r} is not valid JSON ({exc.msg}): export the file again",
                         source=str(path)) from None


HEADS = {"ForSequenceClassification": "AutoModelForSequenceClassification",
         "ForQuestionAnswering": "AutoModelForQuestionAnswering"}
"""Architecture name endings qbert writes, and the auto class that builds each from a config."""


def build_model(path: str | Path, config_data: dict[str, Any], architecture: str | None) -> Any:
    """The (randomly initialised) model a file's config and architecture describe, from a fixed set of
    task heads and transformers' registered model types (no code is looked up by a name from the file)."""
    import transformers

    config_data = dict(config_data)
    config_data.pop("_attn_implementation", None)
    model_type = config_data.pop("model_type", None)
    head = next((auto for ending, auto in HEADS.items() if str(architecture or "").endswith(ending)), None)
    if head is None:
        raise QbertError(f"architecture {architecture!r} is not one qbert writes (a model ending in "
                         f"{' or '.join(HEADS)})", source=str(path))
    try:
        config = transformers.AutoConfig.for_model(str(model_type), **config_data)
        return getattr(transformers, head).from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise QbertError(f"the stored config cannot build a model ({str(exc).splitlines()[0]})",
                         source=str(path)) from None
