"""One vLLM engine with this plugin over a JSON job, run as a subprocess by the vLLM suite (vLLM's engine spawns
processes, so its driver needs a main guard). Job: model dir, batches of requests, optional engine arguments
and records path."""

import json
import sys


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    from vllm import LLM, SamplingParams

    import vllm_blockdiff

    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              **vllm_blockdiff.engine_kwargs(**job.get("engine", {})))
    results = []
    for batch in job["batches"]:
        params = [SamplingParams(temperature=r.get("temperature", 0.0), seed=r.get("seed"), max_tokens=r["max_tokens"],
                                 extra_args={"threshold": r["threshold"]}) for r in batch]
        outs = llm.generate([{"prompt_token_ids": r["prompt"]} for r in batch], params, use_tqdm=False)
        results.append([{"tokens": list(o.outputs[0].token_ids), "finish_reason": o.outputs[0].finish_reason,
                         **o.kv_transfer_params["block_diffusion"]} for o in outs])
    if job.get("records"):
        llm.collective_rpc("save_records", args=(job["records"],))
    open(out_path, "w").write(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
