"""vLLM's CPU worker with the block-diffusion model runner
(`--worker-cls vllm_blockdiff.worker.BlockDiffusionWorker`)."""

from __future__ import annotations

from unittest import mock

import torch

from vllm.v1.worker import cpu_worker

from vllm_blockdiff.model_runner import BlockDiffusionModelRunner


class BlockDiffusionWorker(cpu_worker.CPUWorker):
    def init_device(self) -> None:
        if self.use_v2_model_runner:
            raise ValueError("block diffusion runs on vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        # CPUWorker builds its runner inside init_device; it is the one line that differs
        with mock.patch.object(cpu_worker, "CPUModelRunner", BlockDiffusionModelRunner):
            super().init_device()

    def save_records(self, path: str) -> int:
        """Write the runner's recorded denoising steps (see model_runner.RECORD_ENV) to `path` with torch.save and
        forget them; for `LLM.collective_rpc("save_records", args=(path,))`. Returns how many there were."""
        records = self.model_runner.take_records()
        torch.save(records, path)
        return len(records)
