"""Held-out exact-match accuracy on the task family, with the decoding cost beside it: the AR base decoded greedily
(one token per forward), block-diffusion models with the reference decoder (KV cache of finished blocks). Requests run
one at a time, as a single user's would (concurrency 1), so tokens/s is each model's latency-bound speed on this CPU.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blockdiff.decoding import DecodeParams, DecodeResult, ReferenceDecoder, greedy_ar_decode
from blockdiff.models import BlockDiffusionSettings, config_eos_ids, load_model
from blockdiff.text import apply_chat_template, checkpoint_chat_template, load_tokenizer
from blockdiff_demo.corpus import chat_question
from blockdiff_demo.tasks import Task, is_exact

MAX_ANSWER_TOKENS = 48  # every answer of the family fits with its EOS; diffusion outputs end on a block boundary


@dataclass
class Evaluation:
    model: str
    accuracy: float
    by_family: dict[str, float]
    tpf: float
    tokens_per_second: float
    output_tokens: int
    block_size: int | None = None  # None: the AR model
    threshold: float | None = None
    outputs: list[str] = field(default_factory=list)  # decoded, without the EOS that ends them

    def summary(self) -> dict:
        """Every field but the outputs: what a benchmark's JSON keeps."""
        return {k: v for k, v in asdict(self).items() if k != "outputs"}


def block_aligned_budget(prompt_len: int, max_tokens: int, block_size: int) -> int:
    """The largest output length <= max_tokens that ends on a block boundary (at least one token), so that TPF is not
    diluted by a last block whose tail is decoded and then cut."""
    budget = max_tokens - (prompt_len + max_tokens) % block_size
    return budget if budget >= 1 else max_tokens


def _score(name: str, tasks: list[Task], results: list[DecodeResult], wall: float, decode, eos: tuple[int, ...],
           **decoding) -> Evaluation:
    outputs = [decode([t for t in r.tokens if t not in eos]) for r in results]
    right = [is_exact(task, out) for task, out in zip(tasks, outputs)]
    families: dict[str, list[bool]] = defaultdict(list)
    for task, ok in zip(tasks, right):
        families[task.family].append(ok)
    tokens = sum(len(r.tokens) for r in results)
    return Evaluation(name, sum(right) / len(right), {f: sum(v) / len(v) for f, v in sorted(families.items())},
                      tpf=tokens / sum(r.denoise_forwards for r in results), tokens_per_second=tokens / wall,
                      output_tokens=tokens, outputs=outputs, **decoding)


def evaluate(model_dir: Path, tasks: list[Task], block_size: int = 32, threshold: float = 0.95,
             name: str | None = None, chat: bool = False) -> Evaluation:
    """Decode every task's prompt with the model in `model_dir`: greedily if it is an AR model, else block diffusion
    at `block_size` / `threshold`; exact match against the answers. `chat`: each task is asked as a user turn
    (`chat_question`) rendered by the checkpoint's own chat template, for a chat model such as SmolLM2-Instruct.
    Decoding stops at any of the checkpoint's EOS ids (the AR config's `eos_token_id`, or block diffusion's)."""
    model, cfg = load_model(model_dir)
    model.eval()
    tok = load_tokenizer(model_dir)
    if chat:
        template = checkpoint_chat_template(model_dir)
        texts = [apply_chat_template(template, [{"role": "user", "content": chat_question(t)}], True) for t in tasks]
    else:
        texts = [t.prompt for t in tasks]
    prompts = [tok.encode(text).ids for text in texts]
    results, start = [], time.perf_counter()
    if "block_diffusion" not in cfg:
        eos = config_eos_ids(cfg)
        for p in prompts:
            results += greedy_ar_decode(model, [p], MAX_ANSWER_TOKENS, eos)
        return _score(name or str(model_dir), tasks, results, time.perf_counter() - start, tok.decode, eos)
    settings = BlockDiffusionSettings.from_config(cfg)
    decoder = ReferenceDecoder(model, settings.mask_token_id, settings.eos_token_ids)
    for p in prompts:
        params = DecodeParams(max_tokens=block_aligned_budget(len(p), MAX_ANSWER_TOKENS, block_size),
                              block_size=block_size, threshold=threshold)
        results += decoder.generate([p], params)
    return _score(name or str(model_dir), tasks, results, time.perf_counter() - start, tok.decode,
                  settings.eos_token_ids, block_size=block_size, threshold=threshold)


def table(evaluations: list[Evaluation]) -> str:
    """One row per model: accuracy, TPF, tokens/s, and accuracy per family."""
    families = list(evaluations[0].by_family)
    head = f"{'model':<22}{'decoding':<18}{'accuracy':>9}{'TPF':>6}{'tok/s':>7}  " + " ".join(f"{f[:7]:>7}"
                                                                                            for f in families)
    lines = [head, "-" * len(head)]
    for e in evaluations:
        decoding = "AR greedy" if e.block_size is None else f"block {e.block_size}, t {e.threshold}"
        lines.append(f"{e.model:<22}{decoding:<18}{e.accuracy:>9.1%}{e.tpf:>6.2f}{e.tokens_per_second:>7.0f}  "
                     + " ".join(f"{e.by_family[f]:>7.0%}" for f in families))
    return "\n".join(lines)
