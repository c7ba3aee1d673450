"""One vLLM engine with this plugin over a JSON job, run as a subprocess by the vLLM suite (vLLM's engine spawns
processes, so its driver needs a main guard). Job: model dir, batches of requests, optional engine arguments
and records path."""

import json
import sys

from blockdiff.serving import ACCOUNTING_KEY


def make_llm(model: str, **engine):
    """vLLM's `LLM` on CPU in fp32 with this plugin's engine arguments (plus `engine` overrides)."""
    from vllm import LLM

    import vllm_blockdiff

    return LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
               **vllm_blockdiff.engine_kwargs(**engine))


def run_batches(llm, batches: list[list[dict]]) -> list[list[dict]]:
    """One `generate` per batch of shared-case requests; each result has the reference's fields and the plugin's
    accounting (`nfe`, `tpf`, `preemptions`)."""
    from vllm import SamplingParams

    results = []
    for batch in batches:
        params = [SamplingParams(temperature=r.get("temperature", 0.0), seed=r.get("seed"), max_tokens=r["max_tokens"],
                                 extra_args={"threshold": r["threshold"]}) for r in batch]
        outs = llm.generate([{"prompt_token_ids": r["prompt"]} for r in batch], params, use_tqdm=False)
        results.append([{"tokens": list(o.outputs[0].token_ids), "finish_reason": o.outputs[0].finish_reason,
                         **o.kv_transfer_params[ACCOUNTING_KEY]} for o in outs])
    return results


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    llm = make_llm(job["model"], **job.get("engine", {}))
    results = run_batches(llm, job["batches"])
    if job.get("records"):
        llm.collective_rpc("save_records", args=(job["records"],))
    open(out_path, "w").write(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
