"""File primitives below every other module: flushing to disk and the umask's file mode (torch-free, and
knowing nothing of configs or runs, so the quantization core can publish its files safely too)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush ``path`` to the disk: a file, or every file under a folder and the folders themselves. Call it
    before the rename that publishes a file a library wrote (torch, safetensors, HuggingFace folders): the
    rename alone can reach the disk before the data, and a power cut then leaves an empty or torn file in
    place of the old one."""
    path = Path(path)
    if path.is_dir():
        folders = [path, *sorted(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    else:
        folders, files = [], [path]
    for entry in [*files, *folders]:
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def new_file_mode() -> int:
    """The mode a new file gets under the user's umask (``open`` would give it; mkstemp and the safetensors
    writer give 0600 whatever the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode of a new file under the user's umask:
    for what libraries write 0600 (safetensors files, so exports and checkpoints)."""
    path = Path(path)
    mode = new_file_mode()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        os.chmod(file, mode)
