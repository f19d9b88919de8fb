"""`trl_trm.calibration`: thresholds for a target accept rate, checked against the real mask; the report's pieces."""

from __future__ import annotations

import math
import shlex

import pytest
import torch

from trl_trm import cli
from trl_trm.calibration import (
    CALIBRATED_MODES,
    accepted_rows,
    batch_statistics,
    bound_inputs,
    calibration_report,
    mismatch_summary,
    recipe_accept_rates,
    recommend,
    thresholds_for_target,
)
from trl_trm.masks import compute_trust_region_mask

SETTINGS = dict(
    delta_max=math.log(2), delta_avg=0.01, delta_kl=1e-4, geo_low=0.99, geo_high=1.01, ratio_min=None, ratio_max=2.0
)


def _batch(seed: int, b: int = 300, t: int = 40, noise: float = 0.05, nonfinite: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = -torch.rand(b, t, generator=g) * 3  # (B, T)
    roll = theta + torch.randn(b, t, generator=g) * noise * torch.rand(b, 1, generator=g)  # (B, T)
    mask = (torch.arange(t)[None] < torch.randint(3, t + 1, (b, 1), generator=g)).float()  # (B, T)
    roll[:nonfinite, 0] = float("nan")
    kl = torch.rand(b, t, generator=g) * 1e-3  # (B, T)
    return theta, roll, mask, kl


def _mask_accept(mode, batch, settings):
    theta, roll, mask, kl = batch
    keep = compute_trust_region_mask(theta, roll, mask, mode=mode, kl_tok=kl, **settings).keep
    return float(keep[mask.sum(-1) > 0].double().mean())


@pytest.mark.parametrize("mode", CALIBRATED_MODES)
@pytest.mark.parametrize("target", [0.2, 0.5, 0.9, 0.99])
def test_thresholds_reach_the_target_under_the_real_mask(mode, target):
    batch = _batch(seed=100 * CALIBRATED_MODES.index(mode) + int(target * 100))
    stats = batch_statistics(*batch[:3], SETTINGS, kl_tok=batch[3])
    chosen = thresholds_for_target(mode, stats, SETTINGS, target)
    assert isinstance(chosen, dict), chosen
    n = batch[0].size(0)
    accept = _mask_accept(mode, batch, {**SETTINGS, **chosen})
    # The ceil(a N)-th smallest required value: exactly that many sequences (no ties in continuous data), except that
    # seq_mis's C >= 1 keeps at least every sequence whose product ratio is <= 1.
    expected = math.ceil(target * n) / n
    if mode == "seq_mis":
        theta, roll, mask, _ = batch
        expected = max(expected, float((((theta - roll) * mask).sum(-1) <= 0).double().mean()))
        assert chosen["ratio_max"] >= 1.0
    assert accept == pytest.approx(expected, abs=1.5 / n)


@pytest.mark.parametrize("mode", CALIBRATED_MODES)
def test_accepted_rows_follow_the_mask_at_any_threshold(mode):
    batch = _batch(seed=3, nonfinite=5)
    stats = batch_statistics(*batch[:3], SETTINGS, kl_tok=batch[3])
    theta, roll, mask, kl = batch
    for scale in (0.01, 0.3, 1.0, 3.0):
        settings = {**SETTINGS, "delta_max": 0.05 * scale, "delta_avg": 1e-3 * scale, "delta_kl": 5e-4 * scale,
                    "geo_low": 1 - 0.01 * scale, "geo_high": 1 + 0.01 * scale, "ratio_max": 1 + 0.5 * scale}  # fmt: skip
        keep = compute_trust_region_mask(theta, roll, mask, mode=mode, kl_tok=kl, **settings).keep
        assert torch.equal(accepted_rows(mode, stats, settings), keep)


def test_unreachable_targets_and_modes_without_inputs_say_why():
    batch = _batch(seed=1, b=20, nonfinite=4)  # 4 of 20 sequences can never be accepted
    stats = batch_statistics(*batch[:3], SETTINGS)  # no per-token KL
    assert isinstance(thresholds_for_target("trm", stats, SETTINGS, 0.8), dict)
    reason = thresholds_for_target("trm", stats, SETTINGS, 0.85)
    assert isinstance(reason, str) and "cannot accept 0.85" in reason and "0.800" in reason
    assert "trm_rollout_topk" in thresholds_for_target("trm_exact", stats, SETTINGS, 0.5)
    off = {**SETTINGS, "delta_max": None, "delta_avg": None}
    assert "both of its criteria are off" in thresholds_for_target("trm", stats, off, 0.5)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        thresholds_for_target("trm", stats, SETTINGS, 1.5)


def test_a_criterion_that_is_off_stays_off_and_ratio_min_stays_fixed():
    batch = _batch(seed=2)
    settings = {**SETTINGS, "delta_avg": None, "ratio_min": 0.999}
    stats = batch_statistics(*batch[:3], settings)
    chosen = thresholds_for_target("trm", stats, settings, 0.9)
    assert chosen["delta_avg"] is None and chosen["delta_max"] > 0
    below = float((stats["seq_log_ratio"] < math.log(0.999)).double().mean())
    reachable = thresholds_for_target("seq_mis", stats, settings, 1.0 - below)
    assert isinstance(reachable, dict)
    assert _mask_accept("seq_mis", batch, {**settings, **reachable}) == pytest.approx(1.0 - below, abs=1e-9)
    assert isinstance(thresholds_for_target("seq_mis", stats, settings, min(1.0, 1.0 - below + 0.01)), str)


def test_mismatch_summary_matches_the_tokens():
    theta, roll, mask, kl = _batch(seed=4)
    stats = batch_statistics(theta, roll, mask, SETTINGS, kl_tok=kl)
    summary = mismatch_summary(stats)
    valid = mask.bool()
    log_rho = (theta - roll).double()[valid]
    rho = log_rho.exp()
    assert summary["k1"] == pytest.approx(float((-log_rho).mean()), rel=1e-6)
    assert summary["k3"] == pytest.approx(float((rho - 1 - log_rho).mean()), rel=1e-5)
    assert summary["chi2"] == pytest.approx(float(((rho - 1) ** 2).mean()), rel=1e-6)
    assert summary["kl_tok"] == pytest.approx(float(kl.double()[valid].mean()), rel=1e-6)
    assert summary["d_max"]["q100"] == pytest.approx(float(stats["log_ratio_abs_max"].max()))
    quartiles = summary["by_length_quartile"]
    assert [q["sequences"] for q in quartiles] == [75, 75, 75, 75]
    assert all(a["lengths"][1] <= b["lengths"][0] for a, b in zip(quartiles, quartiles[1:], strict=False))


def test_recipe_accept_rates_count_token_mis_tokens():
    theta, roll, mask, _ = _batch(seed=5, noise=2.0)
    stats = batch_statistics(theta, roll, mask, SETTINGS)
    rates = recipe_accept_rates(stats)
    rho = (theta - roll).exp()
    inside = ((rho <= 2.0) & mask.bool()).sum() / mask.sum()
    assert rates["token_mis"] == pytest.approx(float(inside), rel=1e-6)
    assert rates["trm"] == pytest.approx(_mask_accept("trm", (theta, roll, mask, None), SETTINGS))
    assert "trm_exact" not in rates and rates["none"] == 1.0


@pytest.mark.parametrize(
    ("k3", "d_max", "recipe", "mode", "words"),
    [
        (1e-7, 0.01, "geo_mask", "geo_mask", "tiny mismatch"),
        (1e-7, 0.01, "token_tis", "trm", "tiny mismatch"),
        (1e-3, 1.5, "trm", "seq_mis", "rare large jumps"),
        (3e-2, 0.5, "trm", "seq_mis", "strong smooth mismatch"),
        (1e-3, 0.2, "trm", "trm", "moderate smooth mismatch"),
    ],
)
def test_recommendation_follows_the_guide(k3, d_max, recipe, mode, words):
    summary = {"k3": k3, "d_max": {"q50": d_max}, "ess": 0.9, "sequences": 10}
    chosen, reason = recommend(summary, recipe)
    assert chosen == mode and words in reason and "\n" not in reason


def test_bound_table_equals_trl_trm_bounds(capsys):
    batch = _batch(seed=6)
    stats = batch_statistics(*batch[:3], SETTINGS)
    report = calibration_report(stats, SETTINGS, "trm", (0.9,))
    bounds = report["bounds"]
    assert bounds["length"] == int(batch[2].sum(-1).max())
    kept = accepted_rows("trm", stats, {**SETTINGS, **report["targets"]["0.9"]["trm"]["thresholds"]})
    assert bounds["kl_tok_max"] == float(stats["k3_max"][kept].max())
    argv = shlex.split(bounds["command"])
    assert argv[:2] == ["trl-trm", "bounds"]
    assert cli.main(argv[1:]) == 0
    assert capsys.readouterr().out.strip() == bounds["table"].strip()


def test_trm_exact_bound_uses_the_enforced_delta_kl():
    batch = _batch(seed=7)
    stats = batch_statistics(*batch[:3], SETTINGS, kl_tok=batch[3])
    chosen = thresholds_for_target("trm_exact", stats, SETTINGS, 0.9)
    inputs = bound_inputs("trm_exact", stats, {**SETTINGS, **chosen})
    assert inputs["kl_tok_max"] == chosen["delta_kl"] and "enforced" in inputs["kl_tok_max_source"]


def test_report_update_is_the_first_targets_thresholds():
    batch = _batch(seed=8)
    stats = batch_statistics(*batch[:3], SETTINGS)
    report = calibration_report(stats, SETTINGS, "geo_mask", (0.95, 0.9))
    assert list(report["targets"]) == ["0.95", "0.9"]
    mode = report["recommendation"]["mode"]
    expected = {f"trm_{k}": v for k, v in report["targets"]["0.95"][mode]["thresholds"].items()}
    assert report["recipe_update"] == {"trm_mode": mode, **expected}
    assert report["seq_tis_clip"] >= math.sqrt(2)
