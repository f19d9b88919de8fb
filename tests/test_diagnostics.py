"""`trl_trm.diagnostics`: `summarize_mask_stats` on hand-built per-sequence statistics (the reduction of the logging
window to the `trm/` metrics: accept and reject rates, token-weighted KLs, length quartiles, bound estimates, empty
batches). The variance diagnostics (ESS, chi^2, surrogate) are pinned in tests/test_variance.py and the top-k KL in
tests/test_exact_kl.py."""

from __future__ import annotations

import math

import pytest
import torch

from trl_trm.diagnostics import summarize_mask_stats
from trl_trm.masks import compute_trust_region_mask


def _stats(**columns):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in columns.items()}


HAND_STATS = _stats(
    # sequence 2 is empty (length 0): its (absurd) values must not influence anything
    keep=[1, 0, 1, 0],
    length=[2, 4, 0, 2],
    num_finite=[2, 4, 0, 1],  # sequence 3 has one non-finite token
    finite=[1, 1, 1, 0],
    log_ratio_abs_max=[0.1, 0.9, 50.0, 0.3],
    k3_mean=[0.004, 0.2, 7.0, 0.05],
    k3_max=[0.006, 0.5, 9.0, 0.07],
    k1_mean=[0.01, -0.1, 3.0, 0.02],
    geo_ratio=[0.99, 1.2, 9.0, 0.95],
    seq_log_ratio=[0.02, 0.4, 9.0, -0.04],
    token_weight_sum=[2.0, 0.0, 5.0, 0.0],
    **{
        "rejected_by/nonfinite": [0, 0, 0, 1],
        "rejected_by/delta_max": [0, 1, 1, 0],
        "rejected_by/delta_avg": [0, 1, 0, 1],
    },
)


def test_summarize_hand_built_batch():
    m = summarize_mask_stats(HAND_STATS)
    # over the non-empty sequences 0, 1, 3 (8 tokens)
    assert m["trm/accept_rate"] == pytest.approx(1 / 3)
    assert m["trm/nonfinite_frac"] == pytest.approx(1 / 3)
    assert m["trm/reject_rate/nonfinite"] == pytest.approx(1 / 3)
    assert m["trm/reject_rate/delta_max"] == pytest.approx(1 / 3)
    assert m["trm/reject_rate/delta_avg"] == pytest.approx(2 / 3)
    assert m["trm/log_ratio_abs_max/mean"] == pytest.approx((0.1 + 0.9 + 0.3) / 3)
    assert m["trm/log_ratio_abs_max/max"] == pytest.approx(0.9)
    assert m["trm/k3_mean/mean"] == pytest.approx((0.004 + 0.2 + 0.05) / 3)
    assert m["trm/k3_mean/max"] == pytest.approx(0.2)
    # token-weighted over finite tokens: sum_i F_i * mean_i / sum_i F_i, F = [2, 4, 1]
    assert m["trm/kl_k1"] == pytest.approx((2 * 0.01 + 4 * -0.1 + 1 * 0.02) / 7)
    assert m["trm/kl_k3"] == pytest.approx((2 * 0.004 + 4 * 0.2 + 1 * 0.05) / 7)
    assert m["trm/geo_ratio/min"] == pytest.approx(0.95)
    assert m["trm/geo_ratio/mean"] == pytest.approx((0.99 + 1.2 + 0.95) / 3)
    assert m["trm/geo_ratio/max"] == pytest.approx(1.2)
    assert m["trm/token_weight/mean"] == pytest.approx(2 / 8)
    # lengths [2, 4, 2]: quartile edges [2, 2, 3]; ties go to the lower quartile -> q1 = {0, 3}, q4 = {1}
    assert m["trm/accept_rate/length_q1"] == pytest.approx(0.5)
    assert m["trm/accept_rate/length_q4"] == 0.0
    assert math.isnan(m["trm/accept_rate/length_q2"]) and math.isnan(m["trm/accept_rate/length_q3"])
    assert {k for k in m if k.startswith("trm/reject_rate/")} == {
        "trm/reject_rate/nonfinite",
        "trm/reject_rate/delta_max",
        "trm/reject_rate/delta_avg",
    }
    assert all(isinstance(v, float) for v in m.values())


def test_summarize_bound_estimates_use_accepted_sequences_only():
    m = summarize_mask_stats(HAND_STATS)
    # the only accepted, finite, non-empty sequence is 0: T = 2, k3 max 0.006, sum_t k3 = 2 * 0.004
    T, tok, seq = 2.0, 0.006, 2 * 0.004
    assert m["trm/bound/length"] == T
    assert m["trm/bound/kl_tok_max_estimate"] == pytest.approx(tok)
    assert m["trm/bound/kl_seq_estimate"] == pytest.approx(seq)
    assert m["trm/bound/trpo_estimate"] == pytest.approx(T * (T - 1) * tok)
    assert m["trm/bound/pinsker_marginal_estimate"] == pytest.approx(4 / 3 * T**1.5 * tok)
    assert m["trm/bound/mixed_estimate"] == pytest.approx(2 * T * math.sqrt(tok * seq))
    rejected = {**HAND_STATS, "keep": torch.zeros(4)}
    assert all(math.isnan(v) for k, v in summarize_mask_stats(rejected).items() if "/bound/" in k)


def test_summarize_prefix():
    m = summarize_mask_stats(HAND_STATS, prefix="mask/")
    assert m and all(k.startswith("mask/") for k in m)
    assert m["mask/accept_rate"] == pytest.approx(1 / 3)


def _length_batch(keep):
    n = len(keep)
    return _stats(
        keep=keep,
        length=list(range(1, n + 1)),
        num_finite=list(range(1, n + 1)),
        finite=[1] * n,
        log_ratio_abs_max=[0.0] * n,
        k3_mean=[0.0] * n,
        k3_max=[0.0] * n,
        k1_mean=[0.0] * n,
        geo_ratio=[1.0] * n,
        seq_log_ratio=[0.0] * n,
        token_weight_sum=[0.0] * n,
    )


def test_summarize_length_quartiles():
    # lengths 1..8: edges 2.75, 4.5, 6.25 -> q1 = {1, 2}, q2 = {3, 4}, q3 = {5, 6}, q4 = {7, 8}
    m = summarize_mask_stats(_length_batch([0, 0, 1, 1, 1, 1, 1, 1]))  # only the short ones are rejected
    assert [m[f"trm/accept_rate/length_q{q}"] for q in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    assert m["trm/accept_rate"] == pytest.approx(6 / 8)
    m = summarize_mask_stats(_length_batch([1, 1, 1, 0, 1, 1, 0, 1]))
    assert [m[f"trm/accept_rate/length_q{q}"] for q in (1, 2, 3, 4)] == [1.0, 0.5, 1.0, 0.5]


def test_summarize_empty_batches_give_nan():
    empty = compute_trust_region_mask(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4)).sequence_stats()
    all_empty = compute_trust_region_mask(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4)).sequence_stats()
    for stats in (empty, all_empty):
        m = summarize_mask_stats(stats)
        assert "trm/accept_rate" in m and "trm/reject_rate/delta_avg" in m and "trm/accept_rate/length_q4" in m
        assert all(math.isnan(v) for v in m.values()), m


# Regression: the quartile edges' q tensor was always created on the CPU, while the trainer passes gathered GPU
# tensors; torch.quantile then raises "q tensor must be on the same device". Needs CUDA (marked `gpu`).
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_summarize_on_cuda_tensors_matches_cpu():
    cpu = summarize_mask_stats(HAND_STATS)
    cuda = summarize_mask_stats({k: v.cuda() for k, v in HAND_STATS.items()})
    assert cuda.keys() == cpu.keys()
    for key, value in cpu.items():
        assert cuda[key] == pytest.approx(value, nan_ok=True), key
