"""Sequence-level trust-region masks: :func:`compute_trust_region_mask` and its :class:`TrustRegionMaskOutput` (pure
torch, no TRL import). The loss weights built on a mask are in :mod:`trl_trm.estimator`.

Everything here follows ``shared/trm-spec.md``. Per completion ``i`` and valid token ``t``
(``completion_mask[i, t] == 1``)::

    log_ratio[i, t] = logp_theta[i, t] - logp_roll[i, t]          # log rho_t
    k3(rho)         = rho - 1 - log rho                              # >= 0, unbiased KL(pi_roll || pi_theta)
    D_max[i]        = max_t |log rho_t|                              # length-invariant, symmetric
    D_avg[i]        = (1 / T_i) sum_t k3(rho_t)                      # length-invariant
    geo[i]          = exp((1 / T_i) sum_t log rho_t)                 # geometric-mean ratio
    seq_log_ratio[i] = sum_t log rho_t                               # product ratio, in log space

Every comparison is made in log space and in float32 (or float64 when the inputs are float64), so bf16
inputs and ratios far outside the float range are safe. Padding positions never influence a result: they
are selected away with ``torch.where`` (not multiplied), so even NaN or +-1e4 in padding changes nothing.

A sequence with a non-finite log-prob (NaN, +-inf) at a valid position cannot be certified: by default it is
rejected (``keep=False``, weight 0) and flagged in ``finite``; with ``nonfinite="raise"`` it is an error.
Its statistics are computed over its finite tokens only.

Modes (exactly one correction is ever applied):

| mode        | keep / weight                                                              |
|-------------|----------------------------------------------------------------------------|
| `trm`       | keep = [D_max <= delta_max] AND [D_avg <= delta_avg] (a `None` criterion is off) |
| `trm_exact` | keep = [max_t kl_tok <= delta_kl] (AND [D_avg <= delta_avg] if set); needs `kl_tok`  |
| `geo_mask`  | keep = [geo_low <= geo <= geo_high]                                        |
| `seq_mis`   | keep = [seq_log_ratio <= log ratio_max] (AND >= log ratio_min if set)      |
| `seq_tis`   | weight = exp(clamp(seq_log_ratio, log ratio_min, log ratio_max))           |
| `token_tis` | weight_t = clamp(rho_t, ratio_min, ratio_max)                              |
| `token_mis` | weight_t = [ratio_min <= rho_t <= ratio_max]                               |
| `none`      | weight = completion mask; statistics only                                  |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .diagnostics import _variance_sums_rows
from .modes import (
    DEFAULT_DELTA_AVG,
    DEFAULT_DELTA_KL,
    DEFAULT_DELTA_MAX,
    DEFAULT_GEO_HIGH,
    DEFAULT_GEO_LOW,
    DEFAULT_RATIO_MAX,
    _check_inputs,
    _weight_band,
    validate_thresholds,
)
from .row_blocks import _BlockStats, fill_row_blocks, one_block_thread


@dataclass
class TrustRegionMaskOutput:
    """Result of :func:`compute_trust_region_mask`. All per-sequence tensors are float32 (or float64) unless noted.

    Attributes:
        keep: (B,) bool. The sequence is kept (not rejected). For weighting modes (`*_tis`, `token_mis`, `none`)
            only non-finite sequences are rejected at the sequence level.
        weights: (B, T) float. Multiplier for the per-token loss: 0/1 for sequence mask modes, truncated ratios for
            TIS modes, token 0/1 for `token_mis`; always exactly 0 on padding and on rejected sequences.
        log_ratio_abs_max: (B,) D_max = max_t |log rho_t| (0 for empty rows).
        k3_mean: (B,) D_avg = mean_t k3(rho_t) (0 for empty rows).
        k3_max: (B,) max_t k3(rho_t): a one-sample estimate of the sequence's largest per-context KL.
        k1_mean: (B,) mean_t -log rho_t, the k1 estimate of KL(pi_roll || pi_theta) per token.
        geo_ratio: (B,) exp(mean_t log rho_t) (1 for empty rows).
        seq_log_ratio: (B,) sum_t log rho_t.
        length: (B,) long. Number of valid tokens T_i.
        num_finite: (B,) long. Number of valid tokens with finite log-probs (the denominator of the means above).
        finite: (B,) bool. All valid positions have finite log-probs in both inputs.
        rejected_by: criterion name -> (B,) bool, True where that criterion alone rejects the sequence (criteria that
            are switched off are absent). Contains "nonfinite" in every mode but `none`, which rejects nothing. A
            sequence can fail several criteria.
        token_weight_sum: (B,) sum_t weights[i, t], for token-level weight statistics without gathering (B, T).
        kl_tok_max: (B,) max_t kl_tok (only when `kl_tok` is given, else None).
        kl_tok_sum: (B,) sum_t kl_tok (only when `kl_tok` is given, else None).
        chi2_sum: (B,) sum_t (rho_t - 1)^2 over finite valid tokens (float64): the per-token chi^2 estimate's numerator.
        ratio_m1_sum: (B,) sum_t (rho_t - 1) over finite valid tokens (float64): the sequence's term of the
            surrogate L (talk §2.2.4), up to its advantage.
        chi2_tok_sum: (B,) sum_t chi2_tok over finite valid tokens (only when `chi2_tok` is given, else None).
    """

    keep: torch.Tensor
    weights: torch.Tensor
    log_ratio_abs_max: torch.Tensor
    k3_mean: torch.Tensor
    k3_max: torch.Tensor
    k1_mean: torch.Tensor
    geo_ratio: torch.Tensor
    seq_log_ratio: torch.Tensor
    length: torch.Tensor
    num_finite: torch.Tensor
    finite: torch.Tensor
    rejected_by: dict[str, torch.Tensor] = field(default_factory=dict)
    token_weight_sum: torch.Tensor | None = None
    kl_tok_max: torch.Tensor | None = None
    kl_tok_sum: torch.Tensor | None = None
    chi2_sum: torch.Tensor | None = None
    ratio_m1_sum: torch.Tensor | None = None
    chi2_tok_sum: torch.Tensor | None = None

    def sequence_stats(self) -> dict[str, torch.Tensor]:
        """Every per-sequence (B,) quantity as float tensors, keyed by name: what the trainer gathers across
        processes before calling :func:`~trl_trm.diagnostics.summarize_mask_stats` (O(B) communication, never (B, T))."""
        stats = {
            "keep": self.keep.float(),
            "log_ratio_abs_max": self.log_ratio_abs_max,
            "k3_mean": self.k3_mean,
            "k3_max": self.k3_max,
            "k1_mean": self.k1_mean,
            "geo_ratio": self.geo_ratio,
            "seq_log_ratio": self.seq_log_ratio,
            "length": self.length.float(),
            "num_finite": self.num_finite.float(),
            "finite": self.finite.float(),
            "token_weight_sum": self.token_weight_sum,
        }
        if self.kl_tok_max is not None:
            stats["kl_tok_max"] = self.kl_tok_max
            stats["kl_tok_sum"] = self.kl_tok_sum
        for name in ("chi2_sum", "ratio_m1_sum", "chi2_tok_sum"):
            if getattr(self, name) is not None:
                stats[name] = getattr(self, name)
        for name, rejected in self.rejected_by.items():
            stats[f"rejected_by/{name}"] = rejected.float()
        return stats


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
        chi2_in = None if chi2_tok is None else chi2_tok.detach()  # (B, T)
        stats = _BlockStats.empty(batch, dtype, device, with_kl=kl is not None, with_chi2_tok=chi2_in is not None)
        weights = torch.empty(batch, length_t, dtype=dtype, device=device)  # (B, T), returned
        band = _weight_band(mode, ratio_min, ratio_max)
        with one_block_thread(device, batch):
            fill_row_blocks(theta, roll, completion_mask, kl, stats, weights, mode, band, chi2_in)
            if dtype != torch.float64:  # rho_t - 1 overflows float32 beyond log rho = 88.7 (float64: 709)
                _variance_sums_rows(theta, roll, completion_mask, kl, stats)

        return _mask_output(mode, stats, weights, nonfinite, thresholds)


def _mask_output(
    mode: str,
    stats: _BlockStats,
    weights: torch.Tensor,
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
        chi2_sum=stats.chi2_sum,
        ratio_m1_sum=stats.ratio_m1_sum,
        chi2_tok_sum=stats.chi2_tok_sum,
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
    """`nonfinite="raise"`: a ``ValueError`` naming the first sequences (``finite``: (B,) bool) with a non-finite
    log-prob at a valid position."""
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
