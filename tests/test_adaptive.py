"""Tests of `trl_trm.adaptive.AdaptiveThresholds`, the bounded multiplicative threshold controller.

Expected values are written out by hand from the update rule
``scale <- clip(scale * exp(rate * (target - accept_rate)), min_scale, max_scale)``, never taken from the code.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_trm.adaptive import STATE_FILE_NAME, AdaptiveThresholds

LOG2 = math.log(2.0)


def make(**overrides) -> AdaptiveThresholds:
    kwargs = dict(target_accept_rate=0.9, initial_delta_max=LOG2, initial_delta_avg=0.01)
    kwargs.update(overrides)
    return AdaptiveThresholds(**kwargs)


# ------------------------------------------------------------------------------------------------ single steps


def test_initial_thresholds_are_the_configured_ones():
    ctrl = make()
    assert ctrl.scale == 1.0 and ctrl.num_updates == 0
    assert ctrl.delta_max == LOG2
    assert ctrl.delta_avg == 0.01


def test_accept_below_target_loosens_by_hand_value():
    ctrl = make(target_accept_rate=0.9, rate=0.1)
    ctrl.update(0.4)  # error = 0.9 - 0.4 = 0.5
    assert ctrl.scale == pytest.approx(math.exp(0.1 * 0.5), rel=1e-15)
    assert ctrl.scale > 1.0
    assert ctrl.delta_max == pytest.approx(LOG2 * math.exp(0.05), rel=1e-15)
    assert ctrl.delta_avg == pytest.approx(0.01 * math.exp(0.05), rel=1e-15)
    assert ctrl.num_updates == 1


def test_accept_above_target_tightens_by_hand_value():
    ctrl = make(target_accept_rate=0.5, rate=0.2)
    ctrl.update(1.0)  # error = 0.5 - 1.0 = -0.5
    assert ctrl.scale == pytest.approx(math.exp(-0.1), rel=1e-15)
    assert ctrl.scale < 1.0
    ctrl.update(0.75)  # error = -0.25 -> total log step -0.1 - 0.05
    assert ctrl.scale == pytest.approx(math.exp(-0.15), rel=1e-14)
    assert ctrl.delta_max == pytest.approx(LOG2 * math.exp(-0.15), rel=1e-14)
    assert ctrl.num_updates == 2


def test_accept_at_target_leaves_scale_unchanged_but_counts():
    ctrl = make(target_accept_rate=0.75)
    ctrl.update(0.75)
    assert ctrl.scale == 1.0
    assert ctrl.num_updates == 1


def test_clipped_at_max_scale():
    ctrl = make(target_accept_rate=1.0, rate=1.0, max_scale=2.0)
    ctrl.update(0.0)  # exp(1) = 2.718 > 2 -> clipped
    assert ctrl.scale == 2.0
    assert ctrl.delta_max == 2 * LOG2
    for _ in range(50):
        ctrl.update(0.0)
    assert ctrl.scale == 2.0
    assert ctrl.num_updates == 51
    ctrl.update(1.0)  # error 0: stays pinned; then one step down leaves the limit
    assert ctrl.scale == 2.0
    ctrl2 = make(target_accept_rate=0.5, rate=1.0, max_scale=2.0, scale=2.0)
    ctrl2.update(1.0)
    assert ctrl2.scale == pytest.approx(2.0 * math.exp(-0.5), rel=1e-15)


def test_clipped_at_min_scale():
    ctrl = make(target_accept_rate=0.1, rate=5.0, min_scale=0.5)
    ctrl.update(1.0)  # exp(5 * -0.9) = 0.011 < 0.5 -> clipped
    assert ctrl.scale == 0.5
    assert ctrl.delta_avg == 0.005
    for _ in range(20):
        ctrl.update(1.0)
    assert ctrl.scale == 0.5


def test_limits_equal_to_one_freeze_the_thresholds():
    ctrl = make(min_scale=1.0, max_scale=1.0)
    for a in (0.0, 1.0, 0.3):
        ctrl.update(a)
        assert ctrl.scale == 1.0
        assert ctrl.delta_max == LOG2


@pytest.mark.parametrize("which", ["initial_delta_max", "initial_delta_avg"])
def test_none_threshold_stays_none(which):
    ctrl = make(**{which: None})
    attr = which.removeprefix("initial_")
    other = "delta_avg" if attr == "delta_max" else "delta_max"
    assert getattr(ctrl, attr) is None
    ctrl.update(0.0)
    ctrl.update(0.2)
    assert getattr(ctrl, attr) is None
    expected_scale = math.exp(0.1 * 0.9) * math.exp(0.1 * 0.7)
    assert ctrl.scale == pytest.approx(expected_scale, rel=1e-14)
    assert getattr(ctrl, other) == pytest.approx(getattr(ctrl, "initial_" + other) * expected_scale, rel=1e-14)


def test_nan_accept_rate_is_ignored():
    ctrl = make()
    ctrl.update(0.5)
    scale = ctrl.scale
    ctrl.update(float("nan"))
    assert ctrl.scale == scale
    assert ctrl.num_updates == 1


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("inf"), float("-inf"), -1.0, 2.0])
def test_accept_rate_outside_unit_interval_raises(bad):
    ctrl = make()
    with pytest.raises(ValueError, match="accept_rate"):
        ctrl.update(bad)
    assert ctrl.scale == 1.0 and ctrl.num_updates == 0


def test_accept_rate_boundaries_are_valid():
    ctrl = make(target_accept_rate=0.5, rate=0.1)
    ctrl.update(0.0)
    ctrl.update(1.0)
    assert ctrl.scale == pytest.approx(1.0, abs=1e-15)  # +0.05 then -0.05 in log scale
    assert ctrl.num_updates == 2


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"target_accept_rate": 0.0}, "trm_target_accept_rate"),
        ({"target_accept_rate": -0.5}, "trm_target_accept_rate"),
        ({"target_accept_rate": 1.5}, "trm_target_accept_rate"),
        ({"target_accept_rate": float("nan")}, "trm_target_accept_rate"),
        ({"rate": 0.0}, "trm_adapt_rate"),
        ({"rate": -0.1}, "trm_adapt_rate"),
        ({"rate": float("inf")}, "trm_adapt_rate"),
        ({"min_scale": 0.0}, "trm_adapt_min_scale"),
        ({"min_scale": -1.0}, "trm_adapt_min_scale"),
        ({"min_scale": 1.5, "max_scale": 2.0}, "trm_adapt_min_scale"),
        ({"max_scale": 0.9}, "trm_adapt_max_scale"),
        ({"max_scale": float("inf")}, "trm_adapt_max_scale"),
        ({"initial_delta_max": None, "initial_delta_avg": None}, "trm_delta_max"),
        ({"initial_delta_max": 0.0}, "trm_delta_max"),
        ({"initial_delta_max": -LOG2}, "trm_delta_max"),
        ({"initial_delta_avg": -0.01}, "trm_delta_avg"),
        ({"initial_delta_avg": float("nan")}, "trm_delta_avg"),
        ({"scale": 20.0}, "scale"),
        ({"num_updates": -1}, "num_updates"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make(**overrides)


def test_target_one_is_valid():
    ctrl = make(target_accept_rate=1.0)
    ctrl.update(1.0)
    assert ctrl.scale == 1.0


# ------------------------------------------------------------------------------------------------ closed loop


def plant(delta_max: float, c: float) -> float:
    """Monotone accept rate of a synthetic batch distribution: P(D_max <= delta) for D_max ~ Exponential(mean c)."""
    return 1.0 - math.exp(-delta_max / c)


def run_closed_loop(ctrl: AdaptiveThresholds, c: float, steps: int) -> None:
    for _ in range(steps):
        ctrl.update(plant(ctrl.delta_max, c))


# The scale at which the plant meets the target is s* = delta* / initial with delta* = -c log(1 - target). The tests
# draw the regime and log s* directly (and derive c), so the reachable and both unreachable regimes are all covered;
# MARGIN keeps s* clearly inside or clearly outside the limits.
MARGIN = 0.05
STEPS = 5000


@settings(max_examples=90, deadline=None)
@given(
    regime=st.sampled_from(["reachable", "above_max", "below_min"]),
    position=st.floats(0.0, 1.0),
    target=st.floats(0.05, 0.95),
    initial=st.floats(0.01, 2.0),
    rate=st.floats(0.2, 3.0),
    min_scale=st.floats(0.05, 0.8),
    max_scale=st.floats(1.25, 20.0),
)
def test_closed_loop_converges_or_pins_at_limit(regime, position, target, initial, rate, min_scale, max_scale):
    lo, hi = math.log(min_scale), math.log(max_scale)
    if regime == "reachable":
        log_s_star = lo + MARGIN + position * (hi - lo - 2 * MARGIN)
    elif regime == "above_max":
        log_s_star = hi + MARGIN + position * 2.0
    else:
        log_s_star = lo - MARGIN - position * 2.0
    s_star = math.exp(log_s_star)
    c = initial * s_star / -math.log1p(-target)
    ctrl = AdaptiveThresholds(
        target_accept_rate=target,
        initial_delta_max=initial,
        initial_delta_avg=None,
        rate=rate,
        min_scale=min_scale,
        max_scale=max_scale,
    )
    run_closed_loop(ctrl, c, steps=STEPS)
    assert min_scale <= ctrl.scale <= max_scale
    if regime == "above_max":  # even the widest allowed trust region accepts less than the target
        assert ctrl.scale == max_scale
        assert plant(ctrl.delta_max, c) < target
    elif regime == "below_min":  # even the tightest allowed trust region accepts more than the target
        assert ctrl.scale == min_scale
        assert plant(ctrl.delta_max, c) > target
    else:
        assert plant(ctrl.delta_max, c) == pytest.approx(target, abs=1e-6)
        assert ctrl.scale == pytest.approx(s_star, rel=1e-4)


@settings(max_examples=20, deadline=None)
@given(initial=st.floats(0.01, 2.0), x_at_max=st.floats(0.05, 3.0))
def test_closed_loop_target_one_is_unreachable_and_pins_at_max(initial, x_at_max):
    # accept < 1 for every finite threshold, so a target of 1 always drives the scale to max_scale (here 4); c is
    # chosen so that the accept rate at the limit, 1 - exp(-x_at_max), stays visibly below 1.
    c = 4.0 * initial / x_at_max
    ctrl = AdaptiveThresholds(
        target_accept_rate=1.0, initial_delta_max=initial, initial_delta_avg=0.01, rate=1.0, max_scale=4.0
    )
    run_closed_loop(ctrl, c, steps=STEPS)
    assert ctrl.scale == 4.0
    assert ctrl.delta_max == initial * 4.0
    assert ctrl.delta_avg == 0.01 * 4.0


@settings(max_examples=30, deadline=None)
@given(accepts=st.lists(st.one_of(st.floats(0.0, 1.0), st.just(float("nan"))), max_size=60))
def test_scale_always_within_limits_and_thresholds_positive(accepts):
    ctrl = make(rate=2.0, min_scale=0.25, max_scale=3.0)
    for a in accepts:
        ctrl.update(a)
        assert 0.25 <= ctrl.scale <= 3.0
        assert ctrl.delta_max > 0 and ctrl.delta_avg > 0
    assert ctrl.num_updates == sum(not math.isnan(a) for a in accepts)


# ------------------------------------------------------------------------------------------------ persistence

ACCEPTS = [0.2, 0.95, 0.5, 0.0, 1.0, 0.33, 0.7, 0.1, 0.85, 0.6]


def _trajectory(ctrl: AdaptiveThresholds, accepts) -> list[tuple]:
    out = []
    for a in accepts:
        ctrl.update(a)
        out.append((ctrl.scale, ctrl.delta_max, ctrl.delta_avg, ctrl.num_updates))
    return out


def test_state_dict_round_trip_continues_identically():
    config = dict(rate=0.7, min_scale=0.5, max_scale=1.5)
    reference = make(**config)
    expected = _trajectory(reference, ACCEPTS)

    first = make(**config)
    _trajectory(first, ACCEPTS[:5])
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = make(**config)
    resumed.load_state_dict(state)
    assert resumed.scale == first.scale and resumed.num_updates == 5
    assert _trajectory(resumed, ACCEPTS[5:]) == expected[5:]  # exact equality, not approx


def test_save_load_round_trip_continues_identically(tmp_path):
    config = dict(rate=0.7, initial_delta_avg=None)
    reference = make(**config)
    expected = _trajectory(reference, ACCEPTS)

    first = make(**config)
    _trajectory(first, ACCEPTS[:5])
    path = first.save(tmp_path / "checkpoint-5")
    assert path == str(tmp_path / "checkpoint-5" / STATE_FILE_NAME)
    saved = json.loads((tmp_path / "checkpoint-5" / STATE_FILE_NAME).read_text())
    assert saved["scale"] == first.scale and saved["num_updates"] == 5
    assert saved["initial_delta_avg"] is None

    resumed = make(**config)
    resumed.load(tmp_path / "checkpoint-5")
    assert _trajectory(resumed, ACCEPTS[5:]) == expected[5:]
    assert (resumed.scale, resumed.num_updates) == (reference.scale, reference.num_updates)


def test_load_missing_file_raises_naming_path(tmp_path):
    ctrl = make()
    with pytest.raises(FileNotFoundError, match=STATE_FILE_NAME) as info:
        ctrl.load(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"target_accept_rate": 0.8}, "trm_target_accept_rate"),
        ({"initial_delta_max": 0.5}, "trm_delta_max"),
        ({"initial_delta_max": None}, "trm_delta_max"),
        ({"initial_delta_avg": 0.02}, "trm_delta_avg"),
        ({"rate": 0.2}, "trm_adapt_rate"),
        ({"min_scale": 0.2}, "trm_adapt_min_scale"),
        ({"max_scale": 5.0}, "trm_adapt_max_scale"),
    ],
)
def test_load_with_mismatched_config_raises_naming_the_field(tmp_path, overrides, field):
    saved = make()
    saved.update(0.3)
    saved.save(tmp_path)
    other = make(**overrides)
    with pytest.raises(ValueError, match=f"`{field}`"):
        other.load(tmp_path)
    assert other.scale == 1.0 and other.num_updates == 0  # untouched on failure
    with pytest.raises(ValueError, match=f"`{field}`"):
        other.load_state_dict(saved.state_dict())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.pop("scale"), "missing"),
        (lambda s: s.update(version=99), "version"),
        (lambda s: s.update(scale=100.0), "scale"),
        (lambda s: s.update(scale=float("nan")), "scale"),
        (lambda s: s.update(num_updates=-3), "num_updates"),
    ],
)
def test_load_malformed_state_raises(mutate, match):
    state = make().state_dict()
    mutate(state)
    with pytest.raises(ValueError, match=match):
        make().load_state_dict(state)


def test_load_truncated_file_names_the_file_and_the_fix(tmp_path):
    saved = make()
    saved.update(0.3)
    path = saved.save(tmp_path)
    text = open(path, encoding="utf-8").read()
    open(path, "w", encoding="utf-8").write(text[: len(text) // 2])  # cut short, as by a full disk
    ctrl = make()
    with pytest.raises(ValueError, match="is not valid JSON") as info:
        ctrl.load(tmp_path)
    message = str(info.value)
    assert path in message and "earlier complete checkpoint" in message
    assert ctrl.scale == 1.0 and ctrl.num_updates == 0  # untouched on failure
