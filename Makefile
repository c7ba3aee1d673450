# The two commands of the README, and the pieces they are made of. Every target builds the venvs it needs first
# (tools/envs.py; seconds when they are current).
PYTHON ?= python3
CORE = $$($(PYTHON) tools/envs.py --path core)
NEMO = $$(dirname $$($(PYTHON) tools/envs.py --path nemo))/nemo

.PHONY: demo demo-moe test conformance eval envs
demo:  ## the main job: tiny AR base -> NeMo recipes on Megatron (wsd_cpt, merge, sft + cap, dpo) -> held-out accuracy, TPF
	$(PYTHON) tools/envs.py core nemo
	rm -rf runs/demo runs/nemo
	$(CORE) -m blockdiff_demo base
	$(NEMO) llm pretrain --factory dllm_wsd_tiny --direct --yes
	$(NEMO) dllm merge --factory tiny --direct --yes
	$(NEMO) llm finetune --factory dllm_sft_tiny --direct --yes
	$(NEMO) llm finetune --factory dllm_cap_tiny --direct --yes
	$(NEMO) dllm dpo --factory tiny --direct --yes
	$(CORE) -m blockdiff_demo evaluate runs/demo/ar-base runs/nemo/wsd_merged runs/nemo/sft/hf runs/nemo/cap/hf \
		runs/nemo/dpo/hf

demo-moe:  ## the same job on LLaDA2.0's MoE architecture: tiny MoE AR base -> the moe_tiny recipes on Megatron's MoE layers
	$(PYTHON) tools/envs.py core nemo
	rm -rf runs/demo/moe-base runs/nemo/moe
	$(CORE) -m blockdiff_demo base --arch llada2_moe
	$(NEMO) dllm wsd_cpt --factory moe_tiny --direct --yes
	$(NEMO) dllm merge --factory moe_tiny --direct --yes
	$(NEMO) dllm sft --factory moe_tiny --direct --yes
	$(NEMO) dllm cap --factory moe_tiny --direct --yes
	$(NEMO) dllm dpo --factory moe_tiny --direct --yes
	$(CORE) -m blockdiff_demo evaluate runs/demo/moe-base runs/nemo/moe/wsd_merged runs/nemo/moe/sft/hf \
		runs/nemo/moe/cap/hf runs/nemo/moe/dpo/hf --out runs/nemo/moe

test:  ## lint, every test suite in its stack's venv, the cross-stack conformance matrix, and a break it must catch
	$(PYTHON) tools/test.py
	$(PYTHON) -m conformance.run
	$(PYTHON) -m conformance.mutation

conformance:  ## the same model and prompts on every stack: identical tokens, or exit 1 with the differences
	$(PYTHON) -m conformance.run

eval:  ## lm-eval on the main job's models (run `make demo` first), then the CAP model on the vLLM and SGLang servers
	$(PYTHON) tools/envs.py core vllm sglang
	$(CORE) -m benchmarks.evaluation

envs:  ## build (or check) every venv
	$(PYTHON) tools/envs.py all
