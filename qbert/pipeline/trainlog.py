"""What a training loop records as it goes: the loss and learning rate in run.log at a sensible interval,
and TensorBoard event files (optional: the ``tensorboard`` package, ``log.tensorboard``) with the loss,
the learning rate and, for QAT, the ranges of a few quantizers over the steps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("qbert")

MAX_LOG_EVERY = 50
"""Most training steps between two loss lines in run.log."""


def log_interval(total_steps: int, every: int | None = None) -> int:
    """Steps between two loss lines: ``every`` when given, else about 20 lines per training, at least one line
    per :data:`MAX_LOG_EVERY` steps."""
    if every is not None:
        return every
    return max(1, min(MAX_LOG_EVERY, total_steps // 20))


def event_writer(folder: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``folder``, or None (with a line in run.log) when the
    ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package: an optional extra
        log.info("no TensorBoard event files: the tensorboard package is not installed (pip install 'qbert[viz]')")
        return None
    return SummaryWriter(log_dir=str(folder))


class TrainingLog:
    """One training's record: ``step(...)`` after every optimisation step, ``close()`` at the end.

    ``watch()`` returns ranges to follow (name -> ``(lo, hi)``, e.g. a few quantizers' learned ranges),
    logged with the loss lines and to TensorBoard; ``folder``: where the event files go (None: none)."""

    def __init__(self, name: str, total_steps: int, *, every: int | None = None, folder: Path | None = None,
                 watch: Callable[[], dict[str, tuple[float, float]]] | None = None):
        self.name, self.total_steps = name, total_steps
        self.every = log_interval(total_steps, every)
        self.watch = watch
        self.writer = event_writer(folder) if folder is not None else None
        self.window: list[float] = []
        self.started = time.perf_counter()

    def step(self, step: int, loss: float, lr: float) -> None:
        """Record optimisation step ``step`` (1-based) with its loss and the learning rate it used."""
        self.window.append(loss)
        if self.writer is not None:
            self.writer.add_scalar(f"{self.name}/loss", loss, step)
            self.writer.add_scalar(f"{self.name}/lr", lr, step)
        if step % self.every and step != self.total_steps:
            return
        mean = sum(self.window) / len(self.window)
        self.window = []
        watched = self.watch() if self.watch is not None else {}
        elapsed = time.perf_counter() - self.started
        ranges = "; ranges " + ", ".join(f"{k} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in watched.items())
        log.info("%s step %d/%d loss %.4f lr %.2e (%.0f s)%s", self.name, step, self.total_steps, mean, lr, elapsed,
                 ranges if watched else "")
        if self.writer is not None:
            for key, (lo, hi) in watched.items():
                self.writer.add_scalar(f"{self.name}/range/{key}/lo", lo, step)
                self.writer.add_scalar(f"{self.name}/range/{key}/hi", hi, step)

    def close(self) -> None:
        """Flush and close the event files."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


WATCHED_SITES = ("embeddings.sum", "layer.0.ffn.output", "layer.{last}.ffn.output", "layer.0.ffn.input",
                 "layer.{last}.ffn.input", "layer.{last}.ffn.output.weight")
"""The quantizers whose ranges a QAT run logs (the first :data:`WATCHED_MOST` a recipe quantizes): the
embedding sum, the first and last FFN outputs (where the outliers live), FFN inputs, one weight matrix."""
WATCHED_MOST = 4


def watched_ranges(quantizers: dict[str, Any]) -> Callable[[], dict[str, tuple[float, float]]] | None:
    """``watch`` for :class:`TrainingLog`: the representable range ``(lo, hi)`` of the
    :data:`WATCHED_SITES` among ``quantizers`` (site name -> quantizer), or None when none is there."""
    layers = [int(name.split(".")[1]) for name in quantizers if name.startswith("layer.")]
    last = max(layers, default=0)
    names = [n for n in (site.format(last=last) for site in WATCHED_SITES) if n in quantizers][:WATCHED_MOST]
    if not names:
        return None

    def watch() -> dict[str, tuple[float, float]]:
        ranges = {}
        for name in names:
            lo, hi = quantizers[name].quant_range()
            ranges[name] = (float(lo.min()), float(hi.max()))
        return ranges

    return watch
