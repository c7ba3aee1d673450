"""Block-diffusion decoding exactly as ../shared/DECODING.md defines it, in one place.

`BlockState` holds one request's rules (propose, commit, stop, accounting). Two drivers run it: `ReferenceDecoder`
(batched, KV cache of finished blocks, one forward of the current block per step) and `oracle_decode` (no cache: the
whole sequence recomputed every step under an explicit block-causal mask). Serving plugins reuse `BlockState` and the
two rule functions; they never re-derive them. `greedy_ar_decode` is the autoregressive baseline the block-diffusion
models are converted from and compared with: one token per forward, same KV cache, same accounting.

Choices where DECODING.md is silent (also in docs/decoding.md):
- the commit forward of a finished block (rule 5) is fused with the next block's first denoising step: that forward
  runs the finished block's tokens and the new block's masks, writing the finished block's final KV; with
  `fuse_commit=False` it is a forward of its own, counted in `nfe`. Either way the last block of a request gets none;
- the whole last block is denoised even when max_tokens ends inside it, then the output is cut;
- an EOS that ends the output is part of it (as in vLLM's token ids), so it counts as an output token;
- at T > 0 each request draws from its own torch.Generator seeded with its seed (default 0), candidates for the still
  masked positions only, in position order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from blockdiff.masks import block_causal_mask
from blockdiff.serving import BlockDiffusionSettings, tokens_per_forward


@dataclass(frozen=True)
class DecodeParams:
    max_tokens: int
    block_size: int = 32
    threshold: float = 0.95
    fallback_k: int = 1
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.fallback_k < 1:
            raise ValueError(f"fallback_k must be >= 1, got {self.fallback_k}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


# the per-request overrides a served request may carry (vLLM's `vllm_xargs`, SGLang's `custom_params`)
OVERRIDE_KEYS = ("threshold", "fallback_k", "block_size")


def check_overrides(overrides: object) -> dict:
    """The overrides as a dict (None: none); ValueError for anything but an object with keys from OVERRIDE_KEYS,
    listing them."""
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise ValueError(f"must be an object with keys from {', '.join(OVERRIDE_KEYS)}, got {overrides!r:.100}")
    unknown = sorted(str(k) for k in overrides if k not in OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"block diffusion accepts {', '.join(OVERRIDE_KEYS)}")
    return overrides


def request_params(settings: BlockDiffusionSettings, *, max_tokens: int, temperature: float, seed: int,
                   overrides: dict | None) -> DecodeParams:
    """A served request's parameters: the checkpoint's settings, with the per-request overrides a serving stack
    passes through (`threshold`, `fallback_k`; `block_size` only restating the served one, because the KV layout and
    scheduling are per server). Raises ValueError naming the bad key, or listing the accepted ones for an unknown
    key; the stack names its own field in front of the message."""
    overrides = check_overrides(overrides)
    threshold = overrides.get("threshold", settings.threshold)
    fallback_k = overrides.get("fallback_k", settings.fallback_k)
    block_size = overrides.get("block_size", settings.block_size)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r:.100}")
    if isinstance(fallback_k, bool) or not isinstance(fallback_k, int) or fallback_k < 1:
        raise ValueError(f"fallback_k must be an integer >= 1, got {fallback_k!r:.100}")
    if block_size != settings.block_size:
        raise ValueError(f"block_size {block_size!r:.100} differs from the served block size {settings.block_size}; "
                         "the block size is chosen when the server starts")
    return DecodeParams(max_tokens=max_tokens, block_size=settings.block_size, threshold=float(threshold),
                        fallback_k=fallback_k, temperature=temperature, seed=seed)


@dataclass
class DecodeResult:
    tokens: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens)
    denoise_forwards: int
    nfe: int

    @property
    def tpf(self) -> float:
        return tokens_per_forward(len(self.tokens), self.denoise_forwards)


def propose(logits: Tensor, mask_token_id: int, temperature: float, generator: torch.Generator | None
            ) -> tuple[Tensor, Tensor]:
    """Candidate token and its confidence for each row of logits [n, V] (rule 3). fp32; the mask token never wins."""
    logits = logits.float().clone()
    logits[:, mask_token_id] = float("-inf")
    if temperature == 0:
        candidate = logits.argmax(dim=-1)  # first maximum: lowest token id on ties
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        candidate = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return candidate, probs.gather(-1, candidate[:, None]).squeeze(-1)


def select_commits(confidence: Tensor, threshold: float, fallback_k: int) -> Tensor:
    """Which of the still-masked positions (given in position order) to commit this step (rule 4): every one with
    confidence strictly above the threshold; if none, the `fallback_k` most confident (ties to the lowest position)."""
    commit = confidence > threshold
    if commit.any():
        return commit
    order = torch.sort(confidence, descending=True, stable=True).indices
    commit[order[:fallback_k]] = True
    return commit


def denoise_step(block: Tensor, block_logits: Tensor, masked: Tensor, params: DecodeParams, mask_token_id: int,
                 generator: torch.Generator | None) -> None:
    """One denoising step's rules 3-4 on one block, in place: a candidate for each still-masked position (`masked`,
    their indices in position order), and the chosen ones written into `block`. Sampling runs on the CPU, where the
    request's generator lives."""
    candidate, confidence = propose(block_logits[masked].float().cpu(), mask_token_id, params.temperature, generator)
    chosen = select_commits(confidence, params.threshold, params.fallback_k)
    block[masked[chosen.to(masked.device)]] = candidate[chosen].to(block.device, block.dtype)


class BlockState:
    """One request's progress: the tokens so far, the current block, the output and the accounting."""

    def __init__(self, prompt: list[int], params: DecodeParams, mask_token_id: int, eos_token_ids: tuple[int, ...]):
        if not prompt:
            raise ValueError("prompt is empty: block diffusion needs at least one prompt token")
        if mask_token_id in prompt:
            raise ValueError(f"prompt contains the mask token id {mask_token_id} at position "
                             f"{prompt.index(mask_token_id)}")
        self.params, self.mask_id, self.eos = params, mask_token_id, set(eos_token_ids)
        self.prompt_len = len(prompt)
        b = params.block_size
        self.block_start = (len(prompt) // b) * b  # the prompt's full blocks are prefilled; the tail joins block 1
        self.committed = list(prompt[: self.block_start])
        tail = prompt[self.block_start:]
        self.block = torch.tensor(tail + [mask_token_id] * (b - len(tail)), dtype=torch.long)
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.denoise_forwards = 0
        self.nfe = 0
        self.generator = torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def max_len(self) -> int:
        """Positions this request can ever occupy: whole blocks up to the one holding the last allowed token."""
        b = self.params.block_size
        return -(-(self.prompt_len + self.params.max_tokens) // b) * b

    def positions(self) -> Tensor:
        return torch.arange(self.block_start, self.block_start + self.params.block_size)

    def step(self, block_logits: Tensor) -> bool:
        """Apply one denoising step from the current block's logits [B, V]. Returns True when the block is full."""
        self.denoise_forwards += 1
        self.nfe += 1
        masked = (self.block == self.mask_id).nonzero().squeeze(-1)
        denoise_step(self.block, block_logits, masked, self.params, self.mask_id, self.generator)
        return not bool((self.block == self.mask_id).any())

    def finish_block(self) -> bool:
        """Move a full block into the output and apply the stop rules (rule 6). Returns True if the request goes on,
        in which case the caller must write the block's KV (commit forward) before the next step."""
        block = self.block.tolist()
        generated = block[max(self.prompt_len - self.block_start, 0):]
        self.output += generated
        cut = self.params.max_tokens
        eos_at = next((i for i, t in enumerate(self.output) if t in self.eos), None)
        if eos_at is not None and eos_at < cut:
            self.output, self.finish_reason = self.output[: eos_at + 1], "stop"
        elif len(self.output) >= cut:
            self.output, self.finish_reason = self.output[:cut], "length"
        if self.done:
            return False
        self.committed += block
        return True

    def next_block(self) -> None:
        self.block_start += self.params.block_size
        self.block = torch.full((self.params.block_size,), self.mask_id, dtype=torch.long)

    def result(self) -> DecodeResult:
        return DecodeResult(self.output, self.finish_reason, self.denoise_forwards, self.nfe)


class ReferenceDecoder:
    """Batched decoding with a KV cache of finished blocks. Each step is one forward of every active request's
    current block (queries: B tokens; keys: the request's cached earlier blocks plus its current block), preceded in
    the request's first step after a finished block by that block's tokens (2B queries), whose final KV the forward
    writes; `fuse_commit=False` writes it in a commit forward of its own instead."""

    def __init__(self, model: torch.nn.Module, mask_token_id: int, eos_token_ids: tuple[int, ...],
                 fuse_commit: bool = True) -> None:
        self.model, self.mask_id, self.eos = model, mask_token_id, tuple(eos_token_ids)
        self.fuse_commit = fuse_commit

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: DecodeParams | list[DecodeParams]) -> list[DecodeResult]:
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} parameter sets")
        states = [BlockState(p, q, self.mask_id, self.eos) for p, q in zip(prompts, params)]
        cache = self.model.new_cache(len(states), max(s.max_len for s in states))
        for row, s in enumerate(states):
            if s.block_start:  # prefill the prompt's full blocks in one chunk
                s.nfe += 1
                ids = torch.tensor(s.committed)[None]
                mask = block_causal_mask(s.block_start, s.params.block_size)[None]
                self._forward([row], ids, torch.arange(s.block_start)[None], mask, cache, s.block_start)
        finished: dict[int, Tensor] = {}  # row -> its finished block, whose final KV is not written yet
        while active := [row for row, s in enumerate(states) if not s.done]:
            logits = self._step_forward(active, states, cache, finished)
            full = [r for r, lg in zip(active, logits) if states[r].step(lg)]
            going_on = [r for r in full if states[r].finish_block()]
            finished = {r: states[r].block for r in going_on}
            if going_on and not self.fuse_commit:  # commit forward: the finished blocks' final KV
                for r in going_on:
                    states[r].nfe += 1
                self._block_forward(going_on, list(finished.values()), states, cache)
                finished = {}
            for r in going_on:
                states[r].next_block()
        return [s.result() for s in states]

    def _step_forward(self, rows: list[int], states: list[BlockState], cache, finished: dict[int, Tensor]
                      ) -> list[Tensor]:
        """The current blocks' logits [B, V] for `rows`, in order: one forward of the rows with nothing to commit,
        one of the rows whose `finished` block goes in front of their current block."""
        plain = [r for r in rows if r not in finished]
        fused = [r for r in rows if r in finished]
        logits = {}
        if plain:
            logits.update(zip(plain, self._block_forward(plain, [states[r].block for r in plain], states, cache)))
        if fused:
            blocks = [torch.cat([finished[r], states[r].block]) for r in fused]
            size = states[fused[0]].params.block_size
            logits.update(zip(fused, self._block_forward(fused, blocks, states, cache, offset=-size)[:, size:]))
        return [logits[r] for r in rows]

    def _block_forward(self, rows: list[int], blocks: list[Tensor], states: list[BlockState], cache,
                       offset: int = 0) -> Tensor:
        """A forward of `blocks` (one or more whole blocks per row) placed at each row's current block start plus
        `offset`."""
        starts = torch.tensor([states[r].block_start + offset for r in rows])
        size = states[rows[0]].params.block_size
        if any(states[r].params.block_size != size for r in rows):
            raise ValueError("requests decoded in one batch must share a block size")
        width = blocks[0].numel()
        positions = starts[:, None] + torch.arange(width)
        kv_len = int(positions.max()) + 1
        # a query sees every slot before the end of its own block: cached earlier blocks plus its whole block
        block_end = (positions // size + 1) * size
        mask = torch.arange(kv_len)[None, None, :] < block_end[:, :, None]
        return self._forward(rows, torch.stack(blocks), positions, mask, cache, kv_len)

    def _forward(self, rows, ids, positions, mask, cache, kv_len) -> Tensor:
        return self.model(ids, positions, mask, cache=cache, rows=torch.tensor(rows), kv_len=kv_len).float()


@torch.no_grad()
def oracle_decode(model: torch.nn.Module, prompt: list[int], params: DecodeParams, mask_token_id: int,
                  eos_token_ids: tuple[int, ...]) -> DecodeResult:
    """The same rules without any cache: every step recomputes prompt + finished blocks + current block under an
    explicit block-causal mask. Slow and obviously right; the cached decoders are tested against it."""
    s = BlockState(prompt, params, mask_token_id, tuple(eos_token_ids))
    while True:
        ids = torch.cat([torch.tensor(s.committed, dtype=torch.long), s.block])[None]
        length = ids.shape[1]
        mask = block_causal_mask(length, params.block_size)[None]
        logits = model(ids, torch.arange(length)[None], mask).float()[0, -params.block_size:]
        if s.step(logits):
            if not s.finish_block():
                return s.result()
            s.next_block()


@torch.no_grad()
def greedy_ar_decode(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int,
                     eos_token_ids: tuple[int, ...]) -> list[DecodeResult]:
    """Greedy next-token decoding of a causal LM, batched, with a KV cache: each prompt is prefilled in one forward,
    then every active request gets one token per forward (lowest id on ties, as in rule 3). Output ends at and
    includes the first EOS (finish "stop") or after max_tokens ("length"); every forward after the prefill counts as
    a denoising forward, so TPF is 1 by construction."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("greedy_ar_decode needs at least one prompt, and no prompt may be empty")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + max_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    next_tokens = []
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        logits = model(torch.tensor(prompt)[None], torch.arange(n)[None], block_causal_mask(n, 1)[None],
                       cache=cache, rows=torch.tensor([row]), kv_len=n)
        next_tokens.append(int(logits[0, -1].float().argmax()))
    active = list(range(len(prompts)))
    while active:
        for row in active:
            outputs[row].append(next_tokens[row])
        active = [r for r in active if outputs[r][-1] not in eos_token_ids and len(outputs[r]) < max_tokens]
        if not active:
            break
        positions = torch.tensor([[len(prompts[r]) + len(outputs[r]) - 1] for r in active])
        kv_len = int(positions.max()) + 1
        mask = (torch.arange(kv_len)[None, None, :] <= positions[:, :, None])
        logits = model(torch.tensor([[outputs[r][-1]] for r in active]), positions, mask, cache=cache,
                       rows=torch.tensor(active), kv_len=kv_len)
        for i, row in enumerate(active):
            next_tokens[row] = int(logits[i, -1].float().argmax())
    # the prefill made the first token and each later forward one more: as many forwards as tokens
    return [DecodeResult(out, "stop" if out[-1] in eos_token_ids else "length", denoise_forwards=len(out),
                         nfe=len(out)) for out in outputs]
