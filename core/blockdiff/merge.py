"""Top-k checkpoint merge: average the weights of the k best checkpoints by a validation metric (LLaDA2.0 section 4).

Checkpoints are Hugging Face directories (config.json + *.safetensors). The merged directory takes every non-weight
file from the best checkpoint. Inputs are only read; the output must be a new directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class MergeError(ValueError):
    pass


def _load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise MergeError(f"checkpoint {ckpt} has no *.safetensors file")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def select_top_k(scores: dict[Path, float], k: int, higher_is_better: bool) -> list[Path]:
    if k < 1 or k > len(scores):
        raise MergeError(f"k must be between 1 and the number of checkpoints ({len(scores)}), got {k}")
    return sorted(scores, key=lambda p: (-scores[p] if higher_is_better else scores[p], str(p)))[:k]


def _check_same_config(checkpoints: list[Path]) -> None:
    """Checkpoints of one model agree on config.json: averaging weights of different architectures or block-diffusion
    settings would make a model that is neither."""
    configs = []
    for ckpt in checkpoints:
        try:
            configs.append(json.loads((ckpt / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise MergeError(f"checkpoint {ckpt} has no readable config.json: {e}") from e
    for ckpt, config in zip(checkpoints[1:], configs[1:]):
        differ = sorted(k for k in configs[0].keys() | config.keys() if configs[0].get(k) != config.get(k))
        if differ:
            raise MergeError(f"{ckpt}/config.json differs from {checkpoints[0]}/config.json in {differ[:5]}")


def merge_checkpoints(checkpoints: list[Path], out_dir: Path) -> Path:
    """Average the weights of `checkpoints` (best first) into `out_dir`, accumulating in fp64."""
    checkpoints = [Path(c) for c in checkpoints]
    out_dir = Path(out_dir)
    if not checkpoints:
        raise MergeError("no checkpoints to merge")
    if out_dir.exists():
        raise MergeError(f"output directory {out_dir} already exists; the merge never overwrites")
    if any(out_dir.resolve() == c.resolve() for c in checkpoints):
        raise MergeError(f"output directory {out_dir} is one of the inputs")
    _check_same_config(checkpoints)
    first = _load_weights(checkpoints[0])
    total = {name: w.double() for name, w in first.items()}
    for ckpt in checkpoints[1:]:
        weights = _load_weights(ckpt)
        if weights.keys() != first.keys():
            missing, extra = sorted(first.keys() - weights.keys()), sorted(weights.keys() - first.keys())
            raise MergeError(f"{ckpt} has different weights than {checkpoints[0]}: missing {missing[:5]}, "
                             f"extra {extra[:5]}")
        for name, w in weights.items():
            if w.shape != first[name].shape or w.dtype != first[name].dtype:
                raise MergeError(f"{ckpt}: weight {name!r} is {w.dtype} of shape {tuple(w.shape)}, but "
                                 f"{checkpoints[0]} has {first[name].dtype} of shape {tuple(first[name].shape)}")
            total[name] += w.double()
    merged = {name: (t / len(checkpoints)).to(first[name].dtype).contiguous() for name, t in total.items()}
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(checkpoints[0], tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_file(merged, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.rename(out_dir)  # atomic: a reader never sees a half-written merge
    return out_dir
