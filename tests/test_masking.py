"""Unit and property tests of `trl_trm.masking` against the definitions in `shared/trm-spec.md`.

Expected values are derived by hand from the spec formulas (math.exp / math.log on explicit numbers) or from an
independent python-loop implementation (`_brute_force_row`), never from outputs of the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_trm.masking import (
    SEQUENCE_MASK_MODES,
    TRM_MODES,
    TrustRegionMaskOutput,
    compute_trust_region_mask,
    summarize_mask_stats,
    validate_thresholds,
)

ROLL = -1.25  # rollout log-prob used for every valid token of the hand-built batches; theta = ROLL + log_ratio
LOG2 = math.log(2.0)
STAT_NAMES = ("log_ratio_abs_max", "k3_mean", "k1_mean", "geo_ratio", "seq_log_ratio")
GARBAGE = (1e4, -1e4, float("nan"), float("inf"), float("-inf"))

# Thresholds valid for every mode, so one call per mode works in loops.
MODE_KWARGS = {
    "trm": {},
    "geo_mask": {},
    "seq_mis": {"ratio_min": 0.5},
    "seq_tis": {"ratio_min": 0.5},
    "token_tis": {"ratio_min": 0.5},
    "token_mis": {"ratio_min": 0.5},
    "none": {},
}

# Modes decided by the sampled-token log-ratios alone; `trm_exact` (needs `kl_tok`) is tested in test_exact_kl.py.
RATIO_MODES = tuple(m for m in TRM_MODES if m != "trm_exact")


def k3(r: float) -> float:
    """Spec: k3(rho) = rho - 1 - log rho with rho = exp(r)."""
    return math.exp(r) - 1.0 - r


def make_batch(rows, T=None, dtype=torch.float32, pad_theta=0.0, pad_roll=0.0):
    """Right-padded batch from per-token log-ratios: returns (theta, roll, mask)."""
    T = max((len(r) for r in rows), default=0) if T is None else T
    theta = torch.full((len(rows), T), pad_theta, dtype=torch.float64)
    roll = torch.full((len(rows), T), pad_roll, dtype=torch.float64)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        for t, r in enumerate(row):
            theta[i, t] = ROLL + r
            roll[i, t] = ROLL
            mask[i, t] = 1
    return theta.to(dtype), roll.to(dtype), mask


def run(rows, mode="trm", **kwargs):
    theta, roll, mask = make_batch(rows)
    return compute_trust_region_mask(theta, roll, mask, mode=mode, **kwargs), mask


def approx(values, rel=1e-5, abs=1e-7):
    return pytest.approx(values, rel=rel, abs=abs)


def assert_hand_stats(out, rows):
    """Per-row statistics from the spec formulas applied by hand to the explicit log-ratios."""
    lengths = [len(r) for r in rows]
    assert out.length.tolist() == lengths
    assert out.log_ratio_abs_max.tolist() == approx([max((abs(x) for x in r), default=0.0) for r in rows])
    assert out.k3_mean.tolist() == approx([sum(k3(x) for x in r) / max(len(r), 1) for r in rows])
    assert out.seq_log_ratio.tolist() == approx([sum(r) for r in rows])
    assert out.geo_ratio.tolist() == approx([math.exp(sum(r) / max(len(r), 1)) for r in rows])
    assert out.k1_mean.tolist() == approx([-sum(r) / max(len(r), 1) for r in rows])
    assert out.finite.all()


def assert_rejected_by(out, expected: dict[str, list[bool]]):
    assert set(out.rejected_by) == set(expected)
    for name, values in expected.items():
        assert out.rejected_by[name].tolist() == values, name


def expected_mask_weights(keep, mask):
    return [[float(keep[i] and bool(mask[i, t])) for t in range(mask.shape[1])] for i in range(len(keep))]


# ---------------------------------------------------------------------------------------------------------------------
# 1. Hand-computed cases, one per mode
# ---------------------------------------------------------------------------------------------------------------------

TRM_ROWS = [
    [0.05, -0.05, 0.0],  # D_max 0.05, D_avg (k3(.05)+k3(-.05))/3 = 8.3e-4: kept
    [-0.6] + [0.0] * 7,  # D_max 0.6 > 0.5 (symmetric: a ratio << 1), D_avg k3(-.6)/8 = 0.0186 <= 0.02: max binds
    [0.3] * 4,  # D_max 0.3 <= 0.5, D_avg k3(.3) = 0.0499 > 0.02: avg binds
    [0.7, 0.7],  # D_max 0.7, D_avg k3(.7) = 0.314: both reject
]


def test_trm_hand_computed_both_criteria():
    # the hand arithmetic the rows were designed around
    assert k3(-0.6) / 8 < 0.02 < k3(0.3)
    out, mask = run(TRM_ROWS, delta_max=0.5, delta_avg=0.02)
    assert out.keep.tolist() == [True, False, False, False]
    assert_rejected_by(
        out,
        {
            "nonfinite": [False] * 4,
            "delta_max": [False, True, False, True],
            "delta_avg": [False, False, True, True],
        },
    )
    assert out.weights.tolist() == expected_mask_weights([True, False, False, False], mask)
    assert out.token_weight_sum.tolist() == [3.0, 0.0, 0.0, 0.0]
    # explicit hand values
    assert out.length.tolist() == [3, 8, 4, 2]
    assert out.log_ratio_abs_max.tolist() == approx([0.05, 0.6, 0.3, 0.7])
    assert out.k3_mean.tolist() == approx(
        [
            (math.exp(0.05) - 1.05 + math.exp(-0.05) - 0.95) / 3,
            (math.exp(-0.6) - 0.4) / 8,
            math.exp(0.3) - 1.3,
            math.exp(0.7) - 1.7,
        ]
    )
    assert out.geo_ratio.tolist() == approx([1.0, math.exp(-0.6 / 8), math.exp(0.3), math.exp(0.7)])
    assert out.seq_log_ratio.tolist() == approx([0.0, -0.6, 1.2, 1.4])
    assert out.k1_mean.tolist() == approx([0.0, 0.6 / 8, -0.3, -0.7])
    assert out.finite.tolist() == [True] * 4


def test_trm_avg_criterion_off():
    out, mask = run(TRM_ROWS, delta_max=0.5, delta_avg=None)
    assert out.keep.tolist() == [True, False, True, False]
    assert_rejected_by(out, {"nonfinite": [False] * 4, "delta_max": [False, True, False, True]})
    assert out.weights.tolist() == expected_mask_weights([True, False, True, False], mask)
    assert_hand_stats(out, TRM_ROWS)


def test_trm_max_criterion_off():
    out, mask = run(TRM_ROWS, delta_max=None, delta_avg=0.02)
    assert out.keep.tolist() == [True, True, False, False]
    assert_rejected_by(out, {"nonfinite": [False] * 4, "delta_avg": [False, False, True, True]})
    assert out.weights.tolist() == expected_mask_weights([True, True, False, False], mask)
    assert_hand_stats(out, TRM_ROWS)


def test_trm_default_thresholds():
    # default delta_max = log 2: |log rho| = 0.69 < log 2 = 0.6931 is inside, 0.70 is outside (both signs)
    rows = [[0.69], [0.70], [-0.70]]
    out, _ = run(rows, delta_avg=None)
    assert out.keep.tolist() == [True, False, False]
    # default delta_avg = 0.01: k3(0.1) = 0.00517 inside, k3(0.15) = 0.01183 outside
    assert k3(0.1) < 0.01 < k3(0.15)
    out, _ = run([[0.1, 0.1], [0.15, 0.15]], delta_max=None)
    assert out.keep.tolist() == [True, False]


GEO_ROWS = [
    [0.004, 0.006, 0.005],  # geo = e^0.005 = 1.0050: inside [0.99, 1.01]
    [0.02, 0.02],  # geo = e^0.02 = 1.0202 > 1.01
    [-0.05, 0.01],  # geo = e^-0.02 = 0.9802 < 0.99
    [0.5, -0.5, 0.0, 0.0],  # geo = 1: large token deviations cancel in the geometric mean
]


def test_geo_mask_hand_computed():
    assert math.exp(-0.02) < 0.99 and math.exp(0.02) > 1.01 and 0.99 < math.exp(0.005) < 1.01
    out, mask = run(GEO_ROWS, mode="geo_mask")  # defaults 0.99 / 1.01
    assert out.keep.tolist() == [True, False, False, True]
    assert_rejected_by(
        out,
        {"nonfinite": [False] * 4, "geo_low": [False, False, True, False], "geo_high": [False, True, False, False]},
    )
    assert out.weights.tolist() == expected_mask_weights([True, False, False, True], mask)
    assert out.geo_ratio.tolist() == approx([math.exp(0.005), math.exp(0.02), math.exp(-0.02), 1.0])
    assert out.log_ratio_abs_max.tolist() == approx([0.006, 0.02, 0.05, 0.5])
    assert_hand_stats(out, GEO_ROWS)


def test_geo_mask_one_side_off():
    out, mask = run(GEO_ROWS, mode="geo_mask", geo_high=None)
    assert out.keep.tolist() == [True, True, False, True]
    assert_rejected_by(out, {"nonfinite": [False] * 4, "geo_low": [False, False, True, False]})
    assert out.weights.tolist() == expected_mask_weights([True, True, False, True], mask)


SEQ_ROWS = [
    [0.2, 0.2, 0.2],  # sum 0.6 <= log 2 = 0.693
    [0.3, 0.3, 0.3],  # sum 0.9 > log 2
    [-0.3, -0.3, -0.3],  # sum -0.9 < log 0.5 = -0.693
    [0.5, 0.5, -0.5, -0.4],  # sum 0.1
]


def test_seq_mis_hand_computed():
    out, mask = run(SEQ_ROWS, mode="seq_mis")  # ratio_max defaults to C = 2, no ratio_min
    assert out.keep.tolist() == [True, False, True, True]
    assert_rejected_by(out, {"nonfinite": [False] * 4, "ratio_max": [False, True, False, False]})
    assert out.weights.tolist() == expected_mask_weights([True, False, True, True], mask)
    assert out.seq_log_ratio.tolist() == approx([0.6, 0.9, -0.9, 0.1])
    assert_hand_stats(out, SEQ_ROWS)

    out, mask = run(SEQ_ROWS, mode="seq_mis", ratio_min=0.5)
    assert out.keep.tolist() == [True, False, False, True]
    assert_rejected_by(
        out,
        {
            "nonfinite": [False] * 4,
            "ratio_max": [False, True, False, False],
            "ratio_min": [False, False, True, False],
        },
    )
    assert out.weights.tolist() == expected_mask_weights([True, False, False, True], mask)

    out, _ = run(SEQ_ROWS, mode="seq_mis", ratio_max=3.0)  # log 3 = 1.0986 > 0.9
    assert out.keep.tolist() == [True] * 4


def test_seq_tis_hand_computed():
    out, mask = run(SEQ_ROWS, mode="seq_tis")  # weight = exp(min(sum, log 2))
    assert out.keep.tolist() == [True] * 4
    assert_rejected_by(out, {"nonfinite": [False] * 4})
    per_seq = [math.exp(0.6), 2.0, math.exp(-0.9), math.exp(0.1)]
    expected = [[per_seq[i] * float(mask[i, t]) for t in range(mask.shape[1])] for i in range(4)]
    assert out.weights.flatten().tolist() == approx([w for row in expected for w in row])
    assert out.token_weight_sum.tolist() == approx([3 * per_seq[0], 3 * 2.0, 3 * per_seq[2], 4 * per_seq[3]])
    assert_hand_stats(out, SEQ_ROWS)

    out, mask = run(SEQ_ROWS, mode="seq_tis", ratio_min=0.5)  # exp(-0.9) = 0.41 is raised to 0.5
    per_seq = [math.exp(0.6), 2.0, 0.5, math.exp(0.1)]
    assert out.weights[:, 0].tolist() == approx(per_seq)
    assert out.weights[:3, 3].tolist() == [0.0, 0.0, 0.0]  # padding


TOKEN_ROWS = [[0.9, 0.1, -2.0, -0.5], [math.log(3.0), -0.1]]


def test_token_tis_hand_computed():
    out, mask = run(TOKEN_ROWS, mode="token_tis")  # weight_t = min(rho_t, 2)
    assert out.keep.tolist() == [True, True]
    assert_rejected_by(out, {"nonfinite": [False, False]})
    expected = [2.0, math.exp(0.1), math.exp(-2.0), math.exp(-0.5), 2.0, math.exp(-0.1), 0.0, 0.0]
    assert out.weights.flatten().tolist() == approx(expected)
    assert_hand_stats(out, TOKEN_ROWS)

    out, _ = run(TOKEN_ROWS, mode="token_tis", ratio_min=0.5)  # e^-2 = 0.135 -> 0.5; e^-0.5 = 0.607 unchanged
    expected = [2.0, math.exp(0.1), 0.5, math.exp(-0.5), 2.0, math.exp(-0.1), 0.0, 0.0]
    assert out.weights.flatten().tolist() == approx(expected)


def test_token_mis_hand_computed():
    out, _ = run(TOKEN_ROWS, mode="token_mis", ratio_min=0.5)  # [0.5 <= rho_t <= 2]
    assert out.keep.tolist() == [True, True]
    assert_rejected_by(out, {"nonfinite": [False, False]})
    # rho = e^0.9 = 2.46 out, e^0.1 in, e^-2 = 0.135 out, e^-0.5 = 0.607 in | 3 out, e^-0.1 in | padding
    assert out.weights.tolist() == [[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    assert out.token_weight_sum.tolist() == [2.0, 1.0]
    assert_hand_stats(out, TOKEN_ROWS)

    out, _ = run(TOKEN_ROWS, mode="token_mis")  # no lower bound: e^-2 is in
    assert out.weights.tolist() == [[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]


def test_none_mode_only_diagnostics():
    out, mask = run(TRM_ROWS, mode="none")
    assert out.keep.tolist() == [True] * 4
    assert out.rejected_by == {}
    assert out.weights.tolist() == mask.float().tolist()
    assert out.token_weight_sum.tolist() == [3.0, 8.0, 4.0, 2.0]
    assert_hand_stats(out, TRM_ROWS)


def test_sequence_stats_keys_and_values():
    out, _ = run(TRM_ROWS, delta_max=0.5, delta_avg=0.02)
    stats = out.sequence_stats()
    assert set(stats) == {
        "keep",
        "length",
        "num_finite",
        "k3_max",
        "finite",
        "token_weight_sum",
        "chi2_sum",
        "ratio_m1_sum",
        *STAT_NAMES,
        "rejected_by/nonfinite",
        "rejected_by/delta_max",
        "rejected_by/delta_avg",
    }
    for value in stats.values():
        assert value.is_floating_point() and value.shape == (4,)
    assert stats["keep"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert stats["rejected_by/delta_avg"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert stats["length"].tolist() == [3.0, 8.0, 4.0, 2.0]


# ---------------------------------------------------------------------------------------------------------------------
# 2. Length invariance
# ---------------------------------------------------------------------------------------------------------------------

R_SEQ = 0.005
T_STAR = math.floor(math.log(2.0) / R_SEQ)  # = floor(138.63) = 138: the last length Seq-MIS (C = 2) keeps


@pytest.mark.parametrize("T", [1, 10, 100, T_STAR, T_STAR + 1, 1000, 4000])
def test_length_invariance(T):
    assert T_STAR == 138
    # trm: r = 0.05 -> D_max 0.05, D_avg = k3(0.05) = 0.00127 (kept); r = 0.2 -> D_avg = k3(0.2) = 0.0214 (rejected)
    assert k3(0.05) < 0.01 < k3(0.2)
    out, _ = run([[0.05] * T, [0.2] * T])
    assert out.keep.tolist() == [True, False]
    assert out.k3_mean.tolist() == approx([k3(0.05), k3(0.2)], rel=1e-4)
    assert out.log_ratio_abs_max.tolist() == approx([0.05, 0.2], rel=1e-4)
    # geo_mask: geo = e^r, independent of T
    out, _ = run([[0.005] * T, [0.05] * T], mode="geo_mask")
    assert out.keep.tolist() == [True, False]
    assert out.geo_ratio.tolist() == approx([math.exp(0.005), math.exp(0.05)], rel=1e-4)
    # seq_mis: seq_log_ratio = T r grows with T; the decision flips after T*
    out, _ = run([[R_SEQ] * T], mode="seq_mis")
    assert out.seq_log_ratio.tolist() == approx([T * R_SEQ], rel=1e-4)
    assert out.keep.tolist() == [T <= T_STAR]


# ---------------------------------------------------------------------------------------------------------------------
# 3. Padding never matters
# ---------------------------------------------------------------------------------------------------------------------


def _random_masked_batch(seed, B=5, T=9, right=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    roll = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    theta = roll + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.05
    if right:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
    else:
        mask = torch.rand(B, T, generator=g) < 0.6
    mask[0] = False  # one empty row
    mask[1] = True  # one full row
    return theta.to(dtype), roll.to(dtype), mask


def _with_garbage(theta, roll, mask, shift=0):
    theta, roll = theta.clone(), roll.clone()
    pad = (~mask.bool()).nonzero().tolist()
    for k, (i, t) in enumerate(pad):
        theta[i, t] = GARBAGE[(k + shift) % len(GARBAGE)]
        roll[i, t] = GARBAGE[(k + shift + 2) % len(GARBAGE)]
    return theta, roll


def assert_outputs_identical(a: TrustRegionMaskOutput, b: TrustRegionMaskOutput):
    assert torch.equal(a.keep, b.keep)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a.length, b.length)
    assert torch.equal(a.finite, b.finite)
    assert torch.equal(a.token_weight_sum, b.token_weight_sum)
    for name in STAT_NAMES:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert set(a.rejected_by) == set(b.rejected_by)
    for name in a.rejected_by:
        assert torch.equal(a.rejected_by[name], b.rejected_by[name]), name


@pytest.mark.parametrize("mode", RATIO_MODES)
@pytest.mark.parametrize("right", [True, False])
def test_padding_garbage_changes_nothing(mode, right):
    for seed in range(3):
        theta, roll, mask = _random_masked_batch(seed, right=right)
        clean = compute_trust_region_mask(theta, roll, mask, mode=mode, **MODE_KWARGS[mode])
        for shift in range(len(GARBAGE)):
            dirty_theta, dirty_roll = _with_garbage(theta, roll, mask, shift)
            assert not torch.isfinite(dirty_theta[~mask]).all()  # the garbage is really there
            for m in (mask, mask.long(), mask.float()):
                dirty = compute_trust_region_mask(dirty_theta, dirty_roll, m, mode=mode, **MODE_KWARGS[mode])
                assert_outputs_identical(clean, dirty)
                assert (dirty.weights[~mask] == 0).all()
                assert dirty.finite.all()


# ---------------------------------------------------------------------------------------------------------------------
# 4. dtypes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RATIO_MODES)
def test_bf16_inputs_match_float32_copies(mode):
    theta, roll, mask = _random_masked_batch(7, B=6, T=33)
    theta16, roll16 = theta.to(torch.bfloat16), roll.to(torch.bfloat16)
    out16 = compute_trust_region_mask(theta16, roll16, mask, mode=mode, **MODE_KWARGS[mode])
    out32 = compute_trust_region_mask(theta16.float(), roll16.float(), mask, mode=mode, **MODE_KWARGS[mode])
    for name in (*STAT_NAMES, "weights", "token_weight_sum"):
        assert getattr(out16, name).dtype == torch.float32, name
    assert_outputs_identical(out16, out32)


def test_bf16_statistics_are_computed_in_float32():
    # -10.0 and -10.0625 are exact in bf16, so log rho = 0.0625 exactly. k3(0.0625) = 0.0019944 would be off by
    # several percent if expm1 were evaluated in bf16 (spacing 2^-11 near 0.0645).
    theta = torch.full((1, 4), -10.0, dtype=torch.bfloat16)
    roll = torch.full((1, 4), -10.0625, dtype=torch.bfloat16)
    assert (roll.float() == -10.0625).all()
    out = compute_trust_region_mask(theta, roll, torch.ones(1, 4), mode="none")
    assert out.k3_mean.dtype == torch.float32
    assert out.k3_mean.item() == pytest.approx(math.exp(0.0625) - 1.0625, rel=1e-5)
    assert out.seq_log_ratio.item() == 0.25
    assert out.geo_ratio.item() == pytest.approx(math.exp(0.0625), rel=1e-6)


def test_float64_inputs_give_float64_stats():
    # log rho = 1e-9 is lost entirely if the inputs were cast to float32 (both round to -1.0)
    theta = torch.full((2, 3), -1.0 + 1e-9, dtype=torch.float64)
    roll = torch.full((2, 3), -1.0, dtype=torch.float64)
    for t, r in [(theta, roll), (theta, roll.float()), (theta.float(), roll)]:
        out = compute_trust_region_mask(t, r, torch.ones(2, 3), mode="token_tis")
        for name in (*STAT_NAMES, "weights", "token_weight_sum"):
            assert getattr(out, name).dtype == torch.float64, name
    out = compute_trust_region_mask(theta, roll, torch.ones(2, 3))
    assert out.log_ratio_abs_max.tolist() == pytest.approx([1e-9, 1e-9], rel=1e-6)
    assert out.seq_log_ratio.tolist() == pytest.approx([3e-9, 3e-9], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Empty rows, fully masked batches, T = 0
# ---------------------------------------------------------------------------------------------------------------------


def _assert_empty_row_stats(out, rows):
    for i in rows:
        assert out.length[i].item() == 0
        assert out.log_ratio_abs_max[i].item() == 0.0
        assert out.k3_mean[i].item() == 0.0
        assert out.k1_mean[i].item() == 0.0
        assert out.seq_log_ratio[i].item() == 0.0
        assert out.geo_ratio[i].item() == 1.0
        assert out.finite[i].item() is True
        assert (out.weights[i] == 0).all()
        assert out.token_weight_sum[i].item() == 0.0
        for name, rejected in out.rejected_by.items():
            assert rejected[i].item() is False, name  # an empty row has no evidence against it


@pytest.mark.parametrize("mode", RATIO_MODES)
def test_empty_rows_and_fully_masked_batch(mode):
    kwargs = MODE_KWARGS[mode]
    # one empty row next to a real one, padding full of garbage
    theta, roll, mask = make_batch([[], [0.1, -0.2]], T=4, pad_theta=float("nan"), pad_roll=float("inf"))
    out = compute_trust_region_mask(theta, roll, mask, mode=mode, **kwargs)
    _assert_empty_row_stats(out, [0])
    assert out.length.tolist() == [0, 2]
    assert out.seq_log_ratio[1].item() == pytest.approx(-0.1, rel=1e-5)
    # fully masked batch
    theta, roll = _with_garbage(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3, 5, dtype=torch.bool))
    out = compute_trust_region_mask(theta, roll, torch.zeros(3, 5), mode=mode, **kwargs)
    _assert_empty_row_stats(out, range(3))
    assert out.weights.shape == (3, 5)
    # T = 0
    out = compute_trust_region_mask(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0), mode=mode, **kwargs)
    assert out.weights.shape == (3, 0)
    assert out.keep.shape == (3,)
    _assert_empty_row_stats(out, range(3))
    # B = 0
    out = compute_trust_region_mask(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), mode=mode, **kwargs)
    assert out.weights.shape == (0, 4) and out.keep.shape == (0,)
    for name in STAT_NAMES:
        assert getattr(out, name).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Non-finite log-probs at valid positions
# ---------------------------------------------------------------------------------------------------------------------


def _nonfinite_batch():
    theta, roll, mask = make_batch([[0.1, 0.2, 0.0], [0.1, 9.9, 0.2], [9.9, 0.05, -0.05], [0.3, -0.1, 9.9, 0.0]])
    theta[1, 1] = float("nan")  # training NaN
    theta[2, 0] = float("-inf")  # training log-prob -inf: log rho = -inf
    roll[3, 2] = float("-inf")  # rollout log-prob -inf: log rho = +inf
    return theta, roll, mask


# statistics over the finite valid tokens only
NONFINITE_FINITE_TOKENS = [[0.1, 0.2, 0.0], [0.1, 0.2], [0.05, -0.05], [0.3, -0.1, 0.0]]


@pytest.mark.parametrize("mode", RATIO_MODES)
def test_nonfinite_valid_tokens_reject_only_their_sequence(mode):
    theta, roll, mask = _nonfinite_batch()
    # loose thresholds so only the non-finite criterion can reject
    loose = {"trm": {"delta_max": 5.0, "delta_avg": 1.0}, "geo_mask": {"geo_low": 0.5, "geo_high": 1.5}}
    kwargs = loose.get(mode, MODE_KWARGS[mode])
    out = compute_trust_region_mask(theta, roll, mask, mode=mode, **kwargs)
    assert out.finite.tolist() == [True, False, False, False]
    assert out.length.tolist() == [3, 3, 3, 4]
    rows = NONFINITE_FINITE_TOKENS
    assert out.log_ratio_abs_max.tolist() == approx([0.2, 0.2, 0.05, 0.3])
    assert out.seq_log_ratio.tolist() == approx([0.3, 0.3, 0.0, 0.2])
    assert out.k3_mean.tolist() == approx([sum(k3(x) for x in r) / len(r) for r in rows])
    assert out.geo_ratio.tolist() == approx([math.exp(0.1), math.exp(0.15), 1.0, math.exp(0.2 / 3)])
    for name in (*STAT_NAMES, "token_weight_sum"):
        assert torch.isfinite(getattr(out, name)).all(), name
    if mode == "none":
        assert out.keep.tolist() == [True] * 4
        assert out.rejected_by == {}
        assert out.weights.tolist() == mask.float().tolist()
        return
    assert out.keep.tolist() == [True, False, False, False]
    assert out.rejected_by["nonfinite"].tolist() == [False, True, True, True]
    for name, rejected in out.rejected_by.items():
        if name != "nonfinite":
            assert rejected.tolist() == [False] * 4, name
    assert (out.weights[1:] == 0).all()
    assert torch.isfinite(out.weights).all()
    assert (out.weights[0, :3] > 0).all()


@pytest.mark.parametrize("mode", RATIO_MODES)
def test_nonfinite_raise(mode):
    theta, roll, mask = _nonfinite_batch()
    with pytest.raises(ValueError, match=r"Non-finite.*\[1, 2, 3\]"):
        compute_trust_region_mask(theta, roll, mask, mode=mode, nonfinite="raise", **MODE_KWARGS[mode])
    # NaN in padding is not an error
    theta, roll, mask = make_batch([[0.1], [0.1, 0.2]])
    theta, roll = _with_garbage(theta, roll, mask, shift=2)
    assert torch.isnan(theta[0, 1]) or torch.isinf(theta[0, 1])
    out = compute_trust_region_mask(theta, roll, mask, mode=mode, nonfinite="raise", **MODE_KWARGS[mode])
    assert out.finite.all()


# ---------------------------------------------------------------------------------------------------------------------
# 7. Bad input
# ---------------------------------------------------------------------------------------------------------------------

_X = torch.zeros(2, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "tmr"}, r"Unknown `mode` 'tmr'"),
        ({"delta_max": -0.1}, r"`delta_max` must be a positive"),
        ({"delta_max": 0.0}, r"`delta_max` must be a positive"),
        ({"delta_avg": 0}, r"`delta_avg` must be a positive"),
        ({"delta_avg": float("nan")}, r"`delta_avg` must be a positive"),
        ({"delta_max": float("inf")}, r"`delta_max` must be a positive"),
        ({"delta_max": True}, r"`delta_max` must be a positive"),
        ({"delta_max": "0.5"}, r"`delta_max` must be a positive"),
        ({"mode": "geo_mask", "geo_low": float("nan")}, r"`geo_low` must be a positive"),
        ({"mode": "geo_mask", "geo_high": -1.0}, r"`geo_high` must be a positive"),
        ({"mode": "seq_mis", "ratio_max": 0.0}, r"`ratio_max` must be a positive"),
        ({"mode": "token_tis", "ratio_min": -0.5}, r"`ratio_min` must be a positive"),
        ({"delta_max": None, "delta_avg": None}, r"`delta_max` and `delta_avg` set to None"),
        ({"mode": "geo_mask", "geo_low": 1.01, "geo_high": 1.02}, r"must contain 1.*`geo_low`=1.01"),
        ({"mode": "geo_mask", "geo_low": 0.9, "geo_high": 0.95}, r"must contain 1.*`geo_high`=0.95"),
        ({"mode": "geo_mask", "geo_low": None, "geo_high": None}, r"`geo_low` and/or `geo_high`"),
        ({"mode": "seq_mis", "ratio_max": None}, r"needs `ratio_max`"),
        ({"mode": "seq_tis", "ratio_max": None}, r"needs `ratio_max`"),
        ({"mode": "token_tis", "ratio_max": None}, r"needs `ratio_max`"),
        ({"mode": "token_mis", "ratio_max": None}, r"`ratio_min` and/or `ratio_max`"),
        ({"mode": "token_mis", "ratio_min": 1.5, "ratio_max": 2.0}, r"must contain 1.*`ratio_min`=1.5"),
        ({"nonfinite": "ignore"}, r"`nonfinite` must be"),
    ],
)
def test_invalid_thresholds_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_trust_region_mask(_X, _X, torch.ones(2, 3), **kwargs)


# Regression: the "band must contain 1" check once ran only when BOTH ends were set, so a one-sided band excluding
# rho = 1 (e.g. `mode="seq_mis", ratio_max=0.5`) silently rejected every exactly on-policy sequence.
@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "geo_mask", "geo_low": 1.5, "geo_high": None},
        {"mode": "geo_mask", "geo_low": None, "geo_high": 0.9},
        {"mode": "seq_mis", "ratio_max": 0.5},
        {"mode": "seq_tis", "ratio_max": 0.5},
        {"mode": "token_tis", "ratio_max": 0.5},
        {"mode": "token_mis", "ratio_min": 1.5, "ratio_max": None},
    ],
)
def test_one_sided_band_must_contain_1(kwargs):
    with pytest.raises(ValueError, match=r"contain 1"):
        compute_trust_region_mask(_X, _X, torch.ones(2, 3), **kwargs)


def test_validate_thresholds_prefix():
    base = dict(delta_max=0.5, delta_avg=0.01, geo_low=0.99, geo_high=1.01, ratio_min=None, ratio_max=2.0)
    validate_thresholds("trm", **base)  # valid: no error
    with pytest.raises(ValueError, match=r"`trm_delta_avg` must be a positive"):
        validate_thresholds("trm", **{**base, "delta_avg": -1.0}, name_prefix="trm_")
    with pytest.raises(ValueError, match=r"Unknown `trm_mode`"):
        validate_thresholds("seq", **base, name_prefix="trm_")


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), ValueError, r"Mismatched shapes.*\(2, 4\)"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4)), ValueError, r"Mismatched shapes.*\(2, 4\)"),
        ((torch.zeros(3, 3), torch.zeros(2, 3), torch.ones(2, 3)), ValueError, r"Mismatched shapes.*\(3, 3\)"),
        ((torch.zeros(3), torch.zeros(3), torch.ones(3)), ValueError, r"`per_token_logps` must have shape \(B, T\)"),
        ((_X, torch.zeros(2, 3, 1), torch.ones(2, 3)), ValueError, r"`sampling_per_token_logps` must have shape"),
        ((_X, _X, torch.ones(6)), ValueError, r"`completion_mask` must have shape \(B, T\), got \(6,\)"),
        ((torch.zeros(2, 3, dtype=torch.long), _X, torch.ones(2, 3)), TypeError, r"`per_token_logps` must be a float"),
        ((_X, torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, 3)), TypeError, r"`sampling_per_token_logps`"),
        (([[0.0, 0.0, 0.0]] * 2, _X, torch.ones(2, 3)), TypeError, r"`per_token_logps` must be a torch.Tensor"),
        ((_X, _X, np.ones((2, 3))), TypeError, r"`completion_mask` must be a torch.Tensor"),
    ],
)
def test_bad_tensors_name_the_argument(args, exc, match):
    with pytest.raises(exc, match=match):
        compute_trust_region_mask(*args)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Property tests against an independent python-loop implementation
# ---------------------------------------------------------------------------------------------------------------------

F32_MAX_LOG = math.log(3.4028234663852886e38)  # 88.72: exp overflows float32 above this


def _k3_f64(r: float) -> float:
    try:
        return math.expm1(r) - r
    except OverflowError:
        return math.inf


def _brute_force_row(theta_row, roll_row, mask_row):
    """Spec quantities of one row, in float64 python over its valid tokens (log rho rounded to float32 like the
    training code's inputs; statistics over the finite tokens only)."""
    lrs, length, finite = [], 0, True
    for a, b, m in zip(theta_row, roll_row, mask_row, strict=True):
        if not m:
            continue
        length += 1
        with np.errstate(all="ignore"):
            lr = float(np.float32(a) - np.float32(b))
        if math.isfinite(lr):
            lrs.append(lr)
        else:
            finite = False
    n = max(len(lrs), 1)
    seq = math.fsum(lrs)
    return {
        "lrs": lrs,
        "length": length,
        "finite": finite,
        "log_ratio_abs_max": max((abs(x) for x in lrs), default=0.0),
        "k3_mean": math.fsum(_k3_f64(x) for x in lrs) / n,
        "seq_log_ratio": seq,
        "mean_log_ratio": seq / n,
        # float32 rounding bounds of the implementation's sums
        "seq_tol": 1e-5 * math.fsum(abs(x) for x in lrs) + 1e-7,
        "k3_tol": 1e-5 * math.fsum(min(abs(math.expm1(min(x, 700.0))), 1e300) + abs(x) for x in lrs) / n + 1e-12,
    }


def _clear(value, threshold, tol):
    """True/False for value > threshold when it is decided beyond float32 rounding, else None."""
    if value > threshold + tol:
        return True
    if value < threshold - tol:
        return False
    return None


@st.composite
def random_batches(draw):
    B = draw(st.integers(1, 6))
    T = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    mask_kind = draw(st.sampled_from(["right", "arbitrary", "full"]))
    scale = draw(st.sampled_from([1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0]))
    p_large = draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]))
    p_nonfinite = draw(st.sampled_from([0.0, 0.0, 0.0, 0.05]))
    garbage = draw(st.booleans())
    mask_dtype = draw(st.sampled_from([torch.bool, torch.long, torch.float32]))

    g = torch.Generator().manual_seed(seed)
    roll = -torch.rand(B, T, generator=g) * 5
    # small log-ratios stay within +-10 and large values are +-1e3..1e4, so every |log rho| is <= 10 or >= 985:
    # k3 either fits float32 easily or overflows in both implementations
    theta = roll + (torch.randn(B, T, generator=g) * scale).clamp(-10, 10)
    large = torch.tensor([-1e4, 1e4, -1e3])
    for x in (theta, roll):
        pick = torch.rand(B, T, generator=g) < p_large
        x[pick] = large[torch.randint(0, 3, (B, T), generator=g)][pick]
    if mask_kind == "right":
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
    elif mask_kind == "arbitrary":
        mask = torch.rand(B, T, generator=g) < torch.rand(B, 1, generator=g)
    else:
        mask = torch.ones(B, T, dtype=torch.bool)
    bad = mask & (torch.rand(B, T, generator=g) < p_nonfinite)
    nonfinite_values = torch.tensor([float("nan"), float("-inf"), float("inf")])
    theta[bad] = nonfinite_values[torch.randint(0, 3, (B, T), generator=g)][bad]
    if garbage:
        theta, roll = _with_garbage(theta, roll, mask, shift=seed % 5)
    return theta, roll, mask.to(mask_dtype)


thresholds = st.fixed_dictionaries(
    {
        "delta_max": st.sampled_from([None, 1e-3, 0.01, 0.1, LOG2, 3.0]),
        "delta_avg": st.sampled_from([None, 1e-6, 1e-3, 0.01, 1.0]),
        "geo_low": st.sampled_from([None, 0.5, 0.99, 0.9999, 1.0]),
        "geo_high": st.sampled_from([None, 1.0, 1.0001, 1.01, 2.0]),
        "ratio_min": st.sampled_from([None, 0.1, 0.5, 0.99, 1.0]),
        "ratio_max": st.sampled_from([1.0, 1.01, 2.0, 10.0]),
    }
)


def _kwargs_for(mode, th):
    kwargs = dict(th)
    if mode == "trm" and th["delta_max"] is None and th["delta_avg"] is None:
        kwargs["delta_avg"] = 0.01
    if mode == "geo_mask" and th["geo_low"] is None and th["geo_high"] is None:
        kwargs["geo_high"] = 1.01
    return kwargs


@settings(deadline=None, max_examples=300)
@given(batch=random_batches())
def test_property_stats_match_brute_force(batch):
    theta, roll, mask = batch
    out = compute_trust_region_mask(theta, roll, mask, mode="none")
    B = theta.shape[0]
    for i in range(B):
        ref = _brute_force_row(theta[i].tolist(), roll[i].tolist(), mask[i].tolist())
        n = max(len(ref["lrs"]), 1)
        assert out.length[i].item() == ref["length"]
        assert out.finite[i].item() is ref["finite"]
        assert out.log_ratio_abs_max[i].item() == pytest.approx(ref["log_ratio_abs_max"], rel=1e-6)
        assert out.seq_log_ratio[i].item() == pytest.approx(ref["seq_log_ratio"], rel=1e-5, abs=ref["seq_tol"])
        assert out.k1_mean[i].item() == pytest.approx(-ref["mean_log_ratio"], rel=1e-5, abs=ref["seq_tol"] / n)
        k3_mean = out.k3_mean[i].item()
        if math.isinf(ref["k3_mean"]):
            assert k3_mean == math.inf
        else:
            assert k3_mean == pytest.approx(ref["k3_mean"], rel=1e-5, abs=ref["k3_tol"])
        assert k3_mean >= 0.0
        geo, mean = out.geo_ratio[i].item(), ref["mean_log_ratio"]
        if abs(mean) < 80:
            assert geo == pytest.approx(math.exp(mean), rel=math.expm1(ref["seq_tol"] / n) + 1e-6)
        elif mean > F32_MAX_LOG + 1:
            assert geo == math.inf
        elif mean > 0:
            assert geo > math.exp(79)
        else:
            assert 0.0 <= geo < math.exp(-79)
        # the statistics are never NaN, whatever the inputs
        for name in STAT_NAMES:
            assert not math.isnan(getattr(out, name)[i].item()), name


def _check_common_invariants(mode, out, mask_b, kwargs):
    w = out.weights
    assert w.shape == mask_b.shape and w.dtype == torch.float32
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (w[~mask_b] == 0).all()
    assert (w[~out.keep] == 0).all()
    assert torch.allclose(out.token_weight_sum, w.sum(-1))
    if mode == "none":
        assert out.rejected_by == {} and out.keep.all()
        assert torch.equal(w, mask_b.float())
        return
    assert "nonfinite" in out.rejected_by
    assert torch.equal(out.rejected_by["nonfinite"], ~out.finite)
    rejected_any = torch.stack(list(out.rejected_by.values())).any(0)
    assert torch.equal(out.keep, ~rejected_any)
    expected_keys = {
        "trm": {"nonfinite"} | {k for k in ("delta_max", "delta_avg") if kwargs[k] is not None},
        "geo_mask": {"nonfinite"} | {k for k in ("geo_low", "geo_high") if kwargs[k] is not None},
        "seq_mis": {"nonfinite", "ratio_max"} | ({"ratio_min"} if kwargs["ratio_min"] is not None else set()),
    }.get(mode, {"nonfinite"})
    assert set(out.rejected_by) == expected_keys
    if mode in SEQUENCE_MASK_MODES:
        assert set(w.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(w, (out.keep[:, None] & mask_b).float())
    if mode == "token_mis":
        assert set(w.unique().tolist()) <= {0.0, 1.0}
    if mode in ("seq_tis", "token_tis"):
        kept = mask_b & out.keep[:, None]
        assert (w[kept] <= kwargs["ratio_max"] * (1 + 1e-6)).all()
        if kwargs["ratio_min"] is not None:
            assert (w[kept] >= kwargs["ratio_min"] * (1 - 1e-6)).all()
        if mode == "seq_tis":  # one weight per sequence
            for i in range(w.shape[0]):
                assert w[i][kept[i]].unique().numel() <= 1
    if mode == "trm":
        kept = out.keep
        if kwargs["delta_max"] is not None:
            assert (out.log_ratio_abs_max[kept] <= kwargs["delta_max"]).all()
            assert torch.equal(out.rejected_by["delta_max"], out.log_ratio_abs_max > kwargs["delta_max"])
        if kwargs["delta_avg"] is not None:
            assert (out.k3_mean[kept] <= kwargs["delta_avg"]).all()
            assert torch.equal(out.rejected_by["delta_avg"], out.k3_mean > kwargs["delta_avg"])


def _check_against_brute_force(mode, out, refs, kwargs):
    for i, ref in enumerate(refs):
        n = max(len(ref["lrs"]), 1)
        expected = {}
        if mode == "trm":
            if kwargs["delta_max"] is not None:
                expected["delta_max"] = _clear(
                    ref["log_ratio_abs_max"], kwargs["delta_max"], 1e-6 * ref["log_ratio_abs_max"]
                )
            if kwargs["delta_avg"] is not None:
                expected["delta_avg"] = _clear(ref["k3_mean"], kwargs["delta_avg"], 2 * ref["k3_tol"])
        elif mode == "geo_mask":
            tol = 2 * ref["seq_tol"] / n + 1e-7
            if kwargs["geo_high"] is not None:
                expected["geo_high"] = _clear(ref["mean_log_ratio"], math.log(kwargs["geo_high"]), tol)
            if kwargs["geo_low"] is not None:
                below = _clear(ref["mean_log_ratio"], math.log(kwargs["geo_low"]), tol)
                expected["geo_low"] = None if below is None else not below
        elif mode == "seq_mis":
            tol = 2 * ref["seq_tol"] + 1e-7
            expected["ratio_max"] = _clear(ref["seq_log_ratio"], math.log(kwargs["ratio_max"]), tol)
            if kwargs["ratio_min"] is not None:
                below = _clear(ref["seq_log_ratio"], math.log(kwargs["ratio_min"]), tol)
                expected["ratio_min"] = None if below is None else not below
        for name, value in expected.items():
            if value is not None:
                assert out.rejected_by[name][i].item() is value, (name, i)
        if not out.keep[i]:
            continue
        valid_weights = [w for w, m in zip(out.weights[i].tolist(), ref["mask"], strict=True) if m]
        lo = -math.inf if kwargs["ratio_min"] is None else math.log(kwargs["ratio_min"])
        hi = math.log(kwargs["ratio_max"])
        if mode == "token_tis":
            assert valid_weights == pytest.approx([math.exp(min(max(x, lo), hi)) for x in ref["lrs"]], rel=1e-5)
        elif mode == "seq_tis":
            w = math.exp(min(max(ref["seq_log_ratio"], lo), hi))
            assert valid_weights == pytest.approx([w] * len(valid_weights), rel=math.expm1(ref["seq_tol"]) + 1e-6)
        elif mode == "token_mis":
            for x, got in zip(ref["lrs"], valid_weights, strict=True):
                outside = (x > hi + 1e-6) or (x < lo - 1e-6)
                inside = lo + 1e-6 < x < hi - 1e-6
                if outside:
                    assert got == 0.0
                elif inside:
                    assert got == 1.0


@settings(deadline=None, max_examples=250)
@given(batch=random_batches(), th=thresholds)
def test_property_invariants_all_modes(batch, th):
    theta, roll, mask = batch
    mask_b = mask.bool()
    refs = []
    for i in range(theta.shape[0]):
        ref = _brute_force_row(theta[i].tolist(), roll[i].tolist(), mask_b[i].tolist())
        ref["mask"] = mask_b[i].tolist()
        refs.append(ref)
    for mode in RATIO_MODES:
        kwargs = _kwargs_for(mode, th)
        out = compute_trust_region_mask(theta, roll, mask, mode=mode, **kwargs)
        _check_common_invariants(mode, out, mask_b, kwargs)
        if mode != "none":
            assert out.finite.tolist() == [r["finite"] for r in refs]
        _check_against_brute_force(mode, out, refs, kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# 9. summarize_mask_stats end to end (the hand-built reductions are in tests/test_diagnostics.py)
# ---------------------------------------------------------------------------------------------------------------------


def test_summarize_end_to_end_seq_mis_rejects_long_sequences():
    # seq_mis with ratio_min = 0.5 and log rho = -0.1 per token: sum = -0.1 T < log 0.5 = -0.693 for T >= 7
    rows = [[-0.1] * T for T in range(1, 9)] + [[]]  # plus an empty completion, which is excluded
    out, _ = run(rows, mode="seq_mis", ratio_min=0.5)
    assert out.keep.tolist() == [True] * 6 + [False, False, True]
    m = summarize_mask_stats(out.sequence_stats())
    assert m["trm/accept_rate"] == pytest.approx(6 / 8)
    assert m["trm/reject_rate/ratio_min"] == pytest.approx(2 / 8)
    assert m["trm/reject_rate/ratio_max"] == 0.0
    assert m["trm/reject_rate/nonfinite"] == 0.0
    assert m["trm/nonfinite_frac"] == 0.0
    assert [m[f"trm/accept_rate/length_q{q}"] for q in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 0.0]
    assert m["trm/kl_k1"] == pytest.approx(0.1, rel=1e-5)
    assert m["trm/kl_k3"] == pytest.approx(math.exp(-0.1) - 0.9, rel=1e-4)
    assert m["trm/geo_ratio/min"] == pytest.approx(math.exp(-0.1), rel=1e-5)
    assert m["trm/geo_ratio/max"] == pytest.approx(math.exp(-0.1), rel=1e-5)
    assert m["trm/log_ratio_abs_max/max"] == pytest.approx(0.1, rel=1e-5)
    assert m["trm/token_weight/mean"] == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 36)


# ---------------------------------------------------------------------------------------------------------------------
# 10. Gradient safety
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RATIO_MODES)
def test_no_grad_and_inputs_untouched(mode):
    theta, roll, mask = _random_masked_batch(3)
    theta = theta.clone().requires_grad_(True)
    before, roll_before = theta.detach().clone(), roll.clone()
    out = compute_trust_region_mask(theta, roll, mask, mode=mode, **MODE_KWARGS[mode])
    assert torch.equal(theta.detach(), before) and torch.equal(roll, roll_before)
    assert theta.grad is None
    assert out.weights.requires_grad is False
    for name in (*STAT_NAMES, "token_weight_sum"):
        assert getattr(out, name).requires_grad is False, name
    # the weights act as constants in the loss: d/dtheta sum(w * theta) = w
    (out.weights * theta).sum().backward()
    assert torch.equal(theta.grad, out.weights)
