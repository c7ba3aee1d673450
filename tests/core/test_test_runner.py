"""`make test` fails on a process left running: tools/test.py's suites and conformance.run's steps each name and kill
what they leave (tools/leftover_processes)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from leaks_a_process import LEAKED  # this folder

from drivers.processes import stat_fields

ROOT = Path(__file__).resolve().parents[2]


def test_a_suite_that_leaves_a_process_running_fails_and_the_process_is_killed():
    suite = ["core", "--", "tests/core/leaks_a_process.py"]
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "test.py"), *suite], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-3000:]
    assert "1 passed" in run.stdout  # the test itself passed: the leak alone fails the suite
    left = re.findall(rf"suite core left process (\d+) running \(killed\): .*{LEAKED}", run.stdout)
    assert len(left) == 1, run.stdout[-3000:]
    assert _gone(int(left[0]))
    assert "failing suites: core" in run.stdout


def test_a_conformance_step_that_leaves_a_process_running_fails_naming_it(monkeypatch, capsys):
    from conformance import run
    from tools import leftover_processes

    monkeypatch.setattr(leftover_processes, "GRACE", 1)
    # its output elsewhere, as a server's log: a leaked process holding the step's pipes would hold the step too
    leaks = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', " \
            f"'{LEAKED}'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
    with pytest.raises(SystemExit, match="conformance: a leaking step left 1 process"):
        run.step("a leaking step", [sys.executable, "-c", leaks])
    left = re.findall(rf"a leaking step left process (\d+) running \(killed\): .*{LEAKED}", capsys.readouterr().out)
    assert len(left) == 1
    assert _gone(int(left[0]))


def _gone(pid: int) -> bool:
    """Gone, or dead and not yet reaped: tools/leftover_processes returns only once what it killed is."""
    fields = stat_fields(pid)
    return fields is None or fields[0] == "Z"
