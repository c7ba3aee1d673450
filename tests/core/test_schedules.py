import pytest

from blockdiff.schedules import Phase, WSDSchedule, warmup_cosine


def test_paper_shape_warmup_stable_decay():
    s = WSDSchedule.build(4096, warmup_tokens=10, stable_tokens=20, decay_tokens=5)
    assert [p.block_size for p in s.phases] == [1, 4, 32, 64, 4096, 2048, 1024, 512, 256, 128, 64, 32]
    assert [p.objective for p in s.phases] == ["bdlm"] * 4 + ["mdlm"] + ["bdlm"] * 7
    assert s.total_tokens == 4 * 10 + 20 + 7 * 5


def test_phase_of_each_step_follows_the_budgets():
    s = WSDSchedule.build(64, warmup=(1, 4), decay=(32,), warmup_tokens=100, stable_tokens=300, decay_tokens=64)
    per_step = 64
    assert s.steps(per_step) == [2, 2, 5, 1]  # budgets rounded up to whole steps
    names = [s.phase_at(i, per_step).name for i in range(s.total_steps(per_step))]
    assert names == ["warmup-1"] * 2 + ["warmup-4"] * 2 + ["stable-64"] * 5 + ["decay-32"]
    with pytest.raises(ValueError, match="past the schedule"):
        s.phase_at(10, per_step)


def test_phase_is_a_pure_function_of_the_step():
    """A resumed run recomputes its phase from the step alone: same answer as the uninterrupted run."""
    s = WSDSchedule.build(256, warmup_tokens=1000, stable_tokens=3000, decay_tokens=700)
    first = [s.phase_at(i, 512) for i in range(s.total_steps(512))]
    again = WSDSchedule.build(256, warmup_tokens=1000, stable_tokens=3000, decay_tokens=700)
    assert [again.phase_at(i, 512) for i in range(17, s.total_steps(512))] == first[17:]


def test_sequence_length_not_divisible_by_block_is_rejected():
    with pytest.raises(ValueError, match="sequence length 100 is not divisible by block size 32"):
        WSDSchedule.build(100, warmup=(1, 4), decay=(32,))


@pytest.mark.parametrize("phase,match", [(Phase("x", 4, 0, "bdlm"), "token budget"),
                                         (Phase("x", 4, 8, "ar"), "objective")])
def test_bad_phase_is_rejected(phase, match):
    with pytest.raises(ValueError, match=match):
        WSDSchedule(64, (phase,))


def test_warmup_cosine_rises_then_falls_to_its_floor():
    factors = [warmup_cosine(step, warmup_steps=4, total_steps=20, min_ratio=0.1) for step in range(25)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:20], factors[5:21]))
    assert factors[20:] == [pytest.approx(0.1)] * 5
