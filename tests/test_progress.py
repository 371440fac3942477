"""Progress output: plain lines when not a terminal, at the start, every 10% (not closer than a few seconds),
after a quiet interval and at the end."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from qbert.progress import LINE_GAP_S, LineProgress, Reporter, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_duration_reads_as_hours_minutes_seconds():
    assert [duration(s) for s in (0, 59.4, 61, 3600, 3725)] == ["0s", "59s", "1m01s", "1h00m", "1h02m"]


def test_a_slow_stage_prints_every_ten_percent_with_elapsed_and_eta():
    out, clock = io.StringIO(), Clock()
    progress = LineProgress("fine-tune", 100, out, clock=clock)
    progress.emit()
    for _ in range(100):
        clock.now += 1.0  # one step per second: every 10% is 10 s after the last line
        progress.advance(1, info="loss 0.5")
    lines = out.getvalue().splitlines()
    assert lines[0] == "fine-tune: 0/100 (0%), 0s elapsed"
    assert len(lines) == 11
    assert lines[1] == "fine-tune: 10/100 (10%), loss 0.5, 10s elapsed, eta 1m30s"
    assert lines[-1] == "fine-tune: 100/100 (100%), loss 0.5, 1m40s elapsed"


def test_a_fast_stage_prints_its_start_and_end_only():
    out, clock = io.StringIO(), Clock()
    progress = LineProgress("calibrate", 16, out, clock=clock)
    progress.emit()
    for _ in range(16):
        clock.now += LINE_GAP_S / 20
        progress.advance(1)
    assert [line.split(":")[1].split(",")[0] for line in out.getvalue().splitlines()] == [" 0/16 (0%)", " 16/16 (100%)"]


def test_a_long_percent_step_still_prints_after_the_interval():
    out, clock = io.StringIO(), Clock()
    progress = LineProgress("QAT", 1000, out, clock=clock, interval_s=30)
    progress.emit()
    for _ in range(20):  # 2% of the work in 100 s: no 10% boundary, but three 30 s intervals
        clock.now += 5.0
        progress.advance(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[1].startswith("QAT: 6/1000 (0%)") and "30s elapsed" in lines[1]


def test_reporter_prints_lines_to_a_file_and_nothing_when_disabled():
    out = io.StringIO()
    reporter = Reporter(Console(file=out, force_terminal=False))
    with reporter.bar("evaluate", 3) as advance:
        for _ in range(3):
            advance(1)
    assert out.getvalue().splitlines()[0].startswith("evaluate: 0/3")
    assert out.getvalue().splitlines()[-1].startswith("evaluate: 3/3 (100%)")
    quiet = io.StringIO()
    with Reporter(Console(file=quiet), enabled=False).bar("evaluate", 3) as advance:
        advance(3)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("enabled", [True, False])
def test_a_swallowed_sigterm_stops_the_next_step(enabled):
    """The SIGTERM handler raises in whatever code runs; code that swallows every exception (it happened in
    the middle of importing transformers) must not let the run go on: the next step of any bar raises again."""
    import signal

    from qbert.errors import Terminated, terminate_as_interrupt

    previous = terminate_as_interrupt()
    try:
        swallowed = False
        try:
            signal.raise_signal(signal.SIGTERM)  # the handler runs as soon as this call returns
        except Terminated:  # what the library code that swallows it does
            swallowed = True
        assert swallowed
        reporter = Reporter(Console(file=io.StringIO()), enabled=enabled, lines=True)
        with reporter.bar("fine-tune", 3) as advance, pytest.raises(Terminated):
            advance()
    finally:
        signal.signal(signal.SIGTERM, previous)
        terminate_as_interrupt()  # a fresh handler forgets the signal: the next bar in this process runs
        signal.signal(signal.SIGTERM, previous)
    with Reporter(enabled=False).bar("evaluate", 1) as advance:
        advance()


FINALIZERS = """
import signal, sys
from qbert.errors import Terminated, terminate_as_interrupt
from qbert.progress import Reporter

class Finalized:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the handler raises Terminated inside the finalizer

class Failing:
    def __del__(self):
        raise ValueError("any other exception in a finalizer is still reported")

terminate_as_interrupt()
Finalized()  # collected at once: its __del__ runs, the exception cannot propagate
print("went on", file=sys.stderr)
try:
    with Reporter(enabled=False).bar("fine-tune", 3) as advance:
        advance()
except Terminated:
    print("stopped at the next step", file=sys.stderr)
Failing()
"""


def test_a_sigterm_in_a_finalizer_prints_nothing_and_still_stops_the_next_step():
    """A SIGTERM landing in a ``__del__`` (seen in the regex package's, under garbage collection) cannot propagate:
    Python would print "Exception ignored ... Traceback"; qbert keeps stderr clean and the next step raises. Run
    in a process of its own (pytest replaces the hook that prints unraisable exceptions)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FINALIZERS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[:2] == ["went on", "stopped at the next step"], done.stderr
    assert "Terminated" not in done.stderr and "any other exception in a finalizer is still reported" in done.stderr
