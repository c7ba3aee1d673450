"""The stack-neutral block-diffusion library every plugin adapts: masks, noise, batches, losses, the training
objectives, schedules, checkpoint merge, the reference models and the reference decoder, the serving contract. Pure
PyTorch; no vLLM, SGLang, Megatron or NeMo import anywhere in this package, and nothing of the demo application."""
