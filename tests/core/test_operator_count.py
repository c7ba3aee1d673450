"""The operator-count benchmark's reading of a profiler trace (benchmarks/operator_count.py), on a trace made by hand:
only forwards that no other forward encloses count, and only operators called inside a forward and by no other
operator."""

import pytest

from benchmarks.operator_count import FORWARD_MARK, forward_operators, is_reference_forward, is_sglang_forward

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
    got = forward_operators(trace, is_sglang_forward)
    assert got["forwards"] == 2
    assert got["calls"] == {"aten::linear": 1.0, "aten::mul": 1.0}
    assert got["operator_calls"] == pytest.approx(2.0)
    assert got["operator_ms"] == pytest.approx((20 + 5 + 5 + 30) / 1e3 / 2)
    assert got["forward_ms"] == pytest.approx((100 + 50) / 1e3 / 2)
    assert got["slowest"]["aten::linear"] == {"ms": pytest.approx(0.025), "calls": 1.0}


def test_the_reference_forward_is_its_marked_model_call():
    trace = [event("user_annotation", FORWARD_MARK, 0, 10), event("cpu_op", "aten::linear", 2, 5),
             event("user_annotation", "another mark", 20, 10), event("cpu_op", "aten::mul", 22, 5)]
    assert forward_operators(trace, is_reference_forward)["calls"] == {"aten::linear": 1.0}


def test_a_trace_without_a_forward_is_refused():
    with pytest.raises(SystemExit, match="no model forward"):
        forward_operators([event("cpu_op", "aten::mul", 0, 5)], is_sglang_forward)
