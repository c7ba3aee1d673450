"""vLLM's worker with the block-diffusion model runner (`--worker-cls vllm_blockdiff.worker.BlockDiffusionWorker`):
the CPU worker here; on CUDA the GPU worker (reviewed, not run: no GPU)."""

from __future__ import annotations

from unittest import mock

import torch
from vllm.platforms import current_platform
from vllm.v1.worker import cpu_worker, gpu_worker

from vllm_blockdiff.model_runner import BlockDiffusionGPUModelRunner, BlockDiffusionModelRunner

V1_ONLY = "block diffusion runs on vLLM's V1 model runner; set VLLM_USE_V2_MODEL_RUNNER=0"


class RecordsMixin:
    def save_records(self, path: str) -> int:
        """Write the runner's recorded denoising steps (see model_runner.RECORD_ENV) to `path` with torch.save and
        forget them; for `LLM.collective_rpc("save_records", args=(path,))`. Returns how many there were."""
        records = self.model_runner.take_records()
        torch.save(records, path)
        return len(records)


class BlockDiffusionCPUWorker(RecordsMixin, cpu_worker.CPUWorker):
    def init_device(self) -> None:
        if self.use_v2_model_runner:
            raise ValueError(V1_ONLY)
        # CPUWorker builds its runner inside init_device, by this module-level name
        with mock.patch.object(cpu_worker, "CPUModelRunner", BlockDiffusionModelRunner):
            super().init_device()


class BlockDiffusionGPUWorker(RecordsMixin, gpu_worker.Worker):
    def _make_model_runner(self) -> BlockDiffusionGPUModelRunner:
        if self.use_v2_model_runner:
            raise ValueError(V1_ONLY)
        return BlockDiffusionGPUModelRunner(self.vllm_config, self.device)


BlockDiffusionWorker = BlockDiffusionCPUWorker if current_platform.is_cpu() else BlockDiffusionGPUWorker
