"""Process groups for the recipes: torch.distributed (gloo on CPU, nccl on GPU), Megatron's model-parallel state, and
the paper's consistency rule: noise is drawn on one rank of each tensor-parallel group and broadcast to the others, so
every shard computes its part of the same sample. (`init` is for megatron-core without NeMo's trainer, as the
objective tests use it; the recipes' process groups are NeMo's strategy's.)"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch import Tensor

from blockdiff.batches import DiffusionBatch
from nemo_dllm import cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(tp_size: int, seed: int) -> int:
    """Initialise (once) the default process group from torchrun's environment (or a single local process) and
    Megatron's parallel state. Returns this process's global rank."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_compat.apply()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "MASTER_ADDR" in os.environ:  # launched by torchrun
            dist.init_process_group(backend)
        else:  # one local process: a free port, and nothing exported that child processes would inherit
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"tensor_parallel={tp_size} does not divide the {world} processes")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp_size:
            raise ValueError(f"model parallel already initialised with another tensor_parallel than {tp_size}")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    model_parallel_cuda_manual_seed(seed)
    return dist.get_rank()


def device() -> torch.device:
    """Where this rank's model and batches live: its GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def tp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def ep_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size()


def layout() -> dict[str, int]:
    """The parallel sizes Megatron is running with (as NeMo's strategy set them up), for the run's summary; expert
    parallelism only where it is on."""
    from megatron.core import parallel_state as ps

    sizes = {"tensor": ps.get_tensor_model_parallel_world_size(),
             "pipeline": ps.get_pipeline_model_parallel_world_size(),
             "context": ps.get_context_parallel_world_size(), "data": ps.get_data_parallel_world_size()}
    if ps.get_expert_model_parallel_world_size() > 1:
        sizes["expert"] = ps.get_expert_model_parallel_world_size()
    return sizes


def cp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()


def context_parallel_shares(work: Tensor, cp_size: int) -> list[Tensor]:
    """Which positions of the sequence each context-parallel rank runs, given each position's attention work (the
    keys its query may see, summed over the batch): positions dealt out heaviest first in zig-zag order (ranks 0, 1,
    ..., cp-1, then cp-1, ..., 0, and so on), so every rank gets as many positions and nearly the same work. Where the
    work grows with the position (one document, causal or block-causal) this is Megatron's zig-zag split (2 x cp chunks,
    rank r taking chunks r and 2cp-1-r) token by token; on packed documents, whose work restarts with each document, the
    chunk split is far off balance and this deal is not (`benchmarks/context_parallel_balance.py`). Each share comes
    back in sequence order. Raises naming the length when it does not split."""
    length = work.shape[0]
    if length % cp_size:
        raise ValueError(f"a sequence of {length} tokens does not split evenly over context_parallel = {cp_size} ranks "
                         "(BDLM rows are 2 x seq_len tokens, MDLM rows seq_len)")
    heaviest_first = torch.argsort(work, descending=True, stable=True).view(-1, cp_size)
    heaviest_first[1::2] = heaviest_first[1::2].flip(1)  # every other round deals from the last rank back
    return [heaviest_first[:, r].sort().values for r in range(cp_size)]


class _Gather(torch.autograd.Function):
    """All-gather along `dim` in `group`. Backward gives this rank its slice of the gradient: summed over the group
    first when every rank's output fed a different computation (`sum_grads`: keys and values that every rank's queries
    read), taken as it is when every rank computes the same loss from the gathered tensor."""

    @staticmethod
    def forward(ctx, part: Tensor, dim: int, group, sum_grads: bool) -> Tensor:
        ctx.dim, ctx.group, ctx.sum_grads, ctx.width = dim, group, sum_grads, part.shape[dim]
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, part.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.sum_grads:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.width, ctx.width).contiguous(), None, None, None


def gather(part: Tensor, dim: int, group, sum_grads: bool) -> Tensor:
    """Every rank's `part` of `group` concatenated along `dim` in rank order, differentiably (see `_Gather`). Megatron's
    own gathers allocate their output on the GPU; this one works on gloo too, so CPU and GPU take the same path."""
    return _Gather.apply(part, dim, group, sum_grads)


def broadcast_noise(batch: DiffusionBatch) -> DiffusionBatch:
    """Replace this rank's noise (which tokens are masked, and their ratios) by the first tensor-parallel rank's, so
    every shard computes its part of the same sample. Pipeline stages are not in this broadcast: the schedule runs
    them at different times (a collective across them inside the data step deadlocks 1F1B), and each stage's data
    module draws the same noise anyway, its seed being the sample index (`nemo_dllm.datamodule`)."""
    from megatron.core import parallel_state

    batch = batch.to(device())
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return batch
    src = parallel_state.get_tensor_model_parallel_src_rank()
    masked = batch.masked.to(torch.uint8).contiguous()
    t_tok = batch.t_tok.contiguous()
    dist.broadcast(masked, src, group=group)
    dist.broadcast(t_tok, src, group=group)
    return batch.with_noise(masked.bool(), t_tok)
