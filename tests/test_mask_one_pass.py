"""The mask in one pass (issue 22, item 4): `compute_trust_region_mask` accumulates the variance sums (chi^2, the
surrogate's sum_t (rho_t - 1), chi2_tok) inside its row-block loop instead of a second float64 pass over (B, T).
Its decisions, weights and every other statistic must stay bit-identical to the path before the change, frozen in
`tests/frozen_mask_v0.py`; the variance sums must agree to float64-accumulated rounding of the working dtype."""

from __future__ import annotations

import random

import frozen_mask_v0
import pytest
import torch

import trl_trm.diagnostics as diagnostics
from trl_trm.masking import TRM_MODES, compute_trust_region_mask

EXACT = ("log_ratio_abs_max", "k3_mean", "k3_max", "k1_mean", "geo_ratio", "seq_log_ratio", "length", "num_finite")
EXACT += ("finite", "token_weight_sum", "kl_tok_max", "kl_tok_sum")
VARIANCE = ("chi2_sum", "ratio_m1_sum", "chi2_tok_sum")


def _case(seed: int) -> tuple[dict, dict]:
    """One random batch: sizes that give one or several row blocks, empty rows, non-finite values at valid and at
    padding positions, mismatches from tiny to beyond float32's (rho - 1)^2 range, and random optional inputs."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = rng.choice([1, 2, 3, 7, 9, 33])
    length = rng.choice([0, 1, 5, 64, 1000, 20000])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float64])
    roll = -5.0 * torch.rand(batch, length, generator=gen, dtype=torch.float64)  # (B, T)
    scale = rng.choice([1e-3, 0.05, 0.5, 3.0])
    theta = roll + scale * torch.randn(batch, length, generator=gen, dtype=torch.float64)  # (B, T)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    if batch > 1:
        lengths[rng.randrange(batch)] = 0  # an empty row
    mask = (torch.arange(length) < lengths[:, None]).to(rng.choice([torch.long, torch.bool, torch.float32]))
    kl = torch.rand(batch, length, generator=gen, dtype=torch.float64) * 0.01 if rng.random() < 0.6 else None
    chi2 = torch.rand(batch, length, generator=gen, dtype=torch.float64) * 0.02 if rng.random() < 0.5 else None
    if length > 0:
        for _ in range(rng.randrange(4)):  # non-finite or huge values, at valid or padding positions
            i, t = rng.randrange(batch), rng.randrange(length)
            value = rng.choice([float("nan"), float("inf"), float("-inf"), 50.0, 100.0, 400.0, -60.0])
            target = rng.choice(["theta", "roll", "kl", "chi2"])
            tensor = {"theta": theta, "roll": roll, "kl": kl, "chi2": chi2}[target]
            if tensor is not None:
                tensor[i, t] = roll[i, t] + value if target == "theta" else abs(value) if target != "roll" else value
    mode = rng.choice(TRM_MODES)
    if mode == "trm_exact" and kl is None:
        kl = torch.rand(batch, length, generator=gen, dtype=torch.float64) * 0.01
    kl_dtype = rng.choice([torch.float32, torch.float64])
    args = (theta.to(dtype), roll.to(dtype), mask)
    kwargs = {
        "mode": mode,
        "kl_tok": None if kl is None else kl.to(kl_dtype),
        "chi2_tok": None if chi2 is None else chi2.to(kl_dtype),
    }
    if mode in ("seq_tis", "seq_mis", "token_tis", "token_mis"):
        kwargs.update(ratio_min=rng.choice([None, 0.5]), ratio_max=rng.choice([1.5, 2.0, 10.0]))
    return {"args": args, "kwargs": kwargs}, {"dtype": dtype, "mode": mode}


def _assert_same(new, old, exact_variance: bool) -> None:
    assert torch.equal(new.keep, old.keep)
    assert new.weights.dtype == old.weights.dtype
    assert torch.equal(new.weights, old.weights)  # bit-identical weights (0 on padding, rejected rows)
    assert new.rejected_by.keys() == old.rejected_by.keys()
    for name in new.rejected_by:
        assert torch.equal(new.rejected_by[name], old.rejected_by[name]), name
    for name in EXACT:
        a, b = getattr(new, name), getattr(old, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, name
            assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])
    for name in VARIANCE:
        a, b = getattr(new, name), getattr(old, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.dtype == b.dtype == torch.float64, name
        if exact_variance:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
        else:  # the working dtype's rounding per term (float32: ~1e-7 of |rho_t - 1| and of lr), summed in float64;
            # a sum of terms of both signs cancels, so the tolerance scales with sum_t |term| <= sqrt(T chi2_sum)
            scale = (old.chi2_sum * old.length.double()).sqrt() if name == "ratio_m1_sum" else b.abs()
            scale = torch.where(torch.isfinite(scale), scale, 0.0)
            close = (a - b).abs() <= 2e-6 * (scale + b.abs()) + 1e-9
            same = (a == b) | (a.isnan() & b.isnan())
            assert bool((close | same).all()), (name, a, b)


@pytest.mark.parametrize("seed", range(240))
def test_one_pass_matches_the_frozen_two_pass_path(seed):
    case, info = _case(seed)
    new = compute_trust_region_mask(*case["args"], **case["kwargs"])
    old = frozen_mask_v0.compute_trust_region_mask(*case["args"], **case["kwargs"])
    _assert_same(new, old, exact_variance=info["dtype"] == torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", TRM_MODES)
def test_every_mode_and_dtype_with_empty_and_nonfinite_rows(mode, dtype):
    """A fixed batch for each (mode, dtype): an empty row, a NaN row, a +inf kl row, a row with log rho = 60 (its
    (rho - 1)^2 overflows float32, so the float64 fallback must give the old finite value) and ordinary rows."""
    gen = torch.Generator().manual_seed(7)
    roll = -3.0 * torch.rand(8, 300, generator=gen, dtype=torch.float64)  # (B, T)
    theta = roll + 0.1 * torch.randn(8, 300, generator=gen, dtype=torch.float64)  # (B, T)
    mask = torch.ones(8, 300, dtype=torch.long)  # (B, T)
    mask[0] = 0  # empty row
    mask[1, 200:] = 0
    theta[2, 10] = float("nan")
    theta[3, 5] = roll[3, 5] + 60.0
    theta[1, 250] = float("nan")  # padding: changes nothing
    kl = torch.rand(8, 300, generator=gen, dtype=torch.float64) * 0.01  # (B, T)
    kl[4, 3] = float("inf")
    chi2 = torch.rand(8, 300, generator=gen, dtype=torch.float64) * 0.01  # (B, T)
    args = (theta.to(dtype), roll.to(dtype), mask)
    for kwargs in ({"kl_tok": kl, "chi2_tok": chi2}, {"kl_tok": kl}, {}):
        if mode == "trm_exact" and "kl_tok" not in kwargs:
            continue
        new = compute_trust_region_mask(*args, mode=mode, **kwargs)
        old = frozen_mask_v0.compute_trust_region_mask(*args, mode=mode, **kwargs)
        _assert_same(new, old, exact_variance=dtype == torch.float64)
        assert torch.isfinite(new.chi2_sum[3]) and new.chi2_sum[3] > 1e50  # the float64 fallback, not inf


def test_no_second_pass_over_the_batch(monkeypatch):
    """The float64 fallback `_variance_sums` runs only for rows whose in-loop chi^2 overflowed: none here."""
    calls = []
    monkeypatch.setattr(
        diagnostics, "_variance_sums", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError)
    )
    theta, roll = -torch.rand(64, 512), -torch.rand(64, 512)  # (B, T)
    result = compute_trust_region_mask(theta, roll, torch.ones(64, 512), mode="trm")
    assert calls == [] and torch.isfinite(result.chi2_sum).all()


@pytest.mark.parametrize("mode", TRM_MODES)
def test_the_fast_pass_multiplies_by_the_valid_set_exactly(mode):
    """The fast pass zeroes the padding by multiplying with the 0/1 valid set instead of `masked_fill`: a mask with
    non-0/1 entries (2, 0.5: still "valid"), padding holding garbage (+-1e4, NaN, inf), and a Seq-TIS row whose product
    ratio overflows (C = 1e300, no clip in effect: exp(s) = inf, and inf * 0 would be NaN on its padding) give the frozen results."""
    gen = torch.Generator().manual_seed(3)
    roll = -3.0 * torch.rand(6, 2000, generator=gen)  # (B, T)
    theta = roll + 0.05 * torch.randn(6, 2000, generator=gen)  # (B, T)
    mask = torch.ones(6, 2000)  # (B, T)
    mask[:, 1500:] = 0.0
    mask[0, :10] = 2.0
    mask[1, :10] = 0.5
    theta[2, 1600], roll[3, 1700], theta[4, 1800] = 1e4, float("nan"), float("inf")  # padding garbage
    theta[5, :1500] = roll[5, :1500] + 0.5  # s = 750: exp overflows float32
    kwargs = {"ratio_max": 1e300} if mode in ("seq_tis", "token_tis", "seq_mis") else {}  # log C = 691: no clip
    if mode == "trm_exact":
        kwargs["kl_tok"] = torch.rand(6, 2000, generator=gen) * 1e-5
    new = compute_trust_region_mask(theta, roll, mask, mode=mode, **kwargs)
    old = frozen_mask_v0.compute_trust_region_mask(theta, roll, mask, mode=mode, **kwargs)
    _assert_same(new, old, exact_variance=False)
    assert not new.weights.isnan().any()
    assert (new.weights[:, 1500:] == 0).all()
