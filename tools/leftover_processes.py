"""Processes a step of `make test` leaves running after it ends: a forked writer or a server outside any fixture can
hold the 2 cores or hang a CI job. A step's command runs with a mark in its environment, which every process it starts
inherits; after the step, the live processes still carrying the mark are named and killed, and the step fails.
Standard library only: tools/test.py and conformance.run both run on the system Python.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

MARK_VARIABLE = "BLOCKDIFF_MAKE_TEST_STEP"  # a suite of tools/test.py or a step of conformance.run
GRACE = 10  # seconds for the processes stopped at a step's end to exit


def marked_environment(step: str) -> tuple[str, dict[str, str]]:
    """A mark unique to this run of `step`, and the environment to start the step's command in."""
    mark = f"{step}-{os.getpid()}-{time.time_ns()}"
    return mark, {**os.environ, MARK_VARIABLE: mark}


def left_running(mark: str) -> dict[int, str]:
    """Command lines of the live processes whose environment holds `mark` (a zombie's environment reads empty)."""
    entry, found = f"{MARK_VARIABLE}={mark}".encode(), {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry in environ.read_bytes().split(b"\0"):
                command = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                found[int(environ.parent.name)] = command.decode(errors="replace")
        except OSError:  # ended while we looked
            continue
    return found


def kill_left_running(mark: str) -> dict[int, str]:
    """After up to GRACE seconds for them to exit, kill the processes still carrying `mark` and wait (up to GRACE
    again) until they are gone, so the next step starts with the cores free; their command lines."""
    left = _running_after(mark, GRACE)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _running_after(mark, GRACE)
    return left


def _running_after(mark: str, seconds: float) -> dict[int, str]:
    """`left_running(mark)` once none is left or `seconds` have passed."""
    deadline = time.time() + seconds
    while (left := left_running(mark)) and time.time() < deadline:
        time.sleep(0.1)
    return left
