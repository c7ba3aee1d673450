"""Make megatron-core 0.16 run on a machine without CUDA (gloo backend, fp32), for tests and the toy main job.

megatron-core touches CUDA unconditionally in a few places even when every tensor lives on the CPU. Each patch below
replaces one such place with its CPU equivalent. (RoPE's move of inv_freq to the GPU and the default causal mask on
"cuda" need no patch: `megatron_model.forward` computes rotary embeddings from position ids itself and always passes
a mask.) `apply()` does nothing when a GPU is present: production runs use
megatron-core untouched (tests/nemo/test_cpu_compat.py checks both).
"""

from __future__ import annotations

import contextlib

import torch

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


def apply() -> bool:
    """Patch megatron-core for CPU if no GPU is present. Returns whether patches are in effect. Idempotent."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core import utils
    from megatron.core.tensor_parallel import random

    # 1. RNG: CPU generator states instead of CUDA ones; torch.cuda.manual_seed is a lazy no-op without CUDA.
    random.CudaRNGStatesTracker = CPURNGStatesTracker
    random.initialize_rng_tracker(force_reset=True)

    # 2. GlobalMemoryBuffer allocates its scratch on torch.cuda.current_device().
    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        numel = 1
        for d in tensor_shape:
            numel *= d
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor

    _applied = True
    return True
