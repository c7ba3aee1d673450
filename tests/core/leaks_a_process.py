"""Not collected by the core suite (no test_ prefix): tests/core/test_test_runner.py runs it through tools/test.py as a
suite that leaves a process running."""

import subprocess
import sys

LEAKED = "blockdiff-leaked-by-a-test"  # in the leaked process's command line, to find it by


def test_starts_a_process_and_leaves_it_running():
    # a session of its own: pytest's end does not stop it, as Megatron's forked writer outlived a killed trainer
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", LEAKED], start_new_session=True)
