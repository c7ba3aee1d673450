"""A deliberately broken stack, for `python -m conformance.mutation`: with this folder on PYTHONPATH every Python
process loads it, and BLOCKDIFF_MUTATION picks the break. Each break sits in a stack's plugin, not in the core's
rule code, so only conformance (not the shared rules) can notice it.

- `vllm-unsplit-attention`: the vLLM plugin's attention stops cutting a scheduled span at block boundaries, so a
  prompt's earlier blocks attend to its later ones during prefill (block-causality lost).
"""

import importlib.abc
import importlib.machinery
import os
import sys

MUTATION = os.environ.get("BLOCKDIFF_MUTATION")


def unsplit(query_start_loc: list[int], seq_lens: list[int], block_size: int):
    """One piece per request over its whole span: every query sees every key of the span."""
    return list(query_start_loc), list(seq_lens), list(range(len(seq_lens)))


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after `name` is first imported, without importing anything earlier."""

    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


if MUTATION == "vllm-unsplit-attention":
    sys.meta_path.insert(0, PatchAfterImport("vllm_blockdiff.attention",
                                             lambda module: setattr(module, "split_at_blocks", unsplit)))
elif MUTATION is not None:
    raise SystemExit(f"conformance/mutations: unknown BLOCKDIFF_MUTATION {MUTATION!r}")
