"""Block-diffusion decoding written from ../shared/DECODING.md alone, to check the rules themselves: the reference
decoder and every stack share the core's rule code (`propose`, `select_commits`, `BlockState`), so a wrong rule there
would change them all alike and conformance would still pass. This oracle imports nothing from `blockdiff.decoding`,
keeps no cache (every step recomputes the whole sequence under an attention mask built by plain loops) and spells each
rule out. At T > 0 it follows the sampling protocol docs/decoding.md fixes (one generator per request seeded with its
seed, candidates drawn for the still-masked positions in position order with `torch.multinomial`)."""

import torch


def naive_decode(model: torch.nn.Module, prompt: list[int], *, max_tokens: int, block_size: int, threshold: float,
                 fallback_k: int, mask_id: int, eos_ids: tuple[int, ...], temperature: float = 0.0,
                 seed: int = 0) -> dict:
    """Returns tokens, finish_reason and denoise_forwards (rule 7's steps of rule 2)."""
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    # rule 1: blocks at absolute positions 0, B, 2B...; the prompt's tail joins the first generated block
    start = len(prompt) // block_size * block_size
    finished = list(prompt[:start])
    block = list(prompt[start:]) + [mask_id] * (block_size - (len(prompt) - start))
    output: list[int] = []
    denoise_forwards = 0
    while True:
        while mask_id in block:
            # rule 2: one forward; the current block sees all earlier blocks and itself, earlier blocks do not see it
            sequence = finished + block
            allowed = [[j // block_size <= i // block_size for j in range(len(sequence))] for i in range(len(sequence))]
            with torch.no_grad():
                logits = model(torch.tensor([sequence]), torch.arange(len(sequence))[None], torch.tensor([allowed]))
            logits = logits[0, start:].float()
            denoise_forwards += 1
            proposals = []  # (position in block, candidate, confidence) for every still-masked position
            for position in range(block_size):
                if block[position] != mask_id:
                    continue
                row = logits[position].clone()
                row[mask_id] = float("-inf")
                if temperature == 0:  # rule 3: argmax, lowest token id on ties
                    probs = torch.softmax(row, dim=-1)
                    values = row.tolist()
                    candidate = values.index(max(values))  # the first maximum
                else:
                    probs = torch.softmax(row / temperature, dim=-1)
                    candidate = int(torch.multinomial(probs, 1, generator=generator))
                proposals.append((position, candidate, float(probs[candidate])))
            # rule 4: strictly above the threshold; else the k most confident, ties to the lowest position
            chosen = [p for p in proposals if p[2] > threshold]
            if not chosen:
                chosen = sorted(proposals, key=lambda p: (-p[2], p[0]))[:fallback_k]
            for position, candidate, _ in chosen:
                block[position] = candidate
        # rule 6: only generated positions count; stop at the first EOS, or cut at max_tokens
        output += block[max(len(prompt) - start, 0):]
        eos_at = next((i for i, token in enumerate(output[:max_tokens]) if token in eos_ids), None)
        if eos_at is not None:
            return {"tokens": output[: eos_at + 1], "finish_reason": "stop", "denoise_forwards": denoise_forwards}
        if len(output) >= max_tokens:
            return {"tokens": output[:max_tokens], "finish_reason": "length", "denoise_forwards": denoise_forwards}
        # rule 5: the block is final; the next one starts all masks
        finished += block
        start += block_size
        block = [mask_id] * block_size
