"""The cache of fine-tuned FP32 checkpoints, keyed by everything that determines their weights.

Every post-training recipe of the same model, task, data, fine-tune settings and seed starts from
the same checkpoint, trained once. A file lock makes concurrent processes wait for one trainer
instead of training the same checkpoint twice; a checkpoint appears atomically (trained into a
temporary folder, then renamed) so an interrupted training leaves nothing that looks finished; what it
saved as it trained (:func:`resume_file`) lets the next attempt continue.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qbert.config import ExperimentConfig, stable_hash
from qbert.errors import warn
from qbert.files import apply_umask, fsync_path
from qbert.runs import atomic_write_json, pid_lock, read_json
from qbert.tasks.base import file_digest

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when the training loop changes in a way that changes the weights."""

NOT_AFFECTING_WEIGHTS = ("device",)
"""Fine-tune keys left out of the checkpoint key. ``threads`` is in it when a config sets it: CPU kernels sum
in another order with another thread count, so the weights differ in their last bits. Left unset (all
cores, or a sweep's ``--threads``), it is not, and the thread count used is recorded in ``finetune.json``
and the seed's ``metrics.json`` (``finetune.threads``)."""


def finetune_key(config: ExperimentConfig, seed: int, model_identity: dict[str, Any],
                 data_fingerprint: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The cache key of the FP32 checkpoint for ``seed``, and the data it hashes."""
    finetune = config.finetune.model_dump(mode="json")
    for key in NOT_AFFECTING_WEIGHTS:
        finetune.pop(key)
    if finetune.get("threads") is None:
        finetune.pop("threads")  # unset: the key every earlier checkpoint has
    key_data = {
        "version": CACHE_VERSION,
        "model": model_identity,
        "task": config.task,
        "data": data_fingerprint,
        "finetune": finetune,
        "seed": seed,
    }
    return stable_hash(key_data, length=16), key_data


def cache_root(runs_root: Path) -> Path:
    """Where checkpoints live: ``$QBERT_CACHE_DIR``, else ``<runs>/.cache/finetuned``."""
    env = os.environ.get("QBERT_CACHE_DIR")
    return Path(env) / "finetuned" if env else runs_root / ".cache" / "finetuned"


def resume_file(root: Path, key: str) -> Path:
    """Where the training of checkpoint ``key`` saves its state as it goes (so an interrupted one resumes); the
    cache removes it once the checkpoint is stored."""
    return root / f"{key}.resume.pt"


def cached_checkpoint(
    root: Path, key: str, key_data: dict[str, Any], train: Callable[[Path], dict[str, Any]]
) -> tuple[Path, dict[str, Any], bool]:
    """The checkpoint folder for ``key``, training it with ``train(folder)`` when missing.

    ``train`` writes a HuggingFace folder and returns facts about the training, stored beside it.
    Returns the folder, those facts and whether the checkpoint came from the cache.
    """
    folder = root / key

    def waiting(holder: str) -> None:
        warn(log, "another process (%s) holds the fine-tuned checkpoint %s (training or checking it); waiting "
             "for it", holder, folder)

    with pid_lock(root / f"{key}.lock", wait=True, on_wait=waiting):
        if (folder / "finetune.json").is_file():
            info = read_json(folder / "finetune.json")
            problem = "finetune.json is not valid JSON" if info is None else _verify(folder, info)
            if problem is None:
                log.info("reusing fine-tuned checkpoint %s", folder)
                return folder, info["training"], True
            aside = root / f"{key}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(folder, aside)
            warn(log, "the cached fine-tuned checkpoint %s is damaged (%s): moved to %s, training it again",
                 folder, problem, aside)
        # under the lock nobody else is training this key: any temporary folder is a killed run's
        for stale in root.glob(f"{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            training = train(tmp)
            apply_umask(tmp)  # safetensors writes 0600
            atomic_write_json(tmp / "finetune.json", {"key": key, "key_data": key_data, "training": training,
                                                      "files": _digests(tmp)})
            fsync_path(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
            resume_file(root, key).unlink(missing_ok=True)  # trained and stored: nothing left to resume
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder, training, False


def _digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of a checkpoint folder (but its record)."""
    return {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "finetune.json"}


def _verify(folder: Path, info: Any) -> str | None:
    """Why a cached checkpoint cannot be used, or None. Entries written before checksums were recorded
    are checked by reading their weights' headers, then get their checksums recorded."""
    if not isinstance(info, dict) or not isinstance(info.get("training"), dict):
        return "finetune.json is not a checkpoint record"
    files = info.get("files")
    if files is None:
        from safetensors import SafetensorError, safe_open

        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            return "no weights file"
        try:
            for path in weights:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        handle.get_slice(name)
        except (SafetensorError, OSError, ValueError) as exc:
            return f"{path.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        atomic_write_json(folder / "finetune.json", {**info, "files": _digests(folder)})
        return None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("size"):
            return f"{name} has {path.stat().st_size:,} bytes, {expected.get('size'):,} were written"
        if file_digest(path) != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return None
