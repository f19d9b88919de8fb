"""A frozen copy of the mask's CPU path as it was before the one-pass change (trl_trm at 6ac00ee: `row_blocks.py`,
`diagnostics._variance_sums`, `masks.compute_trust_region_mask`; docstrings and comments dropped), the reference that
`test_mask_one_pass.py` compares today's `compute_trust_region_mask` against. Do not edit: it is the old behaviour."""
# ruff: noqa

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from trl_trm.masks import TrustRegionMaskOutput
from trl_trm.modes import _check_inputs, validate_thresholds
from trl_trm.modes import (
    DEFAULT_DELTA_AVG,
    DEFAULT_DELTA_KL,
    DEFAULT_DELTA_MAX,
    DEFAULT_GEO_HIGH,
    DEFAULT_GEO_LOW,
    DEFAULT_RATIO_MAX,
    _weight_band,
)

_CPU_BLOCK_ELEMENTS = 1 << 17

_CPU_BLOCK_THREADS: int | None = 1


def _row_blocks(batch: int, length: int, device: torch.device) -> list[tuple[int, int]]:
    if batch == 0:
        return []
    rows = batch if device.type != "cpu" else max(2, _CPU_BLOCK_ELEMENTS // max(length, 1))
    starts = list(range(0, batch, rows))
    if len(starts) > 1 and batch - starts[-1] == 1:
        starts.pop()  # merge a trailing 1-row block into the previous one
    return list(zip(starts, starts[1:] + [batch], strict=True))


@dataclass
class _BlockStats:
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
    def empty(cls, batch: int, dtype: torch.dtype, device: torch.device, with_kl: bool) -> _BlockStats:
        def new(kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(batch, dtype=kind, device=device)  # zeros: the max of an empty row (T = 0) is 0

        kl_max, kl_sum = (new(), new()) if with_kl else (None, None)
        return cls(new(torch.long), new(torch.long), new(), new(), new(), new(), new(), kl_max, kl_sum)


def _fill_row_block(
    theta: torch.Tensor,
    roll: torch.Tensor,
    completion_mask: torch.Tensor,
    kl: torch.Tensor | None,
    start: int,
    stop: int,
    stats: _BlockStats,
    weights: torch.Tensor,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mode: str,
    band: tuple[float | None, float | None],
    check_finite: bool,
) -> None:
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


@contextlib.contextmanager
def one_block_thread(device: torch.device, batch: int) -> Iterator[None]:
    threads_before = torch.get_num_threads()
    one_thread = _CPU_BLOCK_THREADS is not None and device.type == "cpu" and batch >= 2
    if one_thread:
        torch.set_num_threads(_CPU_BLOCK_THREADS)
    try:
        yield
    finally:
        if one_thread:
            torch.set_num_threads(threads_before)


def fill_row_blocks(
    theta: torch.Tensor,
    roll: torch.Tensor,
    completion_mask: torch.Tensor,
    kl: torch.Tensor | None,
    stats: _BlockStats,
    weights: torch.Tensor,
    mode: str,
    band: tuple[float | None, float | None],
) -> None:
    """Fill ``stats`` (B,) and the pre-``keep`` ``weights`` (B, T) of every row, block by block, in the dtype of
    ``weights``: a fast pass that assumes every valid log-prob (and ``kl``) is finite, then the per-token finiteness
    check on the row blocks whose sums came out non-finite (rare)."""
    batch, length_t = completion_mask.shape
    device, dtype = weights.device, weights.dtype
    blocks = _row_blocks(batch, length_t, device)
    rows = max((stop - start for start, stop in blocks), default=0)
    scratch = (
        torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) log-ratios
        torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) k3, |log rho|, kl_tok
        torch.empty(rows, length_t, dtype=torch.bool, device=device),  # (rows, T) padding
    )

    def fill(start: int, stop: int, check_finite: bool) -> None:
        _fill_row_block(
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


def _variance_sums(
    theta: torch.Tensor,
    roll: torch.Tensor,
    completion_mask: torch.Tensor,
    kl: torch.Tensor | None,
    chi2_tok: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B,) float64 sums over the valid set of :func:`~trl_trm.masks.compute_trust_region_mask` (valid, finite log-probs and
    ``kl``): sum_t (rho_t - 1)^2, sum_t (rho_t - 1) and, if given, sum_t chi2_tok. In float64 (exp(2 log rho) only
    overflows beyond log rho = 354) and in row blocks of at most ``_CPU_BLOCK_ELEMENTS`` elements on CPU, so the
    temporaries stay within a block."""
    batch, length = completion_mask.shape
    device = theta.device
    chi2_sum = torch.zeros(batch, dtype=torch.float64, device=device)
    ratio_m1_sum = torch.zeros(batch, dtype=torch.float64, device=device)
    chi2_tok_sum = None if chi2_tok is None else torch.zeros(batch, dtype=torch.float64, device=device)
    for start, stop in _row_blocks(batch, length, device):
        lr = theta[start:stop].double() - roll[start:stop].double()  # (n, T)
        valid = (completion_mask[start:stop] != 0) & torch.isfinite(lr)  # (n, T)
        if kl is not None:
            valid &= torch.isfinite(kl[start:stop])
        rm1 = torch.where(valid, torch.expm1(lr.masked_fill_(~valid, 0.0)), 0.0)  # (n, T) rho_t - 1
        ratio_m1_sum[start:stop] = rm1.sum(dim=-1)
        chi2_sum[start:stop] = rm1.square_().sum(dim=-1)
        if chi2_tok is not None:
            chi2_tok_sum[start:stop] = torch.where(valid, chi2_tok[start:stop].double(), 0.0).sum(dim=-1)
    return chi2_sum, ratio_m1_sum, chi2_tok_sum


def compute_trust_region_mask(
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
    chi2_tok: torch.Tensor | None = None,
) -> TrustRegionMaskOutput:
    """Compute the per-sequence keep mask and per-token loss weights of one correction ``mode``.

    Args:
        per_token_logps: (B, T) log pi_theta(y_t | c_t) from the training engine. Detached internally.
        sampling_per_token_logps: (B, T) log pi_roll(y_t | c_t) reported by the rollout engine at sampling time.
        completion_mask: (B, T) 1 for valid completion tokens, 0 for padding (bool, int or float).
        mode: one of :data:`~trl_trm.modes.TRM_MODES`.
        delta_max: `trm` threshold on D_max = max_t |log rho_t|; None switches the criterion off.
        delta_avg: `trm` threshold on D_avg = mean_t k3(rho_t); None switches the criterion off.
        geo_low: `geo_mask` lower bound on the geometric-mean ratio; None switches that side off.
        geo_high: `geo_mask` upper bound on the geometric-mean ratio; None switches that side off.
        ratio_min: lower bound on rho (token modes) or on the product ratio (sequence modes); None is off.
        ratio_max: upper bound on rho (token modes) or on the product ratio (sequence modes); None is off.
        kl_tok: (B, T) per-token KL(pi_roll(.|c_t) || pi_theta(.|c_t)), e.g. from :func:`~trl_trm.diagnostics.topk_token_kl`. Required by
            `trm_exact`; in other modes it only adds the `kl_tok_*` statistics.
        delta_kl: `trm_exact` threshold on max_t kl_tok.
        nonfinite: "reject" (default) rejects sequences with a non-finite log-prob at a valid position;
            "raise" raises ``ValueError`` instead.
        chi2_tok: (B, T) per-token chi^2(pi_theta || pi_roll) from stored rollout log-probs, e.g. from
            :func:`~trl_trm.diagnostics.topk_token_chi2`; statistics only (`chi2_tok_sum`).

    Returns:
        :class:`TrustRegionMaskOutput`.
    """
    thresholds = dict(
        delta_max=delta_max,
        delta_avg=delta_avg,
        geo_low=geo_low,
        geo_high=geo_high,
        ratio_min=ratio_min,
        ratio_max=ratio_max,
        delta_kl=delta_kl,
    )
    _check_arguments(
        per_token_logps, sampling_per_token_logps, completion_mask, kl_tok, chi2_tok, mode, nonfinite, thresholds
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
        stats = _BlockStats.empty(batch, dtype, device, with_kl=kl is not None)
        weights = torch.empty(batch, length_t, dtype=dtype, device=device)  # (B, T), returned
        band = _weight_band(mode, ratio_min, ratio_max)
        with one_block_thread(device, batch):
            fill_row_blocks(theta, roll, completion_mask, kl, stats, weights, mode, band)
            chi2_sum, ratio_m1_sum, chi2_tok_sum = _variance_sums(theta, roll, completion_mask, kl, chi2_tok)

        return _mask_output(mode, stats, weights, (chi2_sum, ratio_m1_sum, chi2_tok_sum), nonfinite, thresholds)


def _mask_output(
    mode: str,
    stats: _BlockStats,
    weights: torch.Tensor,
    variance_sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    nonfinite: str,
    thresholds: dict[str, float | None],
) -> TrustRegionMaskOutput:
    """The per-sequence sums of the row blocks reduced to the means, criteria and ``keep`` of the mask (zeroing the
    rejected rows of ``weights`` in place), as a :class:`TrustRegionMaskOutput`."""
    finite = stats.num_finite == stats.length  # (B,) every valid position finite
    if nonfinite == "raise":
        _raise_on_nonfinite(finite)
    n_finite = stats.num_finite.clamp(min=1).to(weights.dtype)  # (B,) safe denominator
    log_geo = stats.seq_log_ratio / n_finite  # (B,)
    k3_mean = stats.k3_sum / n_finite  # (B,)
    rejected_by = _rejections(mode, finite, stats, k3_mean, log_geo, **thresholds)
    keep = _keep_and_zero_rejected(mode, rejected_by, finite, weights, stats.token_weight_sum)
    chi2_sum, ratio_m1_sum, chi2_tok_sum = variance_sums
    return TrustRegionMaskOutput(
        keep=keep,
        weights=weights,
        log_ratio_abs_max=stats.log_ratio_abs_max,
        k3_mean=k3_mean,
        k3_max=stats.k3_max,
        k1_mean=-log_geo,
        geo_ratio=torch.exp(log_geo),
        seq_log_ratio=stats.seq_log_ratio,
        length=stats.length,
        num_finite=stats.num_finite,
        finite=finite,
        rejected_by=rejected_by,
        token_weight_sum=stats.token_weight_sum,
        kl_tok_max=stats.kl_tok_max,
        kl_tok_sum=stats.kl_tok_sum,
        chi2_sum=chi2_sum,
        ratio_m1_sum=ratio_m1_sum,
        chi2_tok_sum=chi2_tok_sum,
    )


def _check_arguments(
    per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    kl_tok: torch.Tensor | None,
    chi2_tok: torch.Tensor | None,
    mode: str,
    nonfinite: str,
    thresholds: dict[str, float | None],
) -> None:
    """Raise on invalid arguments of :func:`compute_trust_region_mask`, naming the argument and the fix."""
    validate_thresholds(mode, **thresholds)
    if mode == "trm_exact" and kl_tok is None:
        raise ValueError(
            "`mode='trm_exact'` needs `kl_tok`, the (B, T) per-token KL(pi_roll || pi_theta) computed from the "
            "rollout's stored top-k (or full) log-probs, e.g. with `topk_token_kl`."
        )
    if nonfinite not in ("reject", "raise"):
        raise ValueError(f"`nonfinite` must be 'reject' or 'raise', got {nonfinite!r}.")
    _check_inputs(per_token_logps, sampling_per_token_logps, completion_mask)
    if chi2_tok is not None and tuple(chi2_tok.shape) != tuple(completion_mask.shape):
        raise ValueError(
            f"Mismatched shapes: `chi2_tok` is {tuple(chi2_tok.shape)} but `completion_mask` is "
            f"{tuple(completion_mask.shape)}; pass one value per completion token."
        )
    if kl_tok is not None and tuple(kl_tok.shape) != tuple(completion_mask.shape):
        raise ValueError(
            f"Mismatched shapes: `kl_tok` is {tuple(kl_tok.shape)} but `completion_mask` is "
            f"{tuple(completion_mask.shape)}; pass one KL value per completion token."
        )


def _raise_on_nonfinite(finite: torch.Tensor) -> None:
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"Non-finite log-probs at valid completion positions in sequences {bad[:10]}: the rollout engine or "
            "the training forward returned NaN/inf. Use `nonfinite='reject'` (the trainer's "
            "`trm_nonfinite='reject'`) to reject such sequences instead."
        )


def _rejections(
    mode: str,
    finite: torch.Tensor,
    stats: _BlockStats,
    k3_mean: torch.Tensor,
    log_geo: torch.Tensor,
    *,
    delta_max: float | None,
    delta_avg: float | None,
    geo_low: float | None,
    geo_high: float | None,
    ratio_min: float | None,
    ratio_max: float | None,
    delta_kl: float | None,
) -> dict[str, torch.Tensor]:
    """criterion name -> (B,) bool, True where that criterion alone rejects the sequence (the module docstring's
    table; criteria switched off are absent). Empty in `none`: diagnostics only, nothing is rejected, not even
    non-finite sequences."""
    if mode == "none":
        return {}
    rejected_by: dict[str, torch.Tensor] = {"nonfinite": ~finite}
    if mode == "trm":
        if delta_max is not None:
            rejected_by["delta_max"] = stats.log_ratio_abs_max > delta_max
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
        rejected_by["ratio_max"] = stats.seq_log_ratio > math.log(ratio_max)
        if ratio_min is not None:
            rejected_by["ratio_min"] = stats.seq_log_ratio < math.log(ratio_min)
    return rejected_by


def _keep_and_zero_rejected(
    mode: str,
    rejected_by: dict[str, torch.Tensor],
    finite: torch.Tensor,
    weights: torch.Tensor,
    token_weight_sum: torch.Tensor,
) -> torch.Tensor:
    """(B,) bool keep = no criterion rejects (all True in `none`). The row blocks wrote every row's weights before
    `keep` was known: the rejected rows' (B, T) ``weights`` and (B,) ``token_weight_sum`` are zeroed here, in place."""
    if mode == "none":
        return torch.ones_like(finite)
    keep = ~torch.stack(list(rejected_by.values())).any(dim=0)  # (B,)
    rejected = (~keep).nonzero().flatten()
    if rejected.numel() > 0:
        weights.index_fill_(0, rejected, 0.0)
        token_weight_sum.index_fill_(0, rejected, 0.0)
    return keep
