"""How a NeMo recipe is launched on this machine's gloo: one plain process, or torchrun's workers."""

from __future__ import annotations

from drivers.servers import free_port


def launch_command(python: str, processes: int, port: int | None = None) -> list[str]:
    """`python` itself for one process, else torchrun (`python -m torch.distributed.run`) with `processes` workers
    meeting at `port` (a free one by default); the script and its arguments follow."""
    if processes == 1:
        return [python]
    return [python, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
            str(port or free_port())]
