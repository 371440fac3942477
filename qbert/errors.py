"""The one exception type user-facing code raises for bad input, and the termination signal as an interrupt."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


class QbertError(Exception):
    """An error caused by the user's input (config, data, model): printed as one line, no traceback.

    The message says what is wrong, where (file and dotted key when known) and how to fix it.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.message = message
        self.source = source
        self.key = key
        super().__init__(self.render())

    def render(self) -> str:
        """One line: ``<file>: <key>: <message>`` with the parts that are known."""
        parts = [p for p in (self.source, self.key) if p]
        return ": ".join([*parts, self.message])


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM), handled as Ctrl-C is: the seed being run is marked interrupted."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by signal {signum}")


def terminate_as_interrupt() -> Any:
    """Make SIGTERM (a scheduler's time limit, `timeout`, `kill`, a sweep stopping its workers) stop this
    process as Ctrl-C does: the seed being run is marked interrupted instead of dying mid-write. Returns the
    previous handler (for ``signal.signal`` to restore). Only the main thread can install a signal handler;
    elsewhere this does nothing and returns None."""
    import signal
    import threading

    def handler(signum: int, frame: object) -> None:
        global _terminated_by
        _terminated_by = signum
        raise Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        global _terminated_by
        _terminated_by = None
        _quiet_in_finalizers()
        return signal.signal(signal.SIGTERM, handler)
    return None


def _quiet_in_finalizers() -> None:
    """A SIGTERM that lands while a finalizer runs (a ``__del__``, e.g. the ``regex`` package's during garbage
    collection) raises :class:`Terminated` where Python cannot propagate it: it prints "Exception ignored in ...
    Traceback" and goes on. The signal is recorded all the same and raised again at the next step of any
    progress bar (:func:`raise_if_terminated`), so such a report says nothing: leave it out, pass the rest on."""
    import sys

    hook = sys.unraisablehook
    if getattr(hook, "_qbert_quiet", False):
        return

    def quiet(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Terminated):
            return
        hook(unraisable)

    quiet._qbert_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = quiet


_terminated_by: int | None = None
"""The termination signal this process received (see :func:`raise_if_terminated`), or None."""


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` again when a termination signal came but its exception never got through:
    the handler raises it in whatever Python code runs at that moment, and code that catches every exception
    or C code that clears a pending error (seen in the middle of importing transformers on a loaded machine)
    swallowed it, so the run went on training for minutes. Long loops call this at every step through their
    progress bars (:meth:`qbert.progress.Reporter.bar`)."""
    if _terminated_by is not None:
        raise Terminated(_terminated_by)


def stacks_on_sigusr1() -> None:
    """Make ``kill -USR1 <pid>`` print every thread's Python stack to stderr, the process going on (what a run
    that looks stuck is doing; a sweep's workers too)."""
    import faulthandler
    import signal
    import sys

    try:  # the process's own stderr: sys.stderr may be a capture without a file descriptor (tests, notebooks)
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError) as exc:  # no stderr (io.UnsupportedOperation is an OSError)
        logging.getLogger("qbert").debug("no stacks on SIGUSR1: stderr has no file descriptor (%s)",
                                         type(exc).__name__)


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """:func:`terminate_as_interrupt` for the duration of a block, then the previous handler again (a sweep
    worker: while it runs a seed SIGTERM interrupts the seed; idle, it simply ends, with no traceback)."""
    import signal

    previous = terminate_as_interrupt()
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def warn(log: logging.Logger, message: str, *args: object) -> None:
    """A warning the user must see: ``warning: ...`` on stderr, and in the seed's ``run.log`` during a run.

    (Logging alone reaches the console only when no handler is configured; a run attaches its log file.)
    """
    import sys

    text = message % args if args else message
    if logging.getLogger().handlers:
        log.warning(text)
    print(f"warning: {text}", file=sys.stderr)
