"""The command lines that start each stack's server on a model from any venv (benchmarks, the lm-eval check): vLLM's
OpenAI server with this plugin (`blockdiff-vllm-serve`) or plain, and SGLang's with `--dllm-algorithm BlockDiff` or
its own AR path, each in the venv tools/envs.py builds for it, with the environment it needs on this CPU."""

from __future__ import annotations

import json
from pathlib import Path

from tools import envs

ENV = {"vllm": {"VLLM_CPU_KVCACHE_SPACE": "2"}, "sglang": {"SGLANG_USE_CPU_ENGINE": "1"}}


def vllm_command(model: Path, port: int, block_diffusion: bool, context_length: int = 512) -> list[str]:
    # no prefix caching for AR either: the plugin runs without it, and the repeats send the same prompts
    args = ["--model", str(model), "--served-model-name", "m", "--dtype", "float32", "--enforce-eager",
            "--max-model-len", str(context_length), "--host", "127.0.0.1", "--port", str(port),
            "--no-enable-prefix-caching"]
    if block_diffusion:
        return [str(envs.venv_python("vllm").with_name("blockdiff-vllm-serve")), *args]
    # plain vLLM: its own API server entry (`vllm serve` fails in the vllm-cpu build, see docs/environments.md)
    code = ("import sys; from vllm.entrypoints.launchers.api_server.entry import main; "
            "sys.argv = ['vllm-serve', *sys.argv[1:]]; main()")
    return [str(envs.venv_python("vllm")), "-c", code, *args]


def sglang_command(model: Path, port: int, block_diffusion: bool, context_length: int = 512) -> list[str]:
    from drivers.sglang_cpu import CPU_FLAGS

    flags = ["--context-length", str(context_length), "--max-running-requests", "16", "--max-total-tokens", "16384",
             "--served-model-name", "m"]
    if block_diffusion:
        flags += ["--dllm-algorithm", "BlockDiff"]
    return [str(envs.venv_python("sglang")), "-m", "sglang.launch_server", "--model-path", str(model), "--port",
            str(port), *flags, *CPU_FLAGS]


def dllm_algorithm_flags(config: Path, **settings: bool | int | float) -> list[str]:
    """SGLang's `--dllm-algorithm-config` carrying the plugin's `settings` (block_size, threshold, fuse_commit,
    denoise_loop), written as YAML to `config` (JSON scalars are YAML)."""
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    return ["--dllm-algorithm-config", str(config)]


COMMANDS = {"vllm": vllm_command, "sglang": sglang_command}
