"""Tiny models made by the core for the stack suites (each suite runs in its own venv, all import this)."""

import json
from pathlib import Path

import torch

from blockdiff.decoding import DecodeParams, DecodeResult, ReferenceDecoder
from blockdiff.models import (
    BlockDiffusionSettings,
    build_model,
    init_weights,
    read_config,
    save_model,
    tiny_dense_config,
    tiny_llada2_config,
    with_block_diffusion,
)
from blockdiff.text import save_tokenizer, train_tokenizer
from conformance.cases import EOS, SUITE_BLOCK, choose_eos


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


def make_tiny_blockdiff_model(path: Path, arch: str, eos_token_ids: tuple[int, ...] = (0,),
                              block_size: int = 32) -> torch.nn.Module:
    """A random block-diffusion model ("dense": the 2-layer Qwen3 above; "llada2": a 3-layer LLaDA2MoeModelLM with 8
    experts) over the same tokenizer (EOS 0, mask 1), written as an HF directory at `path`."""
    settings = BlockDiffusionSettings(mask_token_id=1, eos_token_ids=tuple(eos_token_ids), block_size=block_size)
    if arch == "dense":
        model = make_tiny_ar_model(path)
        cfg = with_block_diffusion(read_config(path), settings)
    elif arch == "llada2":
        make_tiny_ar_model(path)  # for its tokenizer
        cfg = tiny_llada2_config(vocab_size=read_config(path)["vocab_size"], mask_token_id=1, eos_token_id=0)
        cfg["block_diffusion"] = settings.to_config()
        model = init_weights(build_model(cfg), 0, std=0.2)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    save_model(model, cfg, path)
    return model.eval()


def make_served_model(path: Path, arch: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The tiny `arch` model at `path` for the stack suites, its EOS ids (0, a token that ends the probe request
    inside a block: `conformance.cases.choose_eos`)."""
    model = make_tiny_blockdiff_model(path, arch, block_size=SUITE_BLOCK)
    eos = (EOS, choose_eos(model, SUITE_BLOCK))
    cfg = read_config(path)
    cfg["block_diffusion"]["eos_token_ids"] = list(eos)
    (path / "config.json").write_text(json.dumps(cfg))
    return model, eos


def reference_decode(model: torch.nn.Module, prompt: list[int], max_tokens: int, threshold: float = 0.95
                     ) -> DecodeResult:
    """What a server with `make_tiny_blockdiff_model`'s defaults (block 32, mask 1, EOS 0) must return."""
    params = DecodeParams(max_tokens=max_tokens, block_size=32, threshold=threshold)
    return ReferenceDecoder(model, 1, (0,)).generate([prompt], params)[0]
