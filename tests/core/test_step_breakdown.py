"""The step-breakdown benchmark's split of a stack's time per request into a cost per denoising forward and a cost
per request (benchmarks/step_breakdown.py), on rows made from known costs."""

import pytest

from benchmarks.step_breakdown import WORKLOADS, model_part, per_forward_split, samples


def test_two_thresholds_recover_the_cost_per_forward_and_per_request():
    costs = {"reference": (0.0, 2.0), "vllm": (5.0, 3.0)}  # stack -> (per request F, per forward S), ms
    forwards = {WORKLOADS[0][1]: 1.5, WORKLOADS[1][1]: 18.0}
    rows = [{"stack": stack, "model": "cap", "threshold": t, "concurrency": c, "denoise_forwards": n,
             "wall_ms": f + n * s} for stack, (f, s) in costs.items() for t, n in forwards.items() for c in (1, 16)]
    rows.append({"stack": "vllm", "model": "ar", "threshold": None, "concurrency": 1, "denoise_forwards": 0,
                 "wall_ms": 99.0})  # AR rows take no part
    split = {(s["stack"], s["concurrency"]): s for s in per_forward_split(rows)}
    assert set(split) == {(stack, c) for stack in costs for c in (1, 16)}
    for (stack, _), s in split.items():
        assert s["per_request_ms"] == pytest.approx(costs[stack][0])
        assert s["per_forward_ms"] == pytest.approx(costs[stack][1])
        assert s["per_forward_vs_reference"] == pytest.approx(costs[stack][1] / costs["reference"][1])


def test_a_model_forward_sample_goes_to_the_innermost_layer_part_its_frames_name():
    """Frames as py-spy writes them with --full-filenames."""
    sglang = "/venvs/sglang/lib/python3.11/site-packages/sglang/srt"
    qwen3 = f"Qwen3DecoderLayer.forward ({sglang}/models/qwen3.py:445)"
    norm_in_attention = ";".join([qwen3, f"Qwen3Attention.forward ({sglang}/models/qwen3.py:313)",
                                  f"apply_qk_norm ({sglang}/models/utils.py:478)",
                                  f"RMSNorm.forward_native ({sglang}/layers/layernorm.py:828)"])
    assert model_part(norm_in_attention) == "norms"
    sdpa = ";".join([qwen3, f"RadixAttention.forward ({sglang}/layers/radix_attention.py:114)",
                     f"_run_sdpa_forward_extend ({sglang}/layers/attention/torch_native_backend.py:61)"])
    assert model_part(sdpa) == "attention"
    assert model_part(f"{qwen3};SiluAndMul.forward_native ({sglang}/layers/activation.py:143)") == "activation"
    vllm = "/venvs/vllm/lib/python3.11/site-packages/vllm/model_executor"
    assert model_part(f"{qwen3};forward ({vllm}/layers/linear.py:612)") == "linear"
    assert model_part(qwen3) == "rest of the model"


def test_a_raw_sample_whose_frame_name_holds_a_newline_is_read_whole():
    raw = "main (a.py:1);step (b.py:2) 3\nmain (a.py:1);   (\n  :-10);get (c.py:7) 2\nmain (a.py:1) 1\n"
    assert list(samples(raw)) == [("main (a.py:1);step (b.py:2)", 3), ("main (a.py:1);   (\n  :-10);get (c.py:7)", 2),
                                  ("main (a.py:1)", 1)]
