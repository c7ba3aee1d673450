"""KV-cache reuse (issue #6, item 2): the core's cached reference decoder against full recomputation (the no-cache
oracle) on the same model and prompts, at prompt lengths 128, 512 and 2048; block 32, threshold 0.95. Prints the
speedup ratio per length (measured side by side in one run) and writes results/kv_cache_reuse.json.

    $(python3 tools/envs.py --path core) -m benchmarks.kv_cache_reuse
"""

import json
import time
from pathlib import Path

import torch

from blockdiff.decoding import DecodeParams, ReferenceDecoder, oracle_decode
from blockdiff.models import build_model, init_weights, tiny_dense_config

LENGTHS = (128, 512, 2048)
MASK, EOS = 1, (0,)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    torch.manual_seed(0)
    model = init_weights(build_model(tiny_dense_config(vocab_size=512, num_hidden_layers=2)), 0, std=0.1).eval()
    params = DecodeParams(max_tokens=64, block_size=32, threshold=0.95)
    decoder = ReferenceDecoder(model, MASK, EOS)
    rows = []
    print(f"{'prompt':>7}{'cached s':>10}{'recompute s':>13}{'speedup':>9}{'denoise fwd':>13}")
    for n in LENGTHS:
        prompt = torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        cached_s, cached = timed(lambda prompt=prompt: decoder.generate([prompt], params)[0])
        full_s, full = timed(lambda prompt=prompt: oracle_decode(model, prompt, params, MASK, EOS))
        assert cached.tokens == full.tokens and cached.denoise_forwards == full.denoise_forwards
        rows.append({"prompt_tokens": n, "cached_s": cached_s, "recompute_s": full_s, "speedup": full_s / cached_s,
                     "denoise_forwards": cached.denoise_forwards})
        print(f"{n:>7}{cached_s:>10.2f}{full_s:>13.2f}{full_s / cached_s:>8.1f}x{cached.denoise_forwards:>13}")
    out = Path(__file__).resolve().parent.parent / "results" / "kv_cache_reuse.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": "tiny dense (2 layers, hidden 128)", "block_size": 32, "threshold": 0.95,
                               "max_tokens": 64, "rows": rows}, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
