"""NeMo recipe plugin for LLaDA2.0-style block-diffusion training (issue #8), registered under `nemo_run.cli`."""
