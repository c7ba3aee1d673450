"""How the sglang suite launches SGLang's server on this CPU (see docs/environments.md)."""

import sys
from pathlib import Path

CPU_ENV = {"SGLANG_USE_CPU_ENGINE": "1"}
CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
             "--dtype", "float32", "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill",
             "disabled", "--skip-server-warmup", "--host", "127.0.0.1"]


def launch_command(model: Path, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--port", str(port), *flags,
            *CPU_FLAGS]
