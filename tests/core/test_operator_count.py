"""The operator-count benchmark's reading of a profiler trace (benchmarks/operator_count.py), on a trace made by hand:
only forwards that no other forward encloses count, and only operators called inside a forward and by no other
operator."""

import pytest

from benchmarks.operator_count import (
    ATTENTION,
    FORWARD_MARK,
    PLUGIN_HOOK,
    REFERENCE_PARTS,
    SGLANG_PARTS,
    forward_operators,
    is_reference_forward,
    is_sglang_forward,
)

MODEL = "sglang/srt/models/qwen3.py(602): forward"


def event(cat: str, name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}


def test_top_level_operators_inside_outermost_forwards_are_counted():
    trace = [
        event("python_function", MODEL, 0, 100),
        event("python_function", "sglang/srt/models/qwen3.py(506): forward", 5, 90),  # the inner model: same forward
        event("cpu_op", "aten::linear", 10, 20),
        event("cpu_op", "aten::mm", 12, 15),  # called by linear: not top-level
        event("cpu_op", "aten::mul", 40, 5),
        event("cpu_op", "aten::mul", 50, 5),
        event("cpu_op", "aten::argmax", 120, 5),  # after the forward: the sampler's
        event("python_function", MODEL, 200, 50),
        event("cpu_op", "aten::linear", 210, 30),
        event("cpu_op", "aten::add", 200, 4, tid=2),  # another thread, outside any forward
        {"ph": "i", "name": "an instant event", "ts": 5, "pid": 7, "tid": 1},
    ]
    got = forward_operators(trace, is_sglang_forward, {})
    assert got["forwards"] == 2
    assert got["calls"] == {"aten::linear": 1.0, "aten::mul": 1.0}
    assert got["operator_calls"] == pytest.approx(2.0)
    assert got["operator_ms"] == pytest.approx((20 + 5 + 5 + 30) / 1e3 / 2)
    assert got["forward_ms"] == pytest.approx((100 + 50) / 1e3 / 2)
    assert got["slowest"]["aten::linear"] == {"ms": pytest.approx(0.025), "calls": 1.0}


def test_the_reference_forward_is_its_marked_model_call():
    trace = [event("user_annotation", FORWARD_MARK, 0, 10), event("cpu_op", "aten::linear", 2, 5),
             event("user_annotation", "another mark", 20, 10), event("cpu_op", "aten::mul", 22, 5)]
    assert forward_operators(trace, is_reference_forward, {})["calls"] == {"aten::linear": 1.0}


def test_a_trace_without_a_forward_is_refused():
    with pytest.raises(SystemExit, match="no model forward"):
        forward_operators([event("cpu_op", "aten::mul", 0, 5)], is_sglang_forward, {})


def test_a_part_is_the_time_inside_its_outermost_frames_in_a_forward_and_the_operators_called_there():
    attention = "sglang/srt/layers/radix_attention.py(114): forward"
    hook = "/work/plugins/sglang_blockdiff/hooks.py(220): attend_from_extend_tokens_only"
    trace = [
        event("python_function", MODEL, 0, 100),
        event("python_function", attention, 10, 30),
        event("python_function", attention, 12, 20),  # a frame of the same part inside it: counted once
        event("cpu_op", "aten::index_put_", 13, 2),
        event("python_function", hook, 20, 10),
        event("cpu_op", "aten::scaled_dot_product_attention", 21, 5),
        event("cpu_op", "aten::mm", 22, 2),  # called by an operator: not top-level
        event("python_function", attention, 50, 10),
        event("cpu_op", "aten::linear", 70, 5),  # in the forward, outside the parts
        event("python_function", attention, 200, 10),  # outside any forward
        event("cpu_op", "aten::mul", 201, 1),
    ]
    parts = forward_operators(trace, is_sglang_forward, SGLANG_PARTS)["parts"]
    assert parts[ATTENTION]["ms"] == pytest.approx((30 + 10) / 1e3)
    assert parts[ATTENTION]["operator_calls"] == 2.0
    assert parts[ATTENTION]["operator_ms"] == pytest.approx((2 + 5) / 1e3)
    assert parts[ATTENTION]["operators"] == {"aten::scaled_dot_product_attention": {"ms": 0.005, "calls": 1.0},
                                             "aten::index_put_": {"ms": 0.002, "calls": 1.0}}
    assert parts[PLUGIN_HOOK] == {"ms": pytest.approx(10 / 1e3), "operator_calls": 1.0,
                                  "operator_ms": pytest.approx(5 / 1e3),
                                  "operators": {"aten::scaled_dot_product_attention": {"ms": 0.005, "calls": 1.0}}}


def test_the_reference_attention_is_its_cache_update_and_attention_function():
    trace = [event("user_annotation", FORWARD_MARK, 0, 100),
             event("python_function", "core/blockdiff/models/layers.py(70): update", 10, 8),
             event("cpu_op", "aten::index_put_", 11, 2),
             event("python_function", "core/blockdiff/models/layers.py(82): attention", 20, 6),
             event("cpu_op", "aten::scaled_dot_product_attention", 21, 4),
             event("python_function", "core/blockdiff/models/layers.py(18): forward", 30, 5),  # a norm
             event("cpu_op", "aten::mean", 31, 1)]
    part = forward_operators(trace, is_reference_forward, REFERENCE_PARTS)["parts"][ATTENTION]
    assert part["ms"] == pytest.approx(0.014)
    assert (part["operator_calls"], part["operator_ms"]) == (2.0, pytest.approx(0.006))
    assert list(part["operators"]) == ["aten::scaled_dot_product_attention", "aten::index_put_"]
