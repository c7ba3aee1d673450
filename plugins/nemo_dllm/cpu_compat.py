"""Make megatron-core 0.16.1 and NeMo 2.7.3 train on a machine without CUDA (gloo backend, fp32).

Neither stack's math needs a GPU; what stops them on a CPU is a handful of hard-coded CUDA allocations, streams and
pinned-memory copies, plus two version skews between NeMo 2.7.3 and megatron-core 0.16.1. Each patch below replaces
one such place with its CPU equivalent; `apply()` does nothing when a GPU is present, so production runs use both
stacks untouched (tests/nemo/test_cpu_compat.py checks each patch and the no-op).

What is patched, and why:
1. Megatron's model-parallel RNG tracker keeps CUDA generator states; here it keeps CPU ones. NeMo seeds it only when
   `torch.cuda.device_count() > 0`, so its seeding is extended to the CPU.
2. `GlobalMemoryBuffer` allocates its scratch on `torch.cuda.current_device()`.
3. CUDA placements written into the code: gradient buffers of Megatron's DistributedDataParallel
   (`device=torch.cuda.current_device()`), the strategy's logging (`torch.tensor(x, pin_memory=True).to("cuda")`),
   the optimizer's `.cuda()` copies. A torch-function mode maps `device="cuda"`, `.cuda()`, `.to("cuda")` and
   `pin_memory=True` to the CPU, and `torch.cuda.current_device()` answers "cpu"; streams, events and synchronize
   become no-ops (one CPU stream). Megatron's optimizer checks `param.type()` against `torch.cuda.FloatTensor`, so
   `Tensor.type()` names CPU float tensors by their CUDA names.
4. NeMo 2.7.3 passes `no_weight_decay_cond`, `scale_lr_cond` and `lr_mult` to `get_megatron_optimizer`, which
   megatron-core 0.16.1 no longer takes (it takes `config_overrides`); they are dropped when unset (NeMo's defaults).
5. NeMo's checkpoint loader asserts that CUDA is initialised before moving loaded CUDA tensors to the current GPU
   (`nemo.lightning.io.pl._fix_tensors_device`); on a CPU there are none to move.
6. megatron-core 0.16.1's MoE router reads `moe_utils.te_general_gemm`, which is defined only when
   transformer-engine imports (a megatron-core bug on any install without TE; GPU installs have TE): it is set to
   None, megatron-core's own "no TE" value, so the router's fp32 gating runs in torch.
7. Megatron's all-to-all token dispatcher (expert parallelism) copies its split sizes to the host as numpy arrays
   with `maybe_move_tensor_to_cpu(..., as_numpy=True)`, which converts only tensors that are on a GPU; on a CPU the
   sizes stay tensors, which `all_to_all_single` refuses. They are converted here too.
8. Under tensor parallelism Megatron's MoE dispatcher gathers and reduce-scatters tokens in parts of unequal size
   (each rank routes its own tokens), which NCCL does and gloo does not ("invalid tensor size"; gloo has no
   reduce-scatter of a list). On gloo the unequal gather pads every part to the largest and cuts them back, and the
   unequal reduce-scatter sums the whole tensor and keeps this rank's part: the same values, more bytes moved.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch.overrides import TorchFunctionMode

_applied = False


class CPURNGStatesTracker:
    """Megatron's model-parallel RNG tracker, keeping CPU generator states instead of CUDA ones. The fork() around
    attention dropout and weight init runs even at dropout 0, so a tracker must exist."""

    def __init__(self, *args, **kwargs) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} / seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda")


_CPU_TYPE_AS_CUDA = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                     "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


class CudaToCpu(TorchFunctionMode):
    """Every torch call that names a CUDA placement gets the CPU instead (see the module docstring, patch 3)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TYPE_AS_CUDA.get(name, name)
        return func(*args, **kwargs)


class _NoStream:
    """A CUDA stream or event on a machine with one CPU stream: everything is already in order."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def wait_stream(self, *args) -> None:
        pass

    def wait_event(self, *args) -> None:
        pass

    def record_event(self, *args) -> "_NoStream":
        return _NoStream()

    def record(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _patch_megatron() -> None:
    from megatron.core import utils
    from megatron.core.tensor_parallel import random

    random.CudaRNGStatesTracker = CPURNGStatesTracker  # patch 1
    random.initialize_rng_tracker(force_reset=True)

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):  # patch 2
        numel = 1
        for d in tensor_shape:
            numel *= d
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # patch 6
        moe_utils.te_general_gemm = None

    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):  # patch 7
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):  # patch 8
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = int(max(output_split_sizes))
        padded = torch.cat([input_, input_.new_zeros(longest - len(input_), *input_.shape[1:])])
        parts = gather(padded, group).split(longest)
        return torch.cat([part[: int(n)] for part, n in zip(parts, output_split_sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        torch.distributed.all_reduce(total, group=group)
        return total.split([int(n) for n in input_split_sizes])[group.rank()].clone()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _redirect_cuda() -> None:  # patch 3
    CudaToCpu().__enter__()  # for the life of the process
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = torch.cuda.Event = _NoStream
    torch.cuda.current_stream = torch.cuda.default_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.max_memory_allocated = torch.cuda.max_memory_reserved = lambda *a, **k: 0


def _patch_nemo() -> None:
    try:
        from nemo.lightning import megatron_init
        from nemo.lightning.io import pl
    except ImportError:  # megatron-core used without NeMo
        return

    seed = megatron_init._set_random_seed  # patch 1: NeMo's seeding, extended to the CPU tracker

    @functools.wraps(seed)
    def set_random_seed(seed_):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        seed(seed_)
        model_parallel_cuda_manual_seed(seed_ + 100 * parallel_state.get_pipeline_model_parallel_rank())

    megatron_init._set_random_seed = set_random_seed

    from megatron.core import optimizer

    get_optimizer = optimizer.get_megatron_optimizer
    takes = inspect.signature(get_optimizer).parameters

    @functools.wraps(get_optimizer)
    def get_megatron_optimizer(config, model_chunks, **kwargs):  # patch 4
        for key in ("no_weight_decay_cond", "scale_lr_cond", "lr_mult"):
            if key not in takes:
                value = kwargs.pop(key, None)
                if value not in (None, 1.0):
                    raise ValueError(f"megatron-core's get_megatron_optimizer no longer takes {key}={value!r}")
        return get_optimizer(config, model_chunks, **kwargs)

    optimizer.get_megatron_optimizer = get_megatron_optimizer  # NeMo imports it from here at call time

    pl._fix_tensors_device = lambda checkpoint: checkpoint  # patch 5


def apply() -> bool:
    """Patch megatron-core (and NeMo, when installed) for CPU if no GPU is present. Returns whether patches are in
    effect. Idempotent."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    _patch_megatron()
    _redirect_cuda()
    _patch_nemo()
    _applied = True
    return True
