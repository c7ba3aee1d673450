"""tools/test.py, the command behind `make test`: a suite that leaves a process running after it ends fails, and the
process is named and killed."""

import re
import subprocess
import sys
from pathlib import Path

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
    fields = stat_fields(int(left[0]))
    assert fields is None or fields[0] == "Z"  # gone, or dead and not yet reaped
    assert "failing suites: core" in run.stdout
