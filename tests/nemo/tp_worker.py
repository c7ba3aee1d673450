"""Run by test_tensor_parallel.py under torchrun: a few training steps of a tiny model at a given tensor-parallel size,
each rank drawing its noise from a *different* seed before the broadcast. Writes one JSON line per rank."""

import hashlib
import json
import sys

import torch

from blockdiff.batches import make_diffusion_batch
from blockdiff.models import build_model, init_weights, tiny_dense_config
from blockdiff.noise import MaskBand
from blockdiff.objectives import pretrain_loss
from nemo_dllm import megatron_model, parallel


def main(tp_size: int, out_path: str) -> None:
    rank = parallel.init(tp_size=tp_size, seed=0)
    tp_rank, _ = parallel.tp_rank_and_size()
    cfg = tiny_dense_config(vocab_size=128, num_hidden_layers=2)
    hf = init_weights(build_model(cfg), 0, std=0.1).state_dict()
    model = megatron_model.build_gpt_model(cfg, tp_size=tp_size)
    megatron_model.load_hf_weights(model, hf, cfg, tp_rank, tp_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 127, (2, 32), generator=torch.Generator().manual_seed(7))
    doc_ids = torch.tensor([[0] * 32, [0] * 9 + [1] * 23])
    losses, digests = [], []
    for step in range(3):
        g = torch.Generator().manual_seed(1000 * step + rank)  # differs per rank on purpose
        batch = parallel.broadcast_noise(make_diffusion_batch(ids, doc_ids, 8, "bdlm", 127, MaskBand(), g))
        digests.append(hashlib.sha256(batch.masked.numpy().tobytes() + batch.t_tok.numpy().tobytes()).hexdigest())
        loss = pretrain_loss(megatron_model.DiffusionForward(model), batch)
        opt.zero_grad()
        loss.backward()
        parallel.reduce_replicated_grads(model)
        opt.step()
        losses.append(loss.item())
    with open(f"{out_path}.{rank}", "w") as f:
        f.write(json.dumps({"rank": rank, "losses": losses, "noise": digests}) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
