"""Rich progress bars for training and evaluation, silent when nobody is watching."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[..., None]


class Reporter:
    """Hands out progress bars; with ``enabled=False`` (tests, workers) every bar is a no-op."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Advance]:
        """A bar for ``total`` steps; the yielded function advances it and may set a ``info`` text."""
        if not self.enabled:
            yield lambda n=1, info="": None
            return
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        with progress:
            task = progress.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str = "") -> None:
                progress.update(task, advance=n, info=info)

            yield advance


SILENT = Reporter(enabled=False)
