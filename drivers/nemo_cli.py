"""NeMo's own CLI (`nemo llm ...`, `nemo dllm ...`) in the nemo venv, as a user runs the recipes."""

from __future__ import annotations

import subprocess

from tools import envs


def run_nemo(*args: str, timeout: float, quiet: bool = False) -> None:
    """`nemo ARGS --direct --yes` from the repo root; raises if it fails. `quiet`: its stdout is dropped."""
    nemo = envs.ensure("nemo").with_name("nemo")  # builds or links the venv first, as `make` does
    subprocess.run([str(nemo), *args, "--direct", "--yes"], cwd=envs.ROOT, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL if quiet else None)
