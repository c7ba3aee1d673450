"""Stack-neutral block-diffusion core: masks, noise, losses, schedules, the tiny model family and the reference
decoder. Pure PyTorch; no vLLM, SGLang or Megatron import anywhere in this package."""
