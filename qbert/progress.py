"""Progress of long work: rich bars in a terminal, plain lines when the output goes to a file.

A line is printed when a stage starts, at every ``step_percent`` of it (unless the last line is under
:data:`LINE_GAP_S` old), whenever ``interval_s`` seconds passed since the last line, and when it ends, so a
run piped to a log is never silent for long and a short stage takes two lines.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from qbert.errors import raise_if_terminated

Advance = Callable[..., None]

LINE_INTERVAL_S = 30.0
"""Most seconds between two progress lines of a running stage (not a terminal)."""
LINE_GAP_S = 5.0
"""Fewest seconds between two lines for a percent step: a short stage prints its start and end only."""


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LineProgress:
    """The plain-text progress of one stage: ``advance(n, info)`` prints a line when one is due."""

    def __init__(self, description: str, total: int, out: TextIO, *, interval_s: float = LINE_INTERVAL_S,
                 step_percent: int = 10, clock: Callable[[], float] = time.monotonic):
        self.description, self.total, self.out = description, max(0, total), out
        self.interval_s, self.step_percent, self.clock = interval_s, step_percent, clock
        self.done, self.info = 0, ""
        self.started = self.last_line = clock()
        self.last_percent = 0

    def line(self) -> str:
        """The line for the current state: done/total, percent, info, elapsed and, once begun, the eta."""
        elapsed = self.clock() - self.started
        percent = 100 * self.done // self.total if self.total else 100
        parts = [f"{self.description}: {self.done}/{self.total} ({percent}%)"]
        if self.info:
            parts.append(self.info)
        parts.append(f"{duration(elapsed)} elapsed")
        if 0 < self.done < self.total:
            parts.append(f"eta {duration(elapsed / self.done * (self.total - self.done))}")
        return ", ".join(parts)

    def emit(self) -> None:
        self.out.write(self.line() + "\n")
        self.out.flush()
        self.last_line = self.clock()

    def advance(self, n: int = 1, info: str = "") -> None:
        """``n`` more steps done; prints at each ``step_percent`` boundary, after ``interval_s`` and at the end."""
        self.done = min(self.total, self.done + n)
        if info:
            self.info = info
        percent = 100 * self.done // self.total if self.total else 100
        boundary = percent // self.step_percent * self.step_percent
        since = self.clock() - self.last_line
        step_due = boundary > self.last_percent and since >= LINE_GAP_S
        if self.done >= self.total or step_due or since >= self.interval_s:
            self.last_percent = boundary
            self.emit()


class Reporter:
    """Hands out progress: bars in a terminal, lines otherwise; ``enabled=False`` (tests, ``--quiet``)
    makes every bar a no-op."""

    def __init__(self, console: Console | None = None, enabled: bool = True, *, lines: bool | None = None,
                 interval_s: float = LINE_INTERVAL_S):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.lines = (not self.console.is_terminal) if lines is None else lines
        self.interval_s = interval_s

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Advance]:
        """Progress over ``total`` steps; the yielded function advances it and may set an ``info`` text."""
        if not self.enabled:
            yield _checked(lambda n=1, info="": None)
            return
        if self.lines:
            progress = LineProgress(description, total, self.console.file or sys.stderr, interval_s=self.interval_s)
            progress.emit()
            yield _checked(progress.advance)
            if progress.done < progress.total:  # ended early (an error, or fewer steps than announced)
                progress.emit()
            return
        bars = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        with bars:
            task = bars.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str = "") -> None:
                bars.update(task, advance=n, info=info)

            yield _checked(advance)


def _checked(advance: Advance) -> Advance:
    """``advance`` that first re-raises a termination whose exception was swallowed (every long loop advances
    a bar at every step): :func:`qbert.errors.raise_if_terminated`."""

    def checked(n: int = 1, info: str = "") -> None:
        raise_if_terminated()
        advance(n, info)

    return checked


SILENT = Reporter(enabled=False)


class _LogLines:
    """A text stream that hands each complete line written to it to ``logger`` at INFO."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.partial = logger, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info("%s", line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def log_reporter(logger: logging.Logger) -> Reporter:
    """Progress as INFO lines of ``logger``, at the plain-line pace (every 10%, at least every
    :data:`LINE_INTERVAL_S`): for a sweep's seeds, which have no terminal; the lines land in the seed's
    ``run.log``, whose last line the sweep's progress line shows."""
    return Reporter(Console(file=_LogLines(logger)), lines=True)  # type: ignore[arg-type]
