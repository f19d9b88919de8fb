"""`trm_exact`: per-token KL from stored rollout log-probs (top-k + rest bucket) and the exact-KL mask."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_trm.masking import compute_trust_region_mask, summarize_mask_stats, topk_token_kl
from trl_trm.tabular import per_position_kl, perturb_policy, random_policy


def _brute_force_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the full last dimension, written as a plain python double sum."""
    out = torch.empty(log_p.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in log_p.shape[:-1])):
        total = 0.0
        for lp, lq in zip(log_p[idx].tolist(), log_q[idx].tolist(), strict=True):
            total += math.exp(lp) * (lp - lq)
        out[idx] = total
    return out


def _topk_inputs(log_p: torch.Tensor, log_q: torch.Tensor, k: int):
    """The rollout's top-k ids and both distributions' log-probs there, as a rollout engine would store them."""
    ids = log_p.topk(k, dim=-1).indices  # (B, T, k)
    return log_p.gather(-1, ids), log_q.gather(-1, ids)


def _random_pair(B: int, T: int, V: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    noise = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    return torch.log_softmax(logits, -1), torch.log_softmax(logits + noise, -1)


def test_full_vocabulary_equals_brute_force():
    log_p, log_q = _random_pair(3, 4, 7, seed=0)
    roll, theta = _topk_inputs(log_p, log_q, k=7)
    torch.testing.assert_close(topk_token_kl(roll, theta), _brute_force_kl(log_p, log_q), rtol=1e-10, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 5),
    V=st.integers(2, 9),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 3.0]),
)
def test_topk_is_a_lower_bound_that_grows_with_k(B, T, V, seed, scale):
    log_p, log_q = _random_pair(B, T, V, seed, scale)
    exact = _brute_force_kl(log_p, log_q)
    previous = torch.zeros(B, T, dtype=torch.float64)
    for k in range(1, V + 1):
        value = topk_token_kl(*_topk_inputs(log_p, log_q, k))
        assert bool((value <= exact + 1e-10).all()), (k, value, exact)  # data-processing inequality
        assert bool((value >= previous - 1e-10).all())  # a finer partition never decreases the KL
        previous = value
    torch.testing.assert_close(previous, exact, rtol=1e-8, atol=1e-10)  # k = V is exact


def test_two_bucket_value_by_hand():
    # p = (0.5, 0.3, 0.2), q = (0.4, 0.4, 0.2), stored id 0 only: buckets (0.5, 0.5) vs (0.4, 0.6)
    log_p = torch.tensor([[[math.log(0.5)]]], dtype=torch.float64)
    log_q = torch.tensor([[[math.log(0.4)]]], dtype=torch.float64)
    want = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert topk_token_kl(log_p, log_q).item() == pytest.approx(want, rel=1e-12)


def test_unused_slots_are_ignored():
    log_p, log_q = _random_pair(2, 3, 6, seed=1)
    roll, theta = _topk_inputs(log_p, log_q, k=4)
    short = topk_token_kl(roll[..., :2], theta[..., :2])
    garbage_roll, garbage_theta = roll.clone(), theta.clone()
    garbage_roll[..., 2:], garbage_theta[..., 2:] = 123.0, float("nan")
    mask = torch.zeros_like(roll, dtype=torch.bool)
    mask[..., :2] = True
    torch.testing.assert_close(topk_token_kl(garbage_roll, garbage_theta, mask), short)


def test_bf16_top_k_values_and_memory_shape():
    log_p, log_q = _random_pair(2, 5, 50, seed=2)
    roll, theta = _topk_inputs(log_p.float(), log_q.float(), k=5)
    out = topk_token_kl(roll.bfloat16(), theta.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (2, 5) and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="Mismatched shapes"):
        topk_token_kl(roll, theta[..., :3])


def test_trm_exact_mask_and_stats():
    logp = torch.full((3, 4), -1.0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    kl = torch.tensor([[1e-5, 5e-5, 9e-5, 7.0], [1e-5, 2e-4, 0.0, 0.0], [0.0, float("nan"), 1e4, 1e4]])
    out = compute_trust_region_mask(logp, logp, mask, mode="trm_exact", kl_tok=kl, delta_kl=1e-4, delta_avg=None)
    # row 0: max over valid = 9e-5 <= 1e-4 (the 7.0 is padding); row 1: 2e-4 > 1e-4; row 2: NaN at a valid position
    assert out.keep.tolist() == [True, False, False]
    assert out.rejected_by["delta_kl"].tolist()[:2] == [False, True]
    assert out.finite.tolist() == [True, True, False]
    assert out.kl_tok_max[0].item() == pytest.approx(9e-5)
    assert out.kl_tok_sum[1].item() == pytest.approx(2.1e-4)
    assert out.weights.tolist()[0] == [1.0, 1.0, 1.0, 0.0]
    metrics = summarize_mask_stats(out.sequence_stats())
    assert metrics["trm/reject_rate/delta_kl"] == pytest.approx(1 / 3)
    assert metrics["trm/kl_tok_max/max"] == pytest.approx(2e-4)
    # exact KLs give bound metrics without the `_estimate` suffix: T = 3, delta = 9e-5, D_seq = 1.5e-4
    assert metrics["trm/bound/trpo"] == pytest.approx(3 * 2 * 9e-5)
    assert metrics["trm/bound/mixed"] == pytest.approx(2 * 3 * math.sqrt(9e-5 * 1.5e-4))
    assert "trm/bound/trpo_estimate" not in metrics


def test_trm_exact_needs_kl_tok_and_delta_kl():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs `kl_tok`"):
        compute_trust_region_mask(x, x, torch.ones(2, 3), mode="trm_exact")
    with pytest.raises(ValueError, match="needs `delta_kl`"):
        compute_trust_region_mask(x, x, torch.ones(2, 3), mode="trm_exact", kl_tok=x, delta_kl=None)
    with pytest.raises(ValueError, match="`kl_tok` is"):
        compute_trust_region_mask(x, x, torch.ones(2, 3), mode="trm_exact", kl_tok=torch.zeros(2, 4))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([0.01, 0.1, 0.5]), delta=st.sampled_from([1e-4, 1e-3, 1e-2]))
def test_sequences_accepted_with_full_vocabulary_kl_are_inside_the_trust_region(seed, scale, delta):
    """On exact tabular policies, every sequence `trm_exact` keeps has max_t KL(pi_roll || pi_theta) <= delta."""
    rng = np.random.default_rng(seed)
    V, T = 3, 4
    pi_roll = random_policy(V, T, rng, concentration=1.0)
    pi_theta = perturb_policy(pi_roll, scale, rng)
    sequences = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (V^T, T): every sequence
    kl = per_position_kl(pi_roll, pi_theta, sequences)  # (V^T, T) exact per-context KL
    zeros = torch.zeros(sequences.shape, dtype=torch.float64)
    out = compute_trust_region_mask(
        zeros, zeros, torch.ones_like(sequences), mode="trm_exact", kl_tok=kl, delta_kl=delta, delta_avg=None
    )
    kept_max = kl.max(dim=-1).values[out.keep]
    assert bool((kept_max <= delta).all())
    assert bool((kl.max(dim=-1).values[~out.keep] > delta).all())  # and exactly those are rejected


def test_lower_bound_kls_are_named_so():
    """From a top-k with k < V the per-token KLs are lower bounds: their metrics (and the bounds computed from them)
    end in `_lb`; with k >= V they carry no suffix."""
    logp = torch.full((2, 3), -1.0)
    kl = torch.tensor([[1e-5, 2e-5, 3e-5], [4e-5, 5e-5, 6e-5]])
    out = compute_trust_region_mask(logp, logp, torch.ones(2, 3), mode="trm_exact", kl_tok=kl, delta_avg=None)
    exact = summarize_mask_stats(out.sequence_stats())
    lower = summarize_mask_stats(out.sequence_stats(), kl_tok_lower_bound=True)
    assert lower["trm/kl_tok_max_lb/max"] == exact["trm/kl_tok_max/max"] == pytest.approx(6e-5)
    assert lower["trm/bound/trpo_lb"] == exact["trm/bound/trpo"] == pytest.approx(3 * 2 * 6e-5)
    assert not any(k.startswith(("trm/kl_tok_max/", "trm/kl_tok_mean/")) for k in lower)
    assert "trm/bound/trpo" not in lower and "trm/bound/length" in lower  # the length is exact either way
    assert not any(k.endswith("_lb") or "_lb/" in k for k in exact)
