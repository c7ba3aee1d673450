"""The engine arguments that switch block diffusion on in vLLM, for `LLM(...)`/`AsyncEngineArgs` and the server."""

from __future__ import annotations

from typing import Any

SCHEDULER_CLS = "vllm_blockdiff.scheduler.BlockDiffusionScheduler"
WORKER_CLS = "vllm_blockdiff.worker.BlockDiffusionWorker"
REQUEST_GUARD = "blockdiff.http_guard.RequestGuard"  # body size limit, JSON bodies that are objects
# "0" in the server's environment: one denoising forward per engine step (see model_runner)
DENOISE_LOOP_ENV = "VLLM_BLOCKDIFF_DENOISE_LOOP"


def engine_kwargs(**overrides: Any) -> dict[str, Any]:
    """`LLM(model=..., **engine_kwargs())`: this plugin's scheduler and worker; no prefix caching (the scheduler
    rolls computed tokens back over the scratch canvas) and no async scheduling (a step's commits decide the next
    step's inputs)."""
    return {"scheduler_cls": SCHEDULER_CLS, "worker_cls": WORKER_CLS, "enable_prefix_caching": False,
            "async_scheduling": False, **overrides}


def server_args() -> list[str]:
    """The same settings as `vllm serve` flags, and the request guard in front of the server."""
    return ["--scheduler-cls", SCHEDULER_CLS, "--worker-cls", WORKER_CLS, "--no-enable-prefix-caching",
            "--no-async-scheduling", "--middleware", REQUEST_GUARD]
