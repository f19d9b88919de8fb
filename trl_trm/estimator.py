"""The loss weights of the seeds' estimator inside a PPO-style loss (:func:`estimator_weights`), the Seq-TIS automatic
clip (:func:`seq_tis_auto_log_clip`), and the batch entry point :func:`mask_and_weights`, which returns one batch's
mask and loss weights together (pure torch, no TRL import).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .masks import TrustRegionMaskOutput, compute_trust_region_mask
from .modes import (
    DEFAULT_DELTA_AVG,
    DEFAULT_DELTA_KL,
    DEFAULT_DELTA_MAX,
    DEFAULT_GEO_HIGH,
    DEFAULT_GEO_LOW,
    DEFAULT_RATIO_MAX,
    SEQUENCE_MASK_MODES,
    TRM_MODES,
    _check_inputs,
    _weight_band,
)


def estimator_weights(
    result: TrustRegionMaskOutput,
    old_per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    mode: str,
    ratio_min: float | None = None,
    ratio_max: float | None = DEFAULT_RATIO_MAX,
    ratio_factor: bool = True,
    old_seq_log_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) per-token weights of the seeds' estimator inside a PPO-style loss whose ratio is r_t = pi_theta/pi_old.

    The talk's gradient (§4.5.1) is (1/N) sum_i M_i A_i sum_t rho_t grad log pi_theta(y_t), with rho_t =
    pi_theta/pi_roll = r_t * (pi_old/pi_roll). The loss already supplies r_t (its gradient is r_t grad log pi_theta),
    so the weight multiplying each token's loss term carries the remaining, detached factor pi_old/pi_roll:

    | mode                                              | weight_t                                                  |
    |---------------------------------------------------|-----------------------------------------------------------|
    | `trm`, `trm_exact`, `geo_mask`, `seq_mis`         | keep_i * exp(log pi_old - log pi_roll) (``ratio_factor``) |
    | `token_mis`                                       | [token kept] * exp(log pi_old - log pi_roll)              |
    | `token_tis`                                       | clamp(pi_old/pi_roll, ratio_min, ratio_max)               |
    | `seq_tis`                                         | exp(clamp(sum_t log(pi_old/pi_roll), log min, log max))   |
    | `none`                                            | the completion mask (no correction)                       |

    ``ratio_factor=False``: the mask modes give the plain 0/1 mask. Weights are exactly 0 on padding and on rejected
    sequences; a non-finite pi_old where a weight is due rejects its row (weight 0), never a NaN.

    Args:
        result: the mask of the same batch (:func:`~trl_trm.masks.compute_trust_region_mask`).
        old_per_token_logps: (B, T) log pi_old: TRL's ``old_per_token_logps``, or the loss forward's own log-probs
            (detached) when TRL computes none. Detached here.
        sampling_per_token_logps: (B, T) log pi_roll.
        completion_mask: (B, T) 1 on valid tokens.
        mode: as in :func:`~trl_trm.masks.compute_trust_region_mask`.
        ratio_min: the lower end of the TIS truncation band (as in the mask).
        ratio_max: the TIS truncation C (as in the mask).
        ratio_factor: multiply the mask modes' 0/1 mask by pi_old/pi_roll (the default, the seeds' estimator).
        old_seq_log_ratio: (B,) :func:`old_seq_log_ratio` when the caller has it (the automatic clip): `seq_tis`
            reads it instead of reducing the (B, T) log-ratios again; other modes ignore it.

    Returns:
        (B, T) weights, float32 (float64 when an input is float64).
    """
    if mode not in TRM_MODES:
        raise ValueError(f"Unknown `mode` {mode!r}. Choose one of {list(TRM_MODES)}.")
    _check_inputs(old_per_token_logps, sampling_per_token_logps, completion_mask)
    if tuple(result.weights.shape) != tuple(completion_mask.shape):
        raise ValueError(
            f"Mismatched shapes: the mask's weights are {tuple(result.weights.shape)} but `completion_mask` is "
            f"{tuple(completion_mask.shape)}: pass the mask of the same batch."
        )
    dtype = result.weights.dtype
    if mode == "none":
        return result.weights
    if mode in SEQUENCE_MASK_MODES + ("token_mis",) and not ratio_factor:
        return result.weights
    with torch.no_grad():
        log_w = old_per_token_logps.detach().to(dtype) - sampling_per_token_logps.detach().to(dtype)  # (B, T)
        valid = completion_mask != 0  # (B, T)
        if mode == "seq_tis":
            lo, hi = _weight_band(mode, ratio_min, ratio_max)
            if old_seq_log_ratio is None:
                seq = torch.where(valid, log_w, 0.0).sum(dim=-1)  # (B,) sum_t log(pi_old / pi_roll)
            else:
                seq = old_seq_log_ratio.detach().to(dtype)  # (B,) the caller's float64 sum
            weights = torch.exp(seq.clamp(min=lo, max=hi)).unsqueeze(-1).expand_as(log_w)  # (B, T)
            weights = torch.where(valid, weights, 0.0)
        elif mode == "token_tis":
            lo, hi = _weight_band(mode, ratio_min, ratio_max)
            weights = torch.where(valid, torch.exp(log_w.clamp(min=lo, max=hi)), 0.0)  # (B, T)
        else:  # mask modes and token_mis: the 0/1 mask times pi_old / pi_roll where the mask is 1
            kept = result.weights != 0  # (B, T)
            weights = torch.where(kept, torch.exp(torch.where(kept, log_w, 0.0)), 0.0)  # (B, T)
        weights = torch.where(result.keep.unsqueeze(-1), weights, 0.0)
        # A NaN / inf factor where a weight is due (pi_old non-finite while the mask's pi_theta was finite, or an
        # overflowing exp): the row cannot be weighted, so it is rejected whole.
        bad_rows = ~torch.isfinite(weights).all(dim=-1)  # (B,)
        return torch.where(bad_rows.unsqueeze(-1), 0.0, weights)


def mask_and_weights(
    per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    mode: str,
    delta_max: float | None = DEFAULT_DELTA_MAX,
    delta_avg: float | None = DEFAULT_DELTA_AVG,
    geo_low: float | None = DEFAULT_GEO_LOW,
    geo_high: float | None = DEFAULT_GEO_HIGH,
    ratio_min: float | None = None,
    ratio_max: float | None = DEFAULT_RATIO_MAX,
    ratio_factor: bool = True,
    kl_tok: torch.Tensor | None = None,
    chi2_tok: torch.Tensor | None = None,
    delta_kl: float | None = DEFAULT_DELTA_KL,
    nonfinite: Literal["reject", "raise"] = "reject",
    old_seq_log_ratio: torch.Tensor | None = None,
) -> tuple[TrustRegionMaskOutput, torch.Tensor]:
    """The mask of one batch and the (B, T) loss weights of the seeds' estimator, in one call: the batch entry point
    of the math layer (what the trainer's mask evaluation needs).

    Equals :func:`~trl_trm.masks.compute_trust_region_mask` on (``per_token_logps``, ``sampling_per_token_logps``,
    ``completion_mask``) followed by :func:`estimator_weights` on (that result, ``old_per_token_logps``,
    ``sampling_per_token_logps``, ``completion_mask``), bit for bit; ``result.token_weight_sum`` is then replaced by
    the per-row sum of the returned weights (what the loss multiplies, so the `trm/token_weight` metric reports it).

    Args:
        per_token_logps: (B, T) log pi of the policy the mask checks (pi_theta, or pi_old for a mask against the
            generation policy).
        sampling_per_token_logps: (B, T) log pi_roll.
        old_per_token_logps: (B, T) log pi_old, the denominator of the loss's ratio r_t.
        completion_mask: (B, T) completion mask (times the tool mask when there is one).
        ratio_max: a float or None (a caller with an automatic clip resolves it first, e.g. with
            :func:`seq_tis_auto_log_clip`).
        ratio_factor: as in :func:`estimator_weights`.
        old_seq_log_ratio: as in :func:`estimator_weights`.

    The other settings (``mode``, the thresholds, ``kl_tok``, ``chi2_tok``, ``nonfinite``) are those of
    :func:`~trl_trm.masks.compute_trust_region_mask`.

    Returns:
        ``(result, weights)``: the :class:`~trl_trm.masks.TrustRegionMaskOutput` and the (B, T) weights.
    """
    result = compute_trust_region_mask(
        per_token_logps,
        sampling_per_token_logps,
        completion_mask,
        mode=mode,
        delta_max=delta_max,
        delta_avg=delta_avg,
        geo_low=geo_low,
        geo_high=geo_high,
        ratio_min=ratio_min,
        ratio_max=ratio_max,
        kl_tok=kl_tok,
        delta_kl=delta_kl,
        nonfinite=nonfinite,
        chi2_tok=chi2_tok,
    )
    weights = estimator_weights(
        result,
        old_per_token_logps,
        sampling_per_token_logps,
        completion_mask,
        mode=mode,
        ratio_min=ratio_min,
        ratio_max=ratio_max,
        ratio_factor=ratio_factor,
        old_seq_log_ratio=old_seq_log_ratio,
    )  # (B, T)
    result.token_weight_sum = weights.sum(dim=-1).to(result.token_weight_sum.dtype)  # (B,) what the loss multiplies
    return result, weights


def seq_tis_auto_log_clip(seq_log_ratio: torch.Tensor) -> float:
    """log C* of the Seq-TIS clip that minimises the bias/variance bound of ``003_*``: C* = sqrt(2 (1 + chi2_seq))
    with chi2_seq = max(mean_i exp(2 s_i) - 1, 0), so log C* = (log 2 + max(logsumexp(2 s) - log N, 0)) / 2, computed
    in log space (never exponentiating s). ``seq_log_ratio``: (N,) finite s_i of the batch (non-finite entries are
    ignored). chi^2 is a divergence, >= 0; its sample estimate falls below 0 when most product ratios are below 1
    (e.g. the engine put its mass where the trainer does not), and is floored there, so C* >= sqrt(2) > 1 and the
    clip band always contains 1. An empty batch gives log sqrt(2)."""
    s = seq_log_ratio.detach().double()
    s = s[torch.isfinite(s)]
    if s.numel() == 0:
        return 0.5 * math.log(2.0)
    log_second_moment = float(torch.logsumexp(2.0 * s, dim=0)) - math.log(s.numel())  # log(1 + chi2_seq estimate)
    return 0.5 * (math.log(2.0) + max(log_second_moment, 0.0))


def old_seq_log_ratio(old_per_token_logps, sampling_per_token_logps, completion_mask) -> torch.Tensor:
    """(B,) float64 s_i = sum_t log(pi_old/pi_roll) over the valid tokens: the log product ratio that Seq-TIS truncates.
    One pass over (B, T); the automatic clip and the Seq-TIS weights share it (:func:`estimator_weights`'s
    ``old_seq_log_ratio``)."""
    valid = completion_mask != 0  # (B, T)
    log_w = old_per_token_logps.detach().double() - sampling_per_token_logps.detach().double()  # (B, T)
    return torch.where(valid, log_w, 0.0).sum(dim=-1)  # (B,)


def seq_tis_auto_clip(
    old_per_token_logps, sampling_per_token_logps, completion_mask, gather=None, seq: torch.Tensor | None = None
) -> float:
    """`trm_ratio_max="auto"`: C* = sqrt(2 (1 + chi2_seq)) of a batch, from s_i = sum_t log pi_old/pi_roll (the product
    ratio that Seq-TIS truncates; :func:`seq_tis_auto_log_clip`). ``gather``: a function that concatenates the (B,)
    sums of every process (e.g. `Accelerator.gather`), so every process gets the same clip; None for one process.
    ``seq``: the (B,) sums when the caller already has them (:func:`old_seq_log_ratio`)."""
    if seq is None:
        seq = old_seq_log_ratio(old_per_token_logps, sampling_per_token_logps, completion_mask)  # (B,)
    return math.exp(seq_tis_auto_log_clip(seq if gather is None else gather(seq)))
