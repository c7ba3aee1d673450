"""NeMo recipe plugin for LLaDA2.0-style block-diffusion training on Megatron (issue #8).

NeMo-Run loads this package through the `nemo_run.cli` entry point `dllm`; importing it registers the stages as
`nemo dllm <stage>` commands. Without nemo_run (plain megatron-core use), `nemo_dllm.stages` works on its own.
"""

try:
    import nemo_run  # noqa: F401
except ImportError:
    pass
else:
    from nemo_dllm import cli  # noqa: F401  (registers the entrypoints and factories)
