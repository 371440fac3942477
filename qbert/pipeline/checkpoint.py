"""The cache of fine-tuned FP32 checkpoints, keyed by everything that determines their weights.

Every post-training recipe of the same model, task, data, fine-tune settings and seed starts from
the same checkpoint, trained once. A file lock makes concurrent processes wait for one trainer
instead of training the same checkpoint twice; a checkpoint appears atomically (trained into a
temporary folder, then renamed) so an interrupted training leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qbert.config import ExperimentConfig, stable_hash
from qbert.runs import atomic_write_json, read_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when the training loop changes in a way that changes the weights."""

NOT_AFFECTING_WEIGHTS = ("device", "threads")


def finetune_key(config: ExperimentConfig, seed: int, model_identity: dict[str, Any],
                 data_fingerprint: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The cache key of the FP32 checkpoint for ``seed``, and the data it hashes."""
    finetune = config.finetune.model_dump(mode="json")
    for key in NOT_AFFECTING_WEIGHTS:
        finetune.pop(key)
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


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_checkpoint(
    root: Path, key: str, key_data: dict[str, Any], train: Callable[[Path], dict[str, Any]]
) -> tuple[Path, dict[str, Any], bool]:
    """The checkpoint folder for ``key``, training it with ``train(folder)`` when missing.

    ``train`` writes a HuggingFace folder and returns facts about the training, stored beside it.
    Returns the folder, those facts and whether the checkpoint came from the cache.
    """
    folder = root / key
    with _locked(root / f"{key}.lock"):
        info = read_json(folder / "finetune.json")
        if info is not None:
            log.info("reusing fine-tuned checkpoint %s", folder)
            return folder, info["training"], True
        # under the lock nobody else is training this key: any temporary folder is a killed run's
        for stale in root.glob(f"{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            training = train(tmp)
            atomic_write_json(tmp / "finetune.json", {"key": key, "key_data": key_data, "training": training})
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder, training, False
