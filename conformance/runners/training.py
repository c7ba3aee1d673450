"""Training conformance (nemo venv): every objective the recipes train (`blockdiff.objectives`), over Megatron's
GPTModel as `nemo_dllm` runs it and over the core's reference model holding the same weights, on fixed batches with
fixed masks, fp32 (one CPU process, gloo).

    python -m conformance.runners.training OUT.json      # {objective: {"core": loss, "megatron": loss}}
"""

import json
import sys

import torch

from blockdiff.batches import make_diffusion_batch
from blockdiff.models import build_model, init_weights, tiny_dense_config
from blockdiff.noise import MaskBand
from blockdiff.objectives import ReferenceForward, dpo_objective, pretrain_loss, sft_objective

TOLERANCE = 1e-5


def model_pair(seed: int, vocab: int):
    from nemo_dllm import megatron_model

    cfg = tiny_dense_config(vocab_size=vocab, num_hidden_layers=2)
    ref = init_weights(build_model(cfg), seed, std=0.1)
    gpt = megatron_model.build_gpt_model(cfg)
    megatron_model.load_hf_weights(gpt, ref.state_dict(), cfg, 0, 1)
    return ref, gpt


def fixed_batch(objective: str, block: int, vocab: int, seed: int = 0, response_from: int | None = None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (3, 32), generator=g)
    doc_ids = torch.tensor([[0] * 32, [0] * 12 + [1] * 20, [0] * 5 + [1] * 27])
    maskable = None
    if response_from is not None:
        maskable = torch.zeros(3, 32, dtype=torch.bool)
        maskable[:, response_from:] = True
    return make_diffusion_batch(ids, doc_ids, block, objective, vocab - 1, MaskBand(0.2, 0.9), g, maskable=maskable)


def loss_pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """objective -> (loss over the core's reference model, loss over Megatron's GPTModel): the same objective of
    `blockdiff.objectives` on the same batch, each stack's forward. Needs Megatron's parallel state
    (`nemo_dllm.parallel.init`)."""
    from nemo_dllm.megatron_model import DiffusionForward

    def both(seed: int, vocab: int) -> tuple[ReferenceForward, DiffusionForward]:
        ref, gpt = model_pair(seed, vocab)
        return ReferenceForward(ref), DiffusionForward(gpt)

    pairs = {}
    models = both(0, 120)
    for objective, block in [("bdlm", 1), ("bdlm", 4), ("bdlm", 8), ("mdlm", 32)]:
        batch = fixed_batch(objective, block, 120)
        pairs[f"{objective} block {block}"] = tuple(pretrain_loss(m, batch) for m in models)
    models = both(3, 5)  # a 4-token vocabulary: many masked positions are predicted right (CAP's term)
    batch = fixed_batch("bdlm", 8, 5, seed=1, response_from=10)
    pairs["sft"] = tuple(sft_objective(m, batch) for m in models)
    pairs["cap (lambda 2)"] = tuple(sft_objective(m, batch, confidence_weight=2.0) for m in models)
    policies, references = both(1, 120), both(2, 120)
    chosen = fixed_batch("bdlm", 8, 120, seed=1, response_from=10)
    rejected = fixed_batch("bdlm", 8, 120, seed=5, response_from=10)
    pairs["dpo (beta 0.1)"] = tuple(dpo_objective(policy, reference, chosen, rejected, beta=0.1)
                                    for policy, reference in zip(policies, references))
    return pairs


def main(out: str) -> None:
    from nemo_dllm import parallel

    parallel.init(tp_size=1, seed=0)
    with torch.no_grad():
        records = {k: {"core": float(a), "megatron": float(b)} for k, (a, b) in loss_pairs().items()}
    open(out, "w").write(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1])
