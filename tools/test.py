"""Run the whole test suite: each stack's tests in that stack's own venv (built first if needed).

    python3 tools/test.py              # lint, then every suite
    python3 tools/test.py core vllm    # some suites; extra pytest arguments after --

`lint` is ruff over the tree (pyproject.toml's [tool.ruff], core venv). The other suites are the folders under tests/:
tests/core runs in the core venv, tests/vllm in the vllm venv, and so on. Each
suite's output streams as it runs, and a suite still running after SUITE_TIMEOUT seconds is stopped and counted as
failed (CI must not hang). A suite that leaves a process running after it ends fails too: such a process (a forked
writer, a server outside any fixture) can hold the cores or hang a CI job; it is named and killed (leftover_processes,
which conformance.run's steps use as well). The last line sums all suites up as "N passed, N failed".
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time

import envs  # this folder: python3 tools/test.py puts it first on the path
import leftover_processes

SUITES = {name: envs.ROOT / "tests" / name for name in envs.RECIPES}
LINT = "lint"
SUITE_TIMEOUT = 30 * 60
RESULT_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", help=f"any of: {LINT}, {', '.join(SUITES)} (default: all that exist)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, pytest_args = parser.parse_args(argv[:split]), argv[split + 1:]
    names = args.suites or [LINT, *(n for n, d in SUITES.items() if d.is_dir())]
    for n in names:
        if n != LINT and (n not in SUITES or not SUITES[n].is_dir()):
            raise SystemExit(f"test: no suite {n!r}; suites: {', '.join(n for n, d in SUITES.items() if d.is_dir())}")
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed_suites = []
    for name in names:
        py = envs.ensure("core" if name == LINT else name)
        print(f"\n===== suite {name} ({py}) =====", flush=True)
        start = time.time()
        names_paths = any((envs.ROOT / a.split("::")[0]).exists() for a in pytest_args if not a.startswith("-"))
        if name == LINT:
            cmd = ["-m", "ruff", "check", "."]
        else:
            cmd = ["-m", "pytest", *([] if names_paths else [str(SUITES[name])]), *pytest_args]
        mark, env = leftover_processes.marked_environment(name)
        proc = subprocess.Popen([str(py), *cmd], cwd=envs.ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timer = threading.Timer(SUITE_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        last = ""  # pytest's summary line: the last that counts results (an interpreter may warn after it)
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            last = line if RESULT_COUNT.search(line) else last
        proc.wait()
        timer.cancel()
        if time.time() - start >= SUITE_TIMEOUT:
            print(f"===== suite {name}: stopped after {SUITE_TIMEOUT} s =====", flush=True)
        left = leftover_processes.kill_left_running(mark)
        for pid, command in left.items():
            print(f"===== suite {name} left process {pid} running (killed): {command[:300]}", flush=True)
        summary = last.strip()
        counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
        for count, word in RESULT_COUNT.findall(summary):
            counts["error" if word.startswith("error") else word] += int(count)
        if proc.returncode != 0 or left:  # exit 5 is "no tests ran": a suite that tests nothing fails
            failed_suites.append(name)
            counts["error"] = max(counts["error"], 1 - counts["failed"])
        for key, value in counts.items():
            totals[key] += value
        print(f"===== suite {name}: exit {proc.returncode} in {time.time() - start:.0f} s =====", flush=True)
    failed = totals["failed"] + totals["error"]
    if failed_suites:
        print(f"\nfailing suites: {', '.join(failed_suites)}")
    print(f"\n{totals['passed']} passed, {failed} failed, {totals['skipped']} skipped")
    return 1 if failed_suites else 0


if __name__ == "__main__":
    sys.exit(main())
