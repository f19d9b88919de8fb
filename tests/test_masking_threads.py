"""The CPU block loop of `compute_trust_region_mask` on one torch thread (robust to other processes on the cores) gives
results bit-identical to the previous block loop on all torch threads, kept below as a frozen reference.

The reference is a verbatim copy of `_row_blocks`, `_BlockStats`, `_fill_row_block` and `compute_trust_region_mask`
as they were before the change (the variance sums added later are not part of it and not compared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

import trl_trm.row_blocks as row_blocks
from trl_trm.masking import (
    DEFAULT_DELTA_AVG,
    DEFAULT_DELTA_KL,
    DEFAULT_DELTA_MAX,
    DEFAULT_GEO_HIGH,
    DEFAULT_GEO_LOW,
    DEFAULT_RATIO_MAX,
    TRM_MODES,
    TrustRegionMaskOutput,
    _check_inputs,
    _weight_band,
    compute_trust_region_mask,
    validate_thresholds,
)

# ------------------------------------------------------------------------------------------ frozen reference (old)
_REF_BLOCK_ELEMENTS = 1 << 17


def _ref_row_blocks(batch: int, length: int, device: torch.device) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering the batch. Every statistic is per row, so blocks are exact.

    On CPU, blocks of about ``_REF_BLOCK_ELEMENTS`` elements (at least 2 rows); on other devices one block (fewer
    kernel launches; the accelerator's memory bandwidth is the bottleneck, not its cache). A batch of several rows is
    never cut into a 1-row block: torch splits a single-row reduction across threads (another summation order), so
    its sums would not be bit-identical to the same row reduced inside a larger batch.
    """
    if batch == 0:
        return []
    rows = batch if device.type != "cpu" else max(2, _REF_BLOCK_ELEMENTS // max(length, 1))
    starts = list(range(0, batch, rows))
    if len(starts) > 1 and batch - starts[-1] == 1:
        starts.pop()  # merge a trailing 1-row block into the previous one
    return list(zip(starts, starts[1:] + [batch], strict=True))


@dataclass
class _RefBlockStats:
    """Per-sequence outputs that the row blocks of `compute_trust_region_mask` write into, (B,) each."""

    length: torch.Tensor  # long
    num_finite: torch.Tensor  # long
    seq_log_ratio: torch.Tensor  # sum_t log rho_t
    log_ratio_abs_max: torch.Tensor  # max_t |log rho_t|
    k3_sum: torch.Tensor  # sum_t k3(rho_t)
    k3_max: torch.Tensor  # max_t k3(rho_t)
    token_weight_sum: torch.Tensor  # sum_t weights[i, t]
    kl_tok_max: torch.Tensor | None
    kl_tok_sum: torch.Tensor | None

    @classmethod
    def empty(cls, batch: int, dtype: torch.dtype, device: torch.device, with_kl: bool) -> _RefBlockStats:
        def new(kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(batch, dtype=kind, device=device)  # zeros: the max of an empty row (T = 0) is 0

        kl_max, kl_sum = (new(), new()) if with_kl else (None, None)
        return cls(new(torch.long), new(torch.long), new(), new(), new(), new(), new(), kl_max, kl_sum)


def _ref_fill_row_block(
    theta: torch.Tensor,
    roll: torch.Tensor,
    completion_mask: torch.Tensor,
    kl: torch.Tensor | None,
    start: int,
    stop: int,
    stats: _RefBlockStats,
    weights: torch.Tensor,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mode: str,
    band: tuple[float | None, float | None],
    check_finite: bool,
) -> None:
    """Statistics and pre-``keep`` weights of rows [start, stop) of `compute_trust_region_mask`, written in place.

    ``check_finite=False`` assumes every valid log-prob (and ``kl``) is finite: the valid set is then the completion
    mask. The caller detects rows where that was wrong (their sums are non-finite) and calls again with ``True``,
    which excludes non-finite tokens exactly as the formulas say. Rejected rows' weights are zeroed by the caller.
    """
    n, length = stop - start, weights.size(1)
    lr, work, pad = (s[:n] for s in scratch)  # (n, T) views of the scratch tensors
    torch.eq(completion_mask[start:stop], 0, out=pad)  # (n, T) True on padding
    theta_b, roll_b = theta[start:stop], roll[start:stop]
    if torch.result_type(theta_b, roll_b) == lr.dtype:  # the subtraction runs in the working dtype
        torch.sub(theta_b, roll_b, out=lr)
    else:  # both inputs narrower (bf16/fp16): widen both first, as `.to(dtype)` would (`lr.sub_(roll_b)` would
        lr.copy_(theta_b)  # allocate an (n, T) widened copy of roll_b; the scratch `work` is free at this point)
        lr.sub_(work.copy_(roll_b))
    s = slice(start, stop)
    if length < 2**24:  # count in the float scratch: exact below 2**24, and no (n, T) int64 copy of a bool sum
        torch.sum(torch.logical_not(pad, out=work), dim=-1, out=stats.k3_sum[s])  # k3_sum as (n,) scratch
        stats.length[s].copy_(stats.k3_sum[s])  # T_i
    else:
        torch.sum(pad, dim=-1, out=stats.length[s])
        stats.length[s].neg_().add_(length)  # T_i = T - padding
    invalid = pad
    if check_finite:
        invalid = ~torch.isfinite(lr)  # (n, T)
        if kl is not None:
            work.copy_(kl[start:stop])  # kl in the working dtype: a float64 value can overflow float32
            invalid |= ~torch.isfinite(work)
        invalid |= pad
        torch.sum(invalid, dim=-1, out=stats.num_finite[s])
        stats.num_finite[s].neg_().add_(length)
    else:
        stats.num_finite[s].copy_(stats.length[s])
    lr.masked_fill_(invalid, 0.0)  # exact zeros off the valid set

    torch.sum(lr, dim=-1, out=stats.seq_log_ratio[s])
    if length > 0:  # the max of an empty row stays 0
        torch.amax(torch.abs(lr, out=work), dim=-1, out=stats.log_ratio_abs_max[s])
    torch.expm1(lr, out=work).sub_(lr)  # (n, T) k3, exactly 0 where lr == 0
    torch.sum(work, dim=-1, out=stats.k3_sum[s])
    if length > 0:
        torch.amax(work, dim=-1, out=stats.k3_max[s])
    if kl is not None:
        work.copy_(kl[start:stop]).masked_fill_(invalid, 0.0)  # (n, T)
        torch.sum(work, dim=-1, out=stats.kl_tok_sum[s])
        if length > 0:
            torch.amax(work, dim=-1, out=stats.kl_tok_max[s])

    w = weights[start:stop]  # (n, T) slice of the returned weights
    lo, hi = band
    if mode == "token_tis":
        torch.clamp(lr, min=lo, max=hi, out=w).exp_()  # rho_t truncated to the band
    elif mode == "token_mis":
        torch.eq(torch.clamp(lr, min=lo, max=hi, out=w), lr, out=w)  # 1 inside the band [lo, hi], else 0
    elif mode == "seq_tis":
        seq_w = torch.exp(stats.seq_log_ratio[s].clamp(min=lo, max=hi))  # (n,)
        w.copy_(seq_w.unsqueeze(-1).expand(n, length))
    if mode in ("token_tis", "token_mis", "seq_tis"):
        w.masked_fill_(pad, 0.0)
    else:  # sequence masks and `none`: the completion mask, zeroed afterwards on rejected rows
        torch.logical_not(pad, out=w)
    torch.sum(w, dim=-1, out=stats.token_weight_sum[s])


def reference_compute_trust_region_mask(
    per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    mode: str = "trm",
    delta_max: float | None = DEFAULT_DELTA_MAX,
    delta_avg: float | None = DEFAULT_DELTA_AVG,
    geo_low: float | None = DEFAULT_GEO_LOW,
    geo_high: float | None = DEFAULT_GEO_HIGH,
    ratio_min: float | None = None,
    ratio_max: float | None = DEFAULT_RATIO_MAX,
    kl_tok: torch.Tensor | None = None,
    delta_kl: float | None = DEFAULT_DELTA_KL,
    nonfinite: Literal["reject", "raise"] = "reject",
) -> TrustRegionMaskOutput:
    """Compute the per-sequence keep mask and per-token loss weights of one correction ``mode``.

    Args:
        per_token_logps: (B, T) log pi_theta(y_t | c_t) from the training engine. Detached internally.
        sampling_per_token_logps: (B, T) log pi_roll(y_t | c_t) reported by the rollout engine at sampling time.
        completion_mask: (B, T) 1 for valid completion tokens, 0 for padding (bool, int or float).
        mode: one of :data:`TRM_MODES`.
        delta_max: `trm` threshold on D_max = max_t |log rho_t|; None switches the criterion off.
        delta_avg: `trm` threshold on D_avg = mean_t k3(rho_t); None switches the criterion off.
        geo_low, geo_high: `geo_mask` band on the geometric-mean ratio; None switches that side off.
        ratio_min, ratio_max: band on rho (token modes) or on the product ratio (sequence modes); None is off.
        kl_tok: (B, T) per-token KL(pi_roll(.|c_t) || pi_theta(.|c_t)), e.g. from :func:`topk_token_kl`. Required by
            `trm_exact`; in other modes it only adds the `kl_tok_*` statistics.
        delta_kl: `trm_exact` threshold on max_t kl_tok.
        nonfinite: "reject" (default) rejects sequences with a non-finite log-prob at a valid position;
            "raise" raises ``ValueError`` instead.

    Returns:
        :class:`TrustRegionMaskOutput`.
    """
    validate_thresholds(
        mode,
        delta_max=delta_max,
        delta_avg=delta_avg,
        geo_low=geo_low,
        geo_high=geo_high,
        ratio_min=ratio_min,
        ratio_max=ratio_max,
        delta_kl=delta_kl,
    )
    if mode == "trm_exact" and kl_tok is None:
        raise ValueError(
            "`mode='trm_exact'` needs `kl_tok`, the (B, T) per-token KL(pi_roll || pi_theta) computed from the "
            "rollout's stored top-k (or full) log-probs, e.g. with `topk_token_kl`."
        )
    if nonfinite not in ("reject", "raise"):
        raise ValueError(f"`nonfinite` must be 'reject' or 'raise', got {nonfinite!r}.")
    _check_inputs(per_token_logps, sampling_per_token_logps, completion_mask)
    if kl_tok is not None and tuple(kl_tok.shape) != tuple(completion_mask.shape):
        raise ValueError(
            f"Mismatched shapes: `kl_tok` is {tuple(kl_tok.shape)} but `completion_mask` is "
            f"{tuple(completion_mask.shape)}; pass one KL value per completion token."
        )

    dtype = (
        torch.float64 if torch.float64 in (per_token_logps.dtype, sampling_per_token_logps.dtype) else torch.float32
    )
    batch, length_t = completion_mask.shape
    device = per_token_logps.device
    with torch.no_grad():
        theta = per_token_logps.detach()  # (B, T)
        roll = sampling_per_token_logps.detach()  # (B, T)
        kl = None if kl_tok is None else kl_tok.detach()  # (B, T)
        blocks = _ref_row_blocks(batch, length_t, device)
        rows = max((stop - start for start, stop in blocks), default=0)
        stats = _RefBlockStats.empty(batch, dtype, device, with_kl=kl is not None)
        weights = torch.empty(batch, length_t, dtype=dtype, device=device)  # (B, T), returned
        scratch = (
            torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) log-ratios
            torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) k3, |log rho|, kl_tok
            torch.empty(rows, length_t, dtype=torch.bool, device=device),  # (rows, T) padding
        )
        band = _weight_band(mode, ratio_min, ratio_max)

        def fill(start: int, stop: int, check_finite: bool) -> None:
            _ref_fill_row_block(
                theta, roll, completion_mask, kl, start, stop, stats, weights, scratch, mode, band, check_finite
            )

        # Fast pass: assumes every valid log-prob (and kl_tok) is finite, so the valid set is the completion mask.
        for start, stop in blocks:
            fill(start, stop, check_finite=False)
        # A non-finite value at a valid position makes its row's sum non-finite: recompute those row blocks with the
        # per-token finiteness check (rare; a finite row that merely overflowed is recomputed too, harmlessly).
        row_sums = stats.seq_log_ratio if kl is None else stats.seq_log_ratio + stats.kl_tok_sum  # (B,)
        bad_rows = (~torch.isfinite(row_sums)).nonzero().flatten().tolist()
        if bad_rows:
            bad_rows = set(bad_rows)
            for start, stop in blocks:
                if any(start <= i < stop for i in bad_rows):
                    fill(start, stop, check_finite=True)

        length = stats.length
        num_finite = stats.num_finite
        finite = num_finite == length  # (B,) every valid position finite
        if nonfinite == "raise" and not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"Non-finite log-probs at valid completion positions in sequences {bad[:10]}: the rollout engine or "
                "the training forward returned NaN/inf. Use `nonfinite='reject'` (the trainer's "
                "`trm_nonfinite='reject'`) to reject such sequences instead."
            )
        n_finite = num_finite.clamp(min=1).to(dtype)  # (B,) safe denominator
        seq_log_ratio = stats.seq_log_ratio  # (B,)
        log_geo = seq_log_ratio / n_finite  # (B,)
        log_ratio_abs_max = stats.log_ratio_abs_max  # (B,)
        k3_mean = stats.k3_sum / n_finite  # (B,)
        k1_mean = -log_geo  # (B,)

        rejected_by: dict[str, torch.Tensor] = {"nonfinite": ~finite}
        if mode == "trm":
            if delta_max is not None:
                rejected_by["delta_max"] = log_ratio_abs_max > delta_max
            if delta_avg is not None:
                rejected_by["delta_avg"] = k3_mean > delta_avg
        elif mode == "trm_exact":
            rejected_by["delta_kl"] = stats.kl_tok_max > delta_kl
            if delta_avg is not None:
                rejected_by["delta_avg"] = k3_mean > delta_avg
        elif mode == "geo_mask":
            if geo_low is not None:
                rejected_by["geo_low"] = log_geo < math.log(geo_low)
            if geo_high is not None:
                rejected_by["geo_high"] = log_geo > math.log(geo_high)
        elif mode == "seq_mis":
            rejected_by["ratio_max"] = seq_log_ratio > math.log(ratio_max)
            if ratio_min is not None:
                rejected_by["ratio_min"] = seq_log_ratio < math.log(ratio_min)

        if mode == "none":  # diagnostics only: nothing is rejected, not even non-finite sequences
            rejected_by = {}
            keep = torch.ones_like(finite)
        else:
            keep = ~torch.stack(list(rejected_by.values())).any(dim=0)  # (B,)
            rejected = (~keep).nonzero().flatten()  # rows whose weights the blocks wrote before `keep` was known
            if rejected.numel() > 0:
                weights.index_fill_(0, rejected, 0.0)
                stats.token_weight_sum.index_fill_(0, rejected, 0.0)

    return TrustRegionMaskOutput(
        keep=keep,
        weights=weights,
        log_ratio_abs_max=log_ratio_abs_max,
        k3_mean=k3_mean,
        k3_max=stats.k3_max,
        k1_mean=k1_mean,
        geo_ratio=torch.exp(log_geo),
        seq_log_ratio=seq_log_ratio,
        length=length,
        num_finite=num_finite,
        finite=finite,
        rejected_by=rejected_by,
        token_weight_sum=stats.token_weight_sum,
        kl_tok_max=stats.kl_tok_max,
        kl_tok_sum=stats.kl_tok_sum,
    )


# ------------------------------------------------------------------------------------------------------- tests
FIELDS = (
    "keep",
    "weights",
    "log_ratio_abs_max",
    "k3_mean",
    "k3_max",
    "k1_mean",
    "geo_ratio",
    "seq_log_ratio",
    "length",
    "num_finite",
    "finite",
    "token_weight_sum",
    "kl_tok_max",
    "kl_tok_sum",
)


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal to the bit, NaN and signed zeros included."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def _assert_identical(new: TrustRegionMaskOutput, ref: TrustRegionMaskOutput, where: str) -> None:
    for name in FIELDS:
        assert _same_bits(getattr(new, name), getattr(ref, name)), (where, name)
    assert new.rejected_by.keys() == ref.rejected_by.keys(), where
    for name in ref.rejected_by:
        assert torch.equal(new.rejected_by[name], ref.rejected_by[name]), (where, name)


def _inputs(batch, length, dtype, seed, corrupt=False, kl_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    roll = -5.0 * torch.rand(batch, length, generator=gen)
    theta = roll + 0.05 * torch.randn(batch, length, generator=gen)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T) right-padded
    kl = 1e-3 * torch.rand(batch, length, generator=gen).to(kl_dtype)
    if corrupt:  # NaN / inf at random positions (valid or padding) of either log-prob and of kl_tok
        for t in (theta, roll, kl):
            idx = torch.randint(0, batch * length, (5,), generator=gen)
            vals = torch.tensor([math.nan, math.inf, -math.inf, 1e4, -1e4], dtype=t.dtype)
            t.view(-1)[idx] = vals
    return theta.to(dtype), roll.to(dtype), mask, kl


MODE_KWARGS = {
    "trm": [{}, {"delta_max": 0.1, "delta_avg": None}, {"delta_max": None, "delta_avg": 5e-4}],
    "trm_exact": [{"delta_kl": 9e-4}, {"delta_kl": 1e-3, "delta_avg": 1e-3}],
    "geo_mask": [{}, {"geo_low": 0.999, "geo_high": None}],
    "seq_mis": [{"ratio_max": 1.5}, {"ratio_max": 2.0, "ratio_min": 0.5}],
    "seq_tis": [{}, {"ratio_min": 0.5}],
    "token_tis": [{}, {"ratio_min": 0.9, "ratio_max": 1.05}],
    "token_mis": [{"ratio_min": 0.97, "ratio_max": 1.03}, {"ratio_max": 1.01, "ratio_min": None}],
    "none": [{}],
}

# Shapes with at least 4 CPU row blocks (the threaded path): odd lengths, a merged trailing block; and one with fewer
# blocks (the serial path, as a control).
SHAPES = [(130, 4099), (16, 32768), (9, 60001), (7, 1000)]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def block_threads(monkeypatch):
    """The torch thread count seen by every `_fill_row_block` call (so a test knows which loop ran)."""
    seen = []
    original = row_blocks._fill_row_block

    def spy(*args):
        seen.append(torch.get_num_threads())
        return original(*args)

    monkeypatch.setattr(row_blocks, "_fill_row_block", spy)
    return seen


def _compare_all_modes(batch, length, dtype, all_settings=True):
    for seed, corrupt in ((0, False), (1, True)):
        theta, roll, mask, kl = _inputs(batch, length, dtype, seed, corrupt=corrupt)
        for mode in TRM_MODES:
            for kwargs in MODE_KWARGS[mode] if (all_settings and not corrupt) else MODE_KWARGS[mode][:1]:
                extra = {"kl_tok": kl} if (mode == "trm_exact" or corrupt) else {}
                new = compute_trust_region_mask(theta, roll, mask, mode=mode, **kwargs, **extra)
                ref = reference_compute_trust_region_mask(theta, roll, mask, mode=mode, **kwargs, **extra)
                _assert_identical(new, ref, (batch, length, dtype, seed, mode, kwargs))
                assert torch.get_num_threads() == 2  # the caller's setting, restored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_thread_blocks_equal_the_old_loop(dtype, two_threads, block_threads):
    _compare_all_modes(130, 4099, dtype, all_settings=False)  # 5 row blocks, odd length
    assert block_threads and set(block_threads) == {1}  # the new loop ran, on one thread


# Several row blocks with odd lengths and a merged trailing block, a single block, and one row (which keeps the
# caller's threads).
SHAPES = [(130, 4099), (16, 32768), (9, 60001), (7, 1000), (1, 50000)]


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_one_thread_blocks_equal_the_old_loop_every_setting(shape, dtype, two_threads, block_threads):
    _compare_all_modes(*shape, dtype)
    assert set(block_threads) == ({2} if shape[0] == 1 else {1})


def test_one_thread_blocks_mixed_dtypes_and_raise(two_threads):
    theta, roll, mask, kl = _inputs(40, 13001, torch.float32, 3, corrupt=True, kl_dtype=torch.float64)
    for a, b in ((theta.half(), roll.bfloat16()), (theta.double(), roll), (theta, roll.double())):
        for mode in ("trm", "trm_exact", "token_tis"):
            new = compute_trust_region_mask(a, b, mask.bool(), mode=mode, kl_tok=kl)
            ref = reference_compute_trust_region_mask(a, b, mask.bool(), mode=mode, kl_tok=kl)
            _assert_identical(new, ref, (a.dtype, b.dtype, mode))
    with pytest.raises(ValueError) as new_error:
        compute_trust_region_mask(theta, roll, mask, nonfinite="raise")
    with pytest.raises(ValueError) as ref_error:
        reference_compute_trust_region_mask(theta, roll, mask, nonfinite="raise")
    assert str(new_error.value) == str(ref_error.value)
    assert torch.get_num_threads() == 2


def test_thread_count_is_restored_after_an_error(monkeypatch, two_threads):
    def failing(*args):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom in a block")

    monkeypatch.setattr(row_blocks, "_fill_row_block", failing)
    theta, roll, mask, _ = _inputs(64, 8192, torch.float32, 0)
    with pytest.raises(RuntimeError, match="boom in a block"):
        compute_trust_region_mask(theta, roll, mask)
    assert torch.get_num_threads() == 2


def test_all_threads_setting_keeps_the_callers_threads(monkeypatch, two_threads, block_threads):
    monkeypatch.setattr(row_blocks, "_CPU_BLOCK_THREADS", None)
    theta, roll, mask, _ = _inputs(64, 8192, torch.float32, 0)
    _assert_identical(
        compute_trust_region_mask(theta, roll, mask), reference_compute_trust_region_mask(theta, roll, mask), "None"
    )
    assert set(block_threads) == {2}
