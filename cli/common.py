"""Helpers shared by the command modules: one-line errors and the consoles."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import typer


@contextlib.contextmanager
def user_errors(source: object = None) -> Iterator[None]:
    """Turn a QbertError (bad input) or an OSError (the file system: read-only, full, missing) into
    ``error: <one line>`` on stderr and exit status 2; any other exception is a bug: one line saying so,
    exit status 1, its traceback written to a file the line names. No traceback reaches the terminal.

    ``source`` (the config file) names the file in errors raised without one.
    """
    from qbert.errors import QbertError, Terminated

    try:
        yield
    except QbertError as exc:
        if exc.source is None and source is not None:
            exc.source = str(source)
        print(f"error: {exc.render()}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as exc:
        print("interrupted: finished seeds are kept; rerun the same command to resume", file=sys.stderr)
        raise typer.Exit(128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)) from None
    except OSError as exc:
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except Exception as exc:
        inner = io_error_in(exc)
        if inner is not None:  # a library's own error type for a file-system error (full disk, read-only)
            print(f"error: {os_error_line(inner)}", file=sys.stderr)
            raise typer.Exit(2) from None
        log = _crash_log()  # a bug: one line here, the traceback in a file
        print(f"error: internal error (a bug in qbert; please report it with {log}): "
              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        raise typer.Exit(1) from None


_OS_HINTS = {
    errno.EACCES: "make it writable, or choose another folder (--runs-dir or QBERT_RUNS_DIR for results)",
    errno.EPERM: "make it writable, or choose another folder (--runs-dir or QBERT_RUNS_DIR for results)",
    errno.EROFS: "the file system is read-only: choose another folder (--runs-dir or QBERT_RUNS_DIR for results)",
    errno.ENOSPC: "the disk is full: free space and rerun the same command (finished seeds are kept)",
    errno.EDQUOT: "the disk quota is exceeded: free space and rerun the same command (finished seeds are kept)",
    errno.ENAMETOOLONG: "the name is longer than the file system allows: shorten it",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


_OS_ERROR_TEXT = re.compile(r"(?:I/O error: )?([^:]*?) \(os error (\d+)\)")
"""How Rust libraries (safetensors, tokenizers) spell an operating-system error inside their own exceptions."""


def io_error_in(exc: BaseException) -> OSError | None:
    """The file-system error behind a library exception: an OSError it was raised from (``raise ... from``;
    not one it merely happened while handling), or one it only names in its message (``SafetensorError: ...
    I/O error: No space left on device (os error 28)``); else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__
    match = _OS_ERROR_TEXT.search(str(exc))
    return OSError(int(match.group(2)), match.group(1).strip()) if match else None


def os_error_line(exc: OSError) -> str:
    """``<file>: <what the system said> (<what to do>)`` for a file-system error."""
    where = exc.filename if exc.filename is not None else "file system"
    if isinstance(where, str) and len(where) > 120:
        where = f"{where[:100]}... ({len(where):,} chars)"
    hint = _OS_HINTS.get(exc.errno or 0)
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}" + (f" ({hint})" if hint else "")


def _crash_log() -> str:
    """Write the current exception's traceback to a file; its path."""
    import tempfile
    import time
    import traceback

    path = Path(tempfile.gettempdir()) / f"qbert-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.write_text(traceback.format_exc(), encoding="utf-8")
    except OSError:
        traceback.print_exc()
        return "the traceback above"
    return str(path)


RUNS_DIR_HELP = "Results folder (default: $QBERT_RUNS_DIR or ./runs)."
