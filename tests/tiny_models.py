"""Tiny models made by the core for the stack suites (each suite runs in its own venv, all import this)."""

from pathlib import Path

import torch

from blockdiff.data import save_tokenizer, train_tokenizer
from blockdiff.models import build_model, init_weights, save_model, tiny_dense_config


def make_tiny_ar_model(path: Path) -> torch.nn.Module:
    """A random 2-layer Qwen3 with a 300-token BPE tokenizer, written as an HF directory at `path`."""
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50], 300)
    save_tokenizer(tok, path, model_max_length=512)
    cfg = tiny_dense_config(vocab_size=tok.get_vocab_size(), num_hidden_layers=2, eos_token_id=0, pad_token_id=0)
    model = init_weights(build_model(cfg), 0, std=0.2)
    save_model(model, cfg, path)
    return model


@torch.no_grad()
def greedy_ar(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy next-token decoding without a cache: the obviously-right AR answer."""
    ids = list(prompt)
    for _ in range(max_tokens):
        n = len(ids)
        logits = model(torch.tensor([ids]), torch.arange(n)[None], torch.ones(n, n, dtype=torch.bool).tril()[None])
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]
