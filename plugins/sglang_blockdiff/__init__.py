"""SGLang plugin serving block-diffusion models (issue #4). Loaded through the `sglang.srt.plugins` entry point."""


def register() -> None:
    """Entry point of `sglang.srt.plugins`. The hooks land with issue #4; until then loading the plugin changes nothing
    in SGLang."""
