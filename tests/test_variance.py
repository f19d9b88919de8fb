"""Pure-math pieces of the estimator and the variance diagnostics (spec "Inside TRL's loss", "Variance
diagnostics"), against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch

from trl_trm.masking import (
    compute_trust_region_mask,
    effective_sample_size,
    estimator_weights,
    mask_and_weights,
    seq_tis_auto_clip,
    seq_tis_auto_log_clip,
    summarize_mask_stats,
    topk_token_chi2,
)

THETA = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.1, -2.0, -1.0], [-1.5, -1.0, -0.7, -0.2]])
ROLL = torch.tensor([[-1.1, -1.9, -0.5, 0.0], [-0.3, -0.9, -2.0, -1.0], [-1.5, -1.2, -0.6, -0.2]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


def _mask(mode="trm", **kw):
    kw = {"delta_max": 0.5, "delta_avg": None, **kw}
    return compute_trust_region_mask(THETA, ROLL, MASK, mode=mode, **kw)


@pytest.mark.parametrize("mode", ["trm", "geo_mask", "seq_mis", "token_mis"])
def test_mask_modes_weight_kept_tokens_by_old_over_roll(mode):
    kw = {"geo_low": 0.5, "geo_high": 1.5} if mode == "geo_mask" else {}
    if mode == "token_mis":
        kw = {"ratio_min": 0.5, "ratio_max": 1.05}
    result = _mask(mode, **kw)
    old = THETA + 0.05
    w = estimator_weights(result, old, ROLL, MASK, mode=mode, ratio_min=kw.get("ratio_min"), ratio_max=1.05)
    expected = result.weights * torch.exp(old - ROLL)  # 0/1 mask times pi_old / pi_roll
    torch.testing.assert_close(w, expected)
    plain = estimator_weights(result, old, ROLL, MASK, mode=mode, ratio_factor=False, ratio_max=1.05)
    torch.testing.assert_close(plain, result.weights)


def test_trm_rejected_rows_and_padding_are_zero():
    result = _mask("trm")
    assert result.keep.tolist() == [True, False, True]  # row 1: |log rho| = 0.8 > 0.5
    w = estimator_weights(result, THETA, ROLL, MASK, mode="trm")
    assert torch.count_nonzero(w[1]) == 0 and w[0, 3] == 0 and torch.count_nonzero(w[2, 2:]) == 0
    assert w[0, 0] == pytest.approx(math.exp(0.1)) and w[2, 1] == pytest.approx(math.exp(0.2))


def test_token_tis_truncates_old_over_roll_not_theta():
    result = _mask("token_tis", ratio_max=1.1)
    old = ROLL.clone()  # pi_old = pi_roll: every weight is exactly 1, whatever pi_theta is
    w = estimator_weights(result, old, ROLL, MASK, mode="token_tis", ratio_max=1.1)
    torch.testing.assert_close(w, MASK.float())
    old = ROLL + torch.tensor([0.5, -0.5, 0.05, 0.0])  # truncated at C = 1.1 from above only
    w = estimator_weights(result, old, ROLL, MASK, mode="token_tis", ratio_max=1.1)
    expected = torch.exp((old - ROLL).clamp(max=math.log(1.1))) * MASK
    torch.testing.assert_close(w, expected)


def test_seq_tis_truncates_the_product_of_old_over_roll():
    result = _mask("seq_tis", ratio_max=1.2)
    old = ROLL + 0.1
    w = estimator_weights(result, old, ROLL, MASK, mode="seq_tis", ratio_max=1.2)
    seq = (0.1 * MASK).sum(-1)  # (B,) sum_t log(pi_old / pi_roll)
    expected = torch.exp(seq.clamp(max=math.log(1.2))).unsqueeze(1) * MASK
    torch.testing.assert_close(w, expected)


def test_nonfinite_old_rejects_the_row_instead_of_nan():
    result = _mask("trm", delta_max=5.0)
    old = THETA.clone()
    old[0, 1] = float("nan")
    w = estimator_weights(result, old, ROLL, MASK, mode="trm")
    assert torch.isfinite(w).all() and torch.count_nonzero(w[0]) == 0 and torch.count_nonzero(w[1]) > 0


def test_estimator_weights_check_shapes():
    result = _mask("trm")
    with pytest.raises(ValueError, match="Mismatched shapes"):
        estimator_weights(result, THETA[:, :3], ROLL[:, :3], MASK[:, :3], mode="trm")


def test_chi2_tok_and_surrogate_from_hand_sums():
    result = _mask("trm", delta_max=5.0)
    rho = torch.exp(THETA.double() - ROLL.double())
    valid = MASK.bool()
    torch.testing.assert_close(result.chi2_sum, torch.where(valid, (rho - 1) ** 2, 0.0).sum(-1))
    torch.testing.assert_close(result.ratio_m1_sum, torch.where(valid, rho - 1, 0.0).sum(-1))
    stats = result.sequence_stats()
    stats["advantage"] = torch.tensor([1.0, -2.0, 0.5])
    m = summarize_mask_stats(stats)
    assert m["trm/chi2_tok"] == pytest.approx(float(((rho - 1) ** 2)[valid].mean()))
    surrogate = float(((rho - 1) * valid).sum(-1) @ torch.tensor([1.0, -2.0, 0.5]).double()) / 3
    assert m["trm/surrogate_estimate"] == pytest.approx(surrogate)
    pm, mixed = m["trm/bound/pinsker_marginal_estimate"], m["trm/bound/mixed_estimate"]
    assert m["trm/bound/minorizer_estimate"] == pytest.approx(surrogate - min(pm, mixed))


def test_surrogate_counts_rejected_sequences_in_n():
    result = _mask("trm")  # row 1 rejected
    stats = result.sequence_stats()
    stats["advantage"] = torch.tensor([1.0, -2.0, 0.5])
    rho = torch.exp(THETA.double() - ROLL.double())
    per_seq = ((rho - 1) * MASK).sum(-1)
    want = float(per_seq[0] * 1.0 + per_seq[2] * 0.5) / 3
    assert summarize_mask_stats(stats)["trm/surrogate_estimate"] == pytest.approx(want)


def test_ess_hand_values():
    s = torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert effective_sample_size(s) == pytest.approx(1.0)
    assert effective_sample_size(s + 3.7) == pytest.approx(1.0)  # a common factor is no mismatch
    s = torch.tensor([0.0, math.log(3.0)])
    assert effective_sample_size(s) == pytest.approx((1 + 3) ** 2 / (2 * (1 + 9)))
    s = torch.tensor([1000.0, 0.0, 0.0, 0.0])  # log space: no overflow, one sequence carries the batch
    assert effective_sample_size(s) == pytest.approx(0.25)


def test_ess_is_one_without_mismatch_in_the_summary():
    result = compute_trust_region_mask(THETA, THETA.clone(), MASK, mode="trm")
    m = summarize_mask_stats(result.sequence_stats())
    assert m["trm/ess"] == 1.0 and m["trm/chi2_tok"] == 0.0 and m["trm/chi2_seq"] == 0.0


def test_seq_tis_auto_clip_hand_value():
    s = torch.tensor([0.1, -0.2, 0.3])
    want = math.sqrt(2 * (1 + (torch.exp(2 * s).mean().item() - 1)))
    assert math.exp(seq_tis_auto_log_clip(s)) == pytest.approx(want)
    assert math.exp(seq_tis_auto_log_clip(torch.zeros(5))) == pytest.approx(math.sqrt(2))  # on-policy: sqrt(2)
    assert seq_tis_auto_log_clip(torch.tensor([800.0, 0.0])) == pytest.approx(0.5 * (math.log(2) + 1600 - math.log(2)))


def test_seq_tis_auto_clip_floors_a_negative_chi2_estimate():
    """Most product ratios far below 1 (the engine put its mass where the trainer does not, as under support
    collapse): the sample estimate of chi2_seq is below 0. chi^2 is a divergence, so it is floored at 0 and C* stays
    sqrt(2); without the floor C* < 1 and the Seq-TIS band [.., C*] would exclude 1, which the mask refuses."""
    s = torch.tensor([-7.5, -15.0, 0.0, -7.5, -22.5, -7.5])  # mean exp(2 s) = 1/6: chi2 estimate -5/6
    assert math.exp(seq_tis_auto_log_clip(s)) == pytest.approx(math.sqrt(2))
    roll = torch.zeros(6, 3)  # (B, T)
    old = roll.clone()
    old[:, 0] = s  # sum_t log(pi_old / pi_roll) = s
    mask = torch.ones(6, 3)
    clip = seq_tis_auto_clip(old, roll, mask)
    result, weights = mask_and_weights(old, roll, old, mask, mode="seq_tis", ratio_max=clip)  # no ValueError
    assert torch.allclose(weights[:, 0], torch.exp(s.clamp(max=math.log(clip))))


def _random_dists(b, t, v, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.log_softmax(p + 0.3 * torch.randn(b, t, v, generator=g, dtype=torch.float64), -1)
    return p, q


def test_topk_chi2_exact_at_full_vocabulary_and_lower_bound_below():
    log_p, log_q = _random_dists(3, 5, 16, seed=0)
    exact = ((log_q.exp() - log_p.exp()) ** 2 / log_p.exp()).sum(-1)  # (B, T) chi2(q || p)
    full = topk_token_chi2(log_p, log_q)
    torch.testing.assert_close(full, exact, rtol=1e-6, atol=1e-9)
    top_p, top_ids = log_p.topk(4, dim=-1)
    top_q = log_q.gather(-1, top_ids)
    lb = topk_token_chi2(top_p, top_q)
    assert bool((lb <= exact + 1e-12).all()) and float((exact - lb).max()) > 1e-3
    # the rest bucket by hand
    p_rest, q_rest = 1 - top_p.exp().sum(-1), 1 - top_q.exp().sum(-1)
    want = ((top_q.exp() - top_p.exp()) ** 2 / top_p.exp()).sum(-1) + (q_rest - p_rest) ** 2 / p_rest
    torch.testing.assert_close(lb, want, rtol=1e-6, atol=1e-9)


def test_topk_chi2_zero_rollout_mass_where_theta_has_mass_is_inf_and_nan_is_flagged():
    log_p = torch.log(torch.tensor([[[0.5, 0.5, 0.0]]], dtype=torch.float64))
    log_q = torch.log(torch.tensor([[[0.4, 0.4, 0.2]]], dtype=torch.float64))
    assert topk_token_chi2(log_p, log_q).item() == math.inf
    assert topk_token_chi2(log_p, log_p.clone()).item() == 0.0
    log_q[0, 0, 0] = float("nan")
    assert math.isnan(topk_token_chi2(log_p, log_q).item())


def test_chi2_topk_metric_name_says_lower_bound():
    result = compute_trust_region_mask(
        THETA, ROLL, MASK, mode="trm", chi2_tok=torch.full(THETA.shape, 0.5), kl_tok=torch.zeros(THETA.shape)
    )
    m = summarize_mask_stats(result.sequence_stats(), kl_tok_lower_bound=True)
    assert m["trm/chi2_tok_topk_lb"] == pytest.approx(0.5) and "trm/chi2_tok_topk" not in m


def test_config_ratio_max_auto(tmp_path):
    from trl_trm import TRMConfig

    cfg = TRMConfig(output_dir=str(tmp_path), use_cpu=True, trm_mode="seq_tis", trm_ratio_max="auto")
    assert cfg.trm_ratio_max == "auto"
    assert TRMConfig(output_dir=str(tmp_path), use_cpu=True, trm_mode="seq_tis", trm_ratio_max="3").trm_ratio_max == 3
    with pytest.raises(ValueError, match="seq_tis"):
        TRMConfig(output_dir=str(tmp_path), use_cpu=True, trm_mode="token_tis", trm_ratio_max="auto")
    with pytest.raises(ValueError, match="trm_ratio_max"):
        TRMConfig(output_dir=str(tmp_path), use_cpu=True, trm_mode="seq_tis", trm_ratio_max="big")
