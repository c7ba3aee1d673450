"""The Warmup-Stable-Decay block-size schedule of AR-to-diffusion conversion, as data.

Warmup grows the block size from 1 (next-token prediction, the AR model's own task) through small blocks to the full
sequence; Stable trains at the full sequence, where block diffusion degenerates to MDLM and the clean half of the input
is dropped; Decay walks the block size back down to the serving block size. Every phase has its own token budget, and
the phase of a step is a pure function of the step, so a resumed run lands in the same phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    block_size: int
    tokens: int  # training tokens (noisy-half tokens) spent in this phase
    objective: str  # "bdlm" (attention over [x_noisy, x_clean]) or "mdlm" (full-sequence, noisy half only)


@dataclass(frozen=True)
class WSDSchedule:
    seq_len: int
    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a WSD schedule needs at least one phase")
        for p in self.phases:
            if p.block_size < 1 or self.seq_len % p.block_size:
                raise ValueError(f"phase {p.name!r}: sequence length {self.seq_len} is not divisible by block size "
                                 f"{p.block_size}")
            if p.tokens <= 0:
                raise ValueError(f"phase {p.name!r}: token budget must be positive, got {p.tokens}")
            if p.objective not in ("bdlm", "mdlm"):
                raise ValueError(f"phase {p.name!r}: objective must be 'bdlm' or 'mdlm', got {p.objective!r}")

    @classmethod
    def build(cls, seq_len: int, warmup: tuple[int, ...] = (1, 4, 32, 64), decay: tuple[int, ...] | None = None,
              warmup_tokens: int = 1, stable_tokens: int = 1, decay_tokens: int = 1, final_block: int = 32
              ) -> "WSDSchedule":
        """The paper's shape: warmup block sizes, then the full sequence (MDLM), then decay. `decay` defaults to
        halving from seq_len/2 down to `final_block`. Token budgets are per phase."""
        if decay is None:
            decay, size = [], seq_len // 2
            while size > final_block:
                decay.append(size)
                size //= 2
            decay = tuple(decay) + (final_block,)
        phases = [Phase(f"warmup-{b}", b, warmup_tokens, "bdlm") for b in warmup]
        phases.append(Phase(f"stable-{seq_len}", seq_len, stable_tokens, "mdlm"))
        phases += [Phase(f"decay-{b}", b, decay_tokens, "bdlm") for b in decay]
        return cls(seq_len, tuple(phases))

    @property
    def total_tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    def steps(self, tokens_per_step: int) -> list[int]:
        """Steps per phase: each phase's budget rounded up to whole steps."""
        if tokens_per_step <= 0:
            raise ValueError(f"tokens_per_step must be positive, got {tokens_per_step}")
        return [-(-p.tokens // tokens_per_step) for p in self.phases]

    def total_steps(self, tokens_per_step: int) -> int:
        return sum(self.steps(tokens_per_step))

    def phase_at(self, step: int, tokens_per_step: int) -> Phase:
        """The phase that training step `step` (0-based) belongs to."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        end = 0
        for phase, n in zip(self.phases, self.steps(tokens_per_step)):
            end += n
            if step < end:
                return phase
        raise ValueError(f"step {step} is past the schedule's last step {end - 1}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """The learning-rate factor at `step` (0-based): linear warmup to 1 over `warmup_steps`, then a cosine down to
    `min_ratio` at `total_steps`, where it stays."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
