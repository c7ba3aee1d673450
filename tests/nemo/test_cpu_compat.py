"""The CPU patches of megatron-core (`nemo_dllm.cpu_compat`): each is needed on this machine, each works, and with
a GPU present `apply()` leaves megatron-core untouched. Every check runs in a fresh interpreter, since the patches
are process-wide."""

import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_megatron_touches_cuda_without_the_patches():
    out = run("""
        import torch
        from megatron.core import utils
        utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "scratch")
    """)
    assert out.returncode != 0 and ("CUDA" in out.stderr or "cuda" in out.stderr), out.stderr[-2000:]


def test_the_patches_put_megatrons_buffer_and_rng_tracker_on_the_cpu():
    out = run("""
        import torch
        from nemo_dllm import cpu_compat
        assert cpu_compat.apply() and cpu_compat.apply()  # idempotent
        from megatron.core import utils
        from megatron.core.tensor_parallel import random
        buffer = utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "scratch")
        assert buffer.device.type == "cpu" and buffer.shape == (2, 3)
        tracker = random.get_cuda_rng_tracker()
        tracker.add("model-parallel-rng", 1234)
        torch.manual_seed(0)
        outer = torch.rand(3)
        torch.manual_seed(0)
        with tracker.fork():
            inside = torch.rand(3)
        assert torch.equal(torch.rand(3), outer)  # the fork left the default stream where it was
        with tracker.fork():
            assert not torch.equal(torch.rand(3), inside)  # and the forked stream moved on
        expected = torch.Generator().manual_seed(1234)
        assert torch.equal(inside, torch.rand(3, generator=expected))
    """)
    assert out.returncode == 0, out.stderr[-3000:]


def test_with_a_gpu_apply_changes_nothing():
    out = run("""
        import torch
        torch.cuda.is_available = lambda: True
        from megatron.core import utils
        from megatron.core.tensor_parallel import random
        before = (random.CudaRNGStatesTracker, utils.GlobalMemoryBuffer.get_tensor)
        from nemo_dllm import cpu_compat
        assert cpu_compat.apply() is False
        assert (random.CudaRNGStatesTracker, utils.GlobalMemoryBuffer.get_tensor) == before
    """)
    assert out.returncode == 0, out.stderr[-3000:]
