"""The CPU patches of megatron-core and NeMo (`nemo_dllm.cpu_compat`): each is needed on this machine, each works,
and with a GPU present `apply()` leaves both untouched. Every check runs in a fresh interpreter, since the patches
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


def test_cuda_placements_are_needed_and_land_on_the_cpu():
    """Megatron's DDP allocates its gradient buffers with `device=torch.cuda.current_device()`; NeMo's strategy logs
    through `torch.tensor(x, pin_memory=True).to("cuda")`; Megatron's optimizer checks `param.type()`."""
    without = run("""
        import torch
        torch.zeros(3, device=torch.cuda.current_device())
    """)
    assert without.returncode != 0 and "cuda" in without.stderr.lower(), without.stderr[-2000:]
    out = run("""
        import torch
        from nemo_dllm import cpu_compat
        cpu_compat.apply()
        assert torch.zeros(3, device=torch.cuda.current_device()).device.type == "cpu"
        logged = torch.tensor(2.5, pin_memory=True).to("cuda", non_blocking=True)
        assert logged.device.type == "cpu" and logged.item() == 2.5
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).type() == "torch.cuda.FloatTensor" and torch.ones(2).long().type() == "torch.LongTensor"
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.current_stream())
        torch.cuda.synchronize()
    """)
    assert out.returncode == 0, out.stderr[-3000:]


def test_nemo_seeds_the_cpu_tracker_and_calls_megatrons_optimizer_with_what_it_takes():
    """NeMo 2.7.3 seeds Megatron's RNG tracker only when a CUDA device exists, and passes three keywords
    megatron-core 0.16.1's `get_megatron_optimizer` no longer takes."""
    out = run("""
        import inspect, torch
        from megatron.core import optimizer
        assert "lr_mult" not in inspect.signature(optimizer.get_megatron_optimizer).parameters
        from nemo_dllm import cpu_compat, parallel
        parallel.init(tp_size=1, seed=0)
        from megatron.core.tensor_parallel import random
        random.get_cuda_rng_tracker().reset()
        from nemo.lightning import megatron_init
        megatron_init._set_random_seed(1234)
        tracker = random.get_cuda_rng_tracker()
        assert tracker.is_initialized() and "model-parallel-rng" in tracker.get_states()
        model = torch.nn.Linear(2, 2)
        model.ddp_config = None
        try:
            optimizer.get_megatron_optimizer(optimizer.OptimizerConfig(lr=1.0), [model], lr_mult=2.0)
        except ValueError as e:
            assert "lr_mult=2.0" in str(e), e
        else:
            raise AssertionError("a set lr_mult was dropped silently")
    """)
    assert out.returncode == 0, out.stderr[-3000:]


def test_megatrons_moe_router_needs_te_general_gemm_and_gets_megatrons_no_te_value():
    """megatron-core 0.16.1's router gating reads `moe_utils.te_general_gemm`, defined only where transformer-engine
    imports (patch 6)."""
    code = """
        import torch
        from megatron.core.transformer.moe import moe_utils
        {patch}
        logits = moe_utils.router_gating_linear(torch.randn(3, 4), torch.randn(2, 4), None, torch.float32)
        assert logits.shape == (3, 2)
    """
    without = run(code.format(patch=""))
    assert without.returncode != 0 and "te_general_gemm" in without.stderr, without.stderr[-2000:]
    patched = run(code.format(patch="from nemo_dllm import cpu_compat; cpu_compat.apply()"))
    assert patched.returncode == 0, patched.stderr[-3000:]


GLOO_MOE_SCRIPT = """
import sys
import torch
import torch.distributed as dist
if sys.argv[1] == "patched":
    from nemo_dllm import cpu_compat
    cpu_compat.apply()
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.moe import token_dispatcher
dist.init_process_group("gloo")
rank, group = dist.get_rank(), dist.new_group([0, 1])
sizes = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([2, 3]), as_numpy=True)
assert not torch.is_tensor(sizes), "split sizes stayed a tensor"
mine = torch.full((2 + rank, 4), float(rank + 1))  # rank 0 routed 2 tokens, rank 1 routed 3
assert mappings._gather_along_first_dim(mine, group, sizes).tolist() == [[1.0] * 4] * 2 + [[2.0] * 4] * 3
part = mappings._reduce_scatter_along_first_dim(torch.full((5, 4), float(rank + 1)), group, sizes)
assert part.shape == (2 + rank, 4) and bool((part == 3).all())
"""


def test_megatrons_moe_dispatch_gathers_unequal_parts_on_gloo(tmp_path):
    """Patches 7 and 8, over two gloo processes: the all-to-all dispatcher's split sizes reach the collectives as
    numpy, and gathers and reduce-scatters of unequal parts (each rank routed its own tokens) give NCCL's results."""
    from drivers.torchrun import launch_command

    script = tmp_path / "gloo_moe.py"
    script.write_text(GLOO_MOE_SCRIPT)

    def launch(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([*launch_command(sys.executable, 2), str(script), mode], capture_output=True, text=True,
                              timeout=300)

    without = launch("unpatched")
    assert without.returncode != 0 and "split sizes stayed a tensor" in without.stderr, without.stderr[-2000:]
    patched = launch("patched")
    assert patched.returncode == 0, patched.stderr[-3000:]


def test_with_a_gpu_apply_changes_nothing():
    out = run("""
        import torch
        from megatron.core import optimizer, utils
        from megatron.core.tensor_parallel import random
        from nemo.lightning import megatron_init
        torch.cuda.is_available = lambda: True
        watched = lambda: (random.CudaRNGStatesTracker, utils.GlobalMemoryBuffer.get_tensor, torch.cuda.current_device,
                           torch.cuda.Stream, optimizer.get_megatron_optimizer, megatron_init._set_random_seed,
                           torch.overrides._get_current_function_mode_stack())
        before = watched()
        from nemo_dllm import cpu_compat
        assert cpu_compat.apply() is False
        assert watched() == before
    """)
    assert out.returncode == 0, out.stderr[-3000:]
