"""Loading and saving Hugging Face directories into the reference implementations, by architecture name.

A directory is a block-diffusion model when its config.json carries a `block_diffusion` section (block size, mask
token id, threshold, fallback count, EOS ids); the same weights without it are an ordinary AR checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blockdiff.models.llada2_moe import LLaDA2MoeDecoder
from blockdiff.models.qwen3 import DenseDecoder
from blockdiff.serving import BlockDiffusionSettings

# config.json `architectures` -> (implementation, is block diffusion)
ARCHITECTURES: dict[str, tuple[type, bool]] = {
    "Qwen3ForCausalLM": (DenseDecoder, False),
    "LlamaForCausalLM": (DenseDecoder, False),
    "Qwen3BlockDiffusionForCausalLM": (DenseDecoder, True),
    "LlamaBlockDiffusionForCausalLM": (DenseDecoder, True),
    "LLaDA2MoeModelLM": (LLaDA2MoeDecoder, True),
}
BLOCK_DIFFUSION_ARCH = {"Qwen3ForCausalLM": "Qwen3BlockDiffusionForCausalLM",
                        "LlamaForCausalLM": "LlamaBlockDiffusionForCausalLM"}


def read_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def config_eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    """The config's `eos_token_id` as a tuple: HF writes one id, a list of them, or none."""
    eos = cfg.get("eos_token_id")
    return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


def build_model(cfg: dict[str, Any]) -> torch.nn.Module:
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    impl, _ = ARCHITECTURES[arch]
    return impl(impl.config_class.from_hf(cfg))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load an HF directory into its reference implementation; weights by name, strictly."""
    path = Path(path)
    cfg = read_config(path)
    model = build_model(cfg)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(f))
    if cfg.get("tie_word_embeddings"):
        embed = next(k for k in ("model.embed_tokens.weight", "model.word_embeddings.weight") if k in weights)
        weights.setdefault("lm_head.weight", weights[embed])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {cfg['architectures'][0]}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(dtype).eval(), cfg


def save_model(model: torch.nn.Module, cfg: dict[str, Any], path: str | Path) -> Path:
    """Write config.json and model.safetensors. Other files (tokenizer) are the caller's."""
    return save_weights(model.state_dict(), cfg, path)


def save_weights(state: dict[str, torch.Tensor], cfg: dict[str, Any], path: str | Path) -> Path:
    """An HF directory from HF-named weights (tied weights stored once, as HF does)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def with_block_diffusion(cfg: dict[str, Any], settings: BlockDiffusionSettings) -> dict[str, Any]:
    """The config of the converted dLLM: the AR config, the block-diffusion architecture name and settings."""
    arch = cfg["architectures"][0]
    return {**cfg, "architectures": [BLOCK_DIFFUSION_ARCH.get(arch, arch)], "block_diffusion": settings.to_config()}


def tiny_dense_config(vocab_size: int, hidden_size: int = 128, num_hidden_layers: int = 4,
                      num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 32,
                      intermediate_size: int = 384, max_position_embeddings: int = 4096,
                      eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """An HF Qwen3 config (written by transformers itself, so every stack's loader reads it)."""
    from transformers import Qwen3Config

    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
    ).to_dict()
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    cfg["dtype"] = "float32"
    for key in ("id2label", "label2id", "_name_or_path", "output_hidden_states", "return_dict", "problem_type",
                "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions"):
        cfg.pop(key, None)
    return cfg


def init_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Deterministic small-normal init (norms at 1), independent of torch's default init order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
