"""SGLang plugin serving block-diffusion models (issue #4), loaded through the `sglang.srt.plugins` entry point in
every SGLang process.

Loading it registers the block-diffusion dense architectures, the `llada2_moe` config type and this project's
decoding as the dLLM algorithm `BlockDiff`, and hooks SGLang so the checkpoint's own config supplies block size, mask
id, EOS and threshold. It is switched on per server by `--dllm-algorithm BlockDiff`; without that flag SGLang runs
unchanged, except that the HTTP server's request guard (`blockdiff.http_guard`: a body size limit, JSON bodies that
are objects) stands in front of every server this plugin is installed in.
"""

def register() -> None:
    """Entry point of `sglang.srt.plugins`."""
    import multiprocessing
    import os

    from sglang.srt.dllm.algorithm import algo_name_to_cls
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from transformers import AutoConfig

    from blockdiff.models.hf_config import LLaDA2MoeHFConfig
    from blockdiff.serving import ACCOUNTING_KEY
    from sglang_blockdiff import algorithm, hooks, models

    AutoConfig.register(LLaDA2MoeHFConfig.model_type, LLaDA2MoeHFConfig, exist_ok=True)
    for cls in models.EntryClass:
        ModelRegistry.models.setdefault(cls.__name__, cls)
    algo_name_to_cls[algorithm.NAME] = algorithm.BlockDiff
    HookRegistry.register("sglang.srt.dllm.config.DllmConfig.from_server_args", hooks.dllm_config_from_model,
                          HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.tp_worker.TpModelWorker._forward_batch_generation_dllm",
                          hooks.attach_requests, HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.schedule_policy.PrefillAdder.add_dllm_staging_req",
                          hooks.stage_whole_blocks_only, HookType.AROUND)
    HookRegistry.register("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._fetch_waiting_reqs",
                          hooks.admit_only_what_the_pool_can_finish, HookType.AROUND)
    HookRegistry.register("sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._finish_dllm_request_if_needed",
                          hooks.drop_stale_block_kv, HookType.AROUND)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens",
                          hooks.refuse_prompts_without_room, HookType.AFTER)
    if multiprocessing.parent_process() is None:  # the launching process, the one that serves HTTP
        HookRegistry.register("sglang.srt.entrypoints.http_server.launch_server", hooks.install_request_guard,
                              HookType.BEFORE)
    # SGLang's extension point for per-request output fields
    SchedulerOutputStreamer.has_additional_customized_info = True
    HookRegistry.register(f"{SchedulerOutputStreamer.__module__}.SchedulerOutputStreamer."
                          "should_build_additional_customized_info", lambda self: True, HookType.REPLACE)
    HookRegistry.register(f"{SchedulerOutputStreamer.__module__}.SchedulerOutputStreamer."
                          "build_additional_customized_info", hooks.accounting_outputs, HookType.REPLACE)
    HookRegistry.register(f"{SchedulerOutputStreamer.__module__}.SchedulerOutputStreamer."
                          "is_request_level_customized_info_key",
                          lambda self, key: key == ACCOUNTING_KEY, HookType.REPLACE)
    HookRegistry.register(f"{SchedulerOutputStreamer.__module__}._GenerationStreamAccumulator.accept",
                          hooks.send_committed_blocks_only, HookType.AROUND)
    if multiprocessing.parent_process() is None:  # the OpenAI endpoints' responses carry the accounting
        for endpoint in ("serving_completions", "serving_chat"):
            HookRegistry.register(f"sglang.srt.entrypoints.openai.{endpoint}.build_endpoint_weight_version_metadata",
                                  hooks.accounting_in_metadata, HookType.AFTER)
    HookRegistry.register("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend."
                          "_run_sdpa_forward_extend", hooks.attend_from_extend_tokens_only, HookType.AROUND)
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":  # the CPU runtime (docs/environments.md)
        HookRegistry.register("sglang.srt.layers.moe.fused_moe_native.moe_forward_native",
                              hooks.scale_native_moe_output, HookType.AFTER)
