"""vLLM plugin serving block-diffusion models (issue #3). Loaded through the `vllm.general_plugins` entry point."""


def register() -> None:
    """Entry point of `vllm.general_plugins`. The model and runner registrations land with issue #3; until then
    loading the plugin changes nothing in vLLM."""
