"""The core's reference decoder over the conformance cases (core venv). Each batch is one `generate` call.

    python -m conformance.runners.reference CASES.json OUT.json [--perturb ge]

`--perturb ge` commits confidences >= the threshold instead of > (rule 4 broken on purpose): the harness's own test
uses it to prove it catches a wrong decoder.
"""

import argparse
import json

import torch

import blockdiff.decoding as decoding
from blockdiff.decoding import ReferenceDecoder
from blockdiff.models import BlockDiffusionSettings, load_model, read_config
from conformance.cases import decode_params
from conformance.run import model_time


def select_commits_ge(confidence: torch.Tensor, threshold: float, fallback_k: int) -> torch.Tensor:
    commit = confidence >= threshold
    if commit.any():
        return commit
    order = torch.sort(confidence, descending=True, stable=True).indices
    commit[order[:fallback_k]] = True
    return commit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases")
    parser.add_argument("out")
    parser.add_argument("--perturb", choices=["ge"])
    args = parser.parse_args()
    if args.perturb == "ge":
        decoding.select_commits = select_commits_ge
    spec = json.loads(open(args.cases).read())
    records = {}
    for name, path in spec["models"].items():
        with model_time(name):
            model, _ = load_model(path)
            settings = BlockDiffusionSettings.from_config(read_config(path))
            decoder = ReferenceDecoder(model, settings.mask_token_id, settings.eos_token_ids)
            for case in (c for c in spec["cases"] if c["model"] == name):
                params = [decode_params(r, settings.block_size) for r in case["batch"]]
                results = decoder.generate([r["prompt"] for r in case["batch"]], params)
                records[case["id"]] = [{"tokens": r.tokens, "finish_reason": r.finish_reason,
                                        "denoise_forwards": r.denoise_forwards, "nfe": r.nfe} for r in results]
    open(args.out, "w").write(json.dumps(records))


if __name__ == "__main__":
    main()
