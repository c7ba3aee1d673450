"""An AR checkpoint made ready for conversion: block diffusion needs a mask token, and a real tokenizer has none
(SmolLM2's 49,152 tokens end with no spare one). This adds `<|mask|>` as a special token after the last one and gives
it an embedding row (the mean of the existing rows, and the same for an untied output layer), so the WSD stage can
start from the result; the AR model's other weights and tokens are unchanged.

    python -m blockdiff.models.mask_token SRC DST
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken

from blockdiff.models.checkpoints import read_config, save_weights
from blockdiff.text import MASK, load_tokenizer

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def add_mask_token(src: Path, dst: Path) -> int:
    """Write `src` with a mask token to `dst`; returns its id. Raises if `src` already has one."""
    tok = load_tokenizer(src)
    if tok.token_to_id(MASK) is not None:
        raise ValueError(f"{src} already has the mask token {MASK!r} (id {tok.token_to_id(MASK)})")
    cfg = read_config(src)
    tok.add_special_tokens([AddedToken(MASK, special=True, normalized=False)])
    mask_id = tok.token_to_id(MASK)
    weights = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        weights.update(load_file(f))
    if mask_id >= cfg["vocab_size"]:  # no spare row (a padded vocabulary would have one): grow by one
        for name in EMBEDDINGS:
            if name in weights:
                rows = weights[name]
                weights[name] = torch.cat([rows, rows.mean(dim=0, keepdim=True)])
        cfg = {**cfg, "vocab_size": mask_id + 1}
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():  # tokenizer files, chat template, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "tokenizer.json"):
            shutil.copy(f, dst / f.name)
    tok.save(str(dst / "tokenizer.json"))
    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "mask_token": MASK}, indent=2) + "\n")
    save_weights(weights, cfg, dst)
    return mask_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    print(f"{args.dst}: {MASK} is token {add_mask_token(args.src, args.dst)}")


if __name__ == "__main__":
    main()
