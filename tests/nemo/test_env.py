"""The nemo venv as tools/envs.py builds it: NeMo 2.x's `nemo llm` CLI and megatron-core 0.16 import and run on CPU,
and this project's `nemo_run.cli` namespace is declared."""

import subprocess
import sys
from importlib.metadata import entry_points, version
from pathlib import Path

import torch


def test_pins():
    assert torch.__version__.startswith("2.13.0")
    assert version("nemo-toolkit") == "2.7.3" and version("megatron-core") == "0.16.1"
    assert version("transformers").startswith("4.57")


def test_nemo_llm_cli_runs():
    nemo = Path(sys.executable).parent / "nemo"
    out = subprocess.run([str(nemo), "llm", "--help"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pretrain" in out.stdout and "finetune" in out.stdout


def test_this_projects_cli_namespace_is_declared():
    eps = {e.name: e.value for e in entry_points(group="nemo_run.cli")}
    assert eps.get("llm") == "nemo.collections.llm" and eps.get("dllm") == "nemo_dllm"


def test_core_imports_next_to_megatron():
    import megatron.core  # noqa: F401

    from blockdiff.losses import diffusion_loss  # noqa: F401  (the core runs on NeMo's transformers 4.57 too)
    from blockdiff.models import load_model  # noqa: F401
