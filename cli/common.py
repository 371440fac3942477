"""Helpers shared by the command modules: one-line errors and the consoles."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer


@contextlib.contextmanager
def user_errors(source: object = None) -> Iterator[None]:
    """Turn a QbertError into ``error: <one line>`` on stderr and exit status 2 (no traceback).

    ``source`` (the config file) names the file in errors raised without one.
    """
    from qbert.errors import QbertError

    try:
        yield
    except QbertError as exc:
        if exc.source is None and source is not None:
            exc.source = str(source)
        print(f"error: {exc.render()}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print("interrupted: finished seeds are kept; rerun the same command to resume", file=sys.stderr)
        raise typer.Exit(130) from None


RUNS_DIR_HELP = "Results folder (default: $QBERT_RUNS_DIR or ./runs)."
