"""`mask_and_weights`, the batch entry point of the math layer: bit-identical to the two calls it combines
(`compute_trust_region_mask`, then `estimator_weights`), with `token_weight_sum` the per-row sum of the returned
weights, in every mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trl_trm.masking import (
    DEFAULT_RATIO_MAX,
    TRM_MODES,
    TrustRegionMaskOutput,
    compute_trust_region_mask,
    estimator_weights,
    mask_and_weights,
    topk_token_chi2,
    topk_token_kl,
)

# Thresholds under which every mode keeps some rows and rejects others on the batch below.
MODE_KWARGS = {
    "trm": dict(delta_max=0.5, delta_avg=0.02),
    "trm_exact": dict(delta_kl=0.08, delta_avg=None),
    "geo_mask": dict(geo_low=0.9, geo_high=1.1),
    "seq_mis": dict(ratio_min=0.5, ratio_max=1.5),
    "seq_tis": dict(ratio_min=0.5, ratio_max=1.5),
    "token_tis": dict(ratio_min=0.8, ratio_max=1.25),
    "token_mis": dict(ratio_min=0.8, ratio_max=1.25),
    "none": dict(),
}
assert set(MODE_KWARGS) == set(TRM_MODES)


def _batch(dtype=torch.float32, batch=12, length=37, k=5, seed=0, nonfinite=False):
    """(theta, roll, old, mask, kl_tok, chi2_tok): right-padded rows of different lengths, garbage in the padding, and
    (optionally) a NaN and an inf at valid positions of two rows."""
    gen = torch.Generator().manual_seed(seed)
    roll = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3.0
    theta = roll + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.2
    old = roll + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.1
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    theta = torch.where(mask.bool(), theta, 1e4)
    if nonfinite:
        theta[1, 0] = float("nan")
        old[2, 0] = float("inf")
    roll_k = torch.log_softmax(torch.randn(batch, length, k, generator=gen, dtype=torch.float64), -1)
    theta_k = torch.log_softmax(roll_k + 0.3 * torch.randn(batch, length, k, generator=gen, dtype=torch.float64), -1)
    kl_tok, chi2_tok = topk_token_kl(roll_k, theta_k), topk_token_chi2(roll_k, theta_k)
    return theta.to(dtype), roll.to(dtype), old.to(dtype), mask, kl_tok, chi2_tok


def _two_calls(theta, roll, old, mask, *, mode, ratio_factor=True, kl_tok=None, chi2_tok=None, **kwargs):
    result = compute_trust_region_mask(theta, roll, mask, mode=mode, kl_tok=kl_tok, chi2_tok=chi2_tok, **kwargs)
    weights = estimator_weights(
        result,
        old,
        roll,
        mask,
        mode=mode,
        ratio_min=kwargs.get("ratio_min"),
        ratio_max=kwargs.get("ratio_max", DEFAULT_RATIO_MAX),
        ratio_factor=ratio_factor,
    )
    result.token_weight_sum = weights.sum(dim=-1).to(result.token_weight_sum.dtype)
    return result, weights


def _assert_bit_identical(a: TrustRegionMaskOutput, b: TrustRegionMaskOutput, wa, wb, context):
    assert torch.equal(wa, wb) and wa.dtype == wb.dtype, context
    for f in dataclasses.fields(TrustRegionMaskOutput):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "rejected_by":
            assert list(x) == list(y), context
            for name in x:
                assert torch.equal(x[name], y[name]), (context, name)
        elif x is None or y is None:
            assert x is None and y is None, (context, f.name)
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), (context, f.name)


@pytest.mark.parametrize("mode", TRM_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_mask_and_weights_equals_the_two_calls(mode, dtype, nonfinite):
    theta, roll, old, mask, kl_tok, chi2_tok = _batch(dtype, nonfinite=nonfinite)
    kwargs = dict(MODE_KWARGS[mode])
    extra = {"kl_tok": kl_tok, "chi2_tok": chi2_tok}
    result, weights = mask_and_weights(theta, roll, old, mask, mode=mode, **kwargs, **extra)
    ref, ref_weights = _two_calls(theta, roll, old, mask, mode=mode, **kwargs, **extra)
    _assert_bit_identical(result, ref, weights, ref_weights, (mode, dtype, nonfinite))
    assert torch.equal(result.token_weight_sum, weights.sum(dim=-1).to(result.token_weight_sum.dtype))


@pytest.mark.parametrize("mode", [m for m in TRM_MODES if m != "trm_exact"])
def test_mask_and_weights_defaults_and_no_kl(mode):
    """With the defaults of both calls and no per-token KL (every mode that does not need one)."""
    theta, roll, old, mask, _, _ = _batch(seed=1)
    kwargs = {"ratio_min": 0.5} if mode in ("seq_mis", "seq_tis", "token_tis", "token_mis") else {}
    result, weights = mask_and_weights(theta, roll, old, mask, mode=mode, **kwargs)
    ref, ref_weights = _two_calls(theta, roll, old, mask, mode=mode, **kwargs)
    _assert_bit_identical(result, ref, weights, ref_weights, mode)
    assert result.kl_tok_max is None and result.chi2_tok_sum is None


@pytest.mark.parametrize("mode", ["trm", "geo_mask", "seq_mis", "token_mis", "seq_tis", "token_tis"])
def test_mask_and_weights_without_ratio_factor(mode):
    theta, roll, old, mask, _, _ = _batch(seed=2)
    kwargs = dict(MODE_KWARGS[mode])
    result, weights = mask_and_weights(theta, roll, old, mask, mode=mode, ratio_factor=False, **kwargs)
    ref, ref_weights = _two_calls(theta, roll, old, mask, mode=mode, ratio_factor=False, **kwargs)
    _assert_bit_identical(result, ref, weights, ref_weights, mode)
    if mode in ("trm", "geo_mask", "seq_mis", "token_mis"):  # the plain 0/1 mask
        assert torch.equal(weights, result.weights)


def test_mask_and_weights_token_weight_sum_is_what_the_loss_multiplies():
    """In the mask modes the estimator's weights carry pi_old/pi_roll, so their row sums differ from the 0/1 mask's."""
    theta, roll, old, mask, _, _ = _batch(seed=3)
    plain = compute_trust_region_mask(theta, roll, mask, mode="trm", delta_max=0.5, delta_avg=0.02)
    result, weights = mask_and_weights(theta, roll, old, mask, mode="trm", delta_max=0.5, delta_avg=0.02)
    assert torch.equal(result.weights, plain.weights)
    assert torch.equal(result.token_weight_sum, weights.sum(dim=-1))
    assert not torch.equal(result.token_weight_sum, plain.token_weight_sum)


def test_mask_and_weights_raise_and_errors_match_the_mask():
    theta, roll, old, mask, _, _ = _batch(nonfinite=True)
    with pytest.raises(ValueError, match="Non-finite log-probs"):
        mask_and_weights(theta, roll, old, mask, mode="trm", nonfinite="raise")
    with pytest.raises(ValueError, match="needs `kl_tok`"):
        mask_and_weights(theta, roll, old, mask, mode="trm_exact")
    with pytest.raises(ValueError, match="Mismatched shapes"):
        mask_and_weights(theta, roll, old[:, :3], mask, mode="trm")


def test_mask_and_weights_leaves_inputs_and_grad_alone():
    theta, roll, old, mask, _, _ = _batch(seed=4)
    theta = theta.clone().requires_grad_(True)
    before = theta.detach().clone()
    result, weights = mask_and_weights(theta, roll, old, mask, mode="trm")
    assert not weights.requires_grad and not result.k3_mean.requires_grad
    assert torch.equal(theta.detach(), before)
