"""How this project drives each stack from outside: its servers as processes (`servers`), SGLang's CPU launch
(`sglang_cpu`), a vLLM engine in a subprocess (`vllm_engine`), a recipe on gloo (`torchrun`), NeMo's CLI (`nemo_cli`).
Used by the tests, the conformance runners and the benchmarks alike, so it lives apart from all three."""
