"""Sequence-level trust-region masks and importance weights (pure torch, no TRL import).

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

from .bounds import error_bounds

TRM_MODES = ("trm", "trm_exact", "geo_mask", "seq_mis", "seq_tis", "token_tis", "token_mis", "none")
"""Correction modes implemented by :func:`compute_trust_region_mask`."""

SEQUENCE_MASK_MODES = ("trm", "trm_exact", "geo_mask", "seq_mis")
"""Modes whose weights are a 0/1 mask over whole sequences."""

# Documented, tunable defaults (see README "Configuration" for the sources).
DEFAULT_DELTA_MAX = math.log(2.0)  # every token ratio within [1/2, 2]: the symmetric band of token IS/MIS presets
DEFAULT_DELTA_AVG = 0.01  # mean k3 per token; the value used by public k3 rejection presets
DEFAULT_GEO_LOW = 0.99  # Geo-Mask band 1 +- 0.01 (the loose end of the 1 +- 0.001...0.01 range in the Geo-Mask notes)
DEFAULT_GEO_HIGH = 1.01
DEFAULT_DELTA_KL = 1e-4  # per-token KL(pi_roll || pi_theta); the talk's numerical example (δ = 1e-4)
DEFAULT_RATIO_MAX = 2.0  # C = 2, the truncation used for TIS in the rollout/training-mismatch literature


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

    def sequence_stats(self) -> dict[str, torch.Tensor]:
        """Every per-sequence (B,) quantity as float tensors, keyed by name: what the trainer gathers across
        processes before calling :func:`summarize_mask_stats` (O(B) communication, never (B, T))."""
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
        for name, rejected in self.rejected_by.items():
            stats[f"rejected_by/{name}"] = rejected.float()
        return stats


def _check_positive(name: str, value: float | None, prefix: str) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{prefix}{name}` must be a positive finite number or None (criterion off), got {value!r}.")


def validate_thresholds(
    mode: str,
    *,
    delta_max: float | None,
    delta_avg: float | None,
    geo_low: float | None,
    geo_high: float | None,
    ratio_min: float | None,
    ratio_max: float | None,
    delta_kl: float | None = DEFAULT_DELTA_KL,
    name_prefix: str = "",
) -> None:
    """Raise ``ValueError`` naming the offending argument (with ``name_prefix``, e.g. ``"trm_"`` for config fields)
    when the thresholds are invalid for ``mode``."""
    p = name_prefix
    if mode not in TRM_MODES:
        raise ValueError(f"Unknown `{p}mode` {mode!r}. Choose one of {list(TRM_MODES)}.")
    for name, value in [
        ("delta_max", delta_max),
        ("delta_avg", delta_avg),
        ("geo_low", geo_low),
        ("geo_high", geo_high),
        ("ratio_min", ratio_min),
        ("ratio_max", ratio_max),
        ("delta_kl", delta_kl),
    ]:
        _check_positive(name, value, p)
    if mode == "trm_exact" and delta_kl is None:
        raise ValueError(f"`{p}mode='trm_exact'` needs `{p}delta_kl` (the bound on max_t KL); it is None.")
    if mode == "trm" and delta_max is None and delta_avg is None:
        raise ValueError(
            f"`{p}mode='trm'` with both `{p}delta_max` and `{p}delta_avg` set to None rejects nothing. "
            f"Set at least one of them, or use `{p}mode='none'` for diagnostics only."
        )
    if mode == "geo_mask":
        if geo_low is None and geo_high is None:
            raise ValueError(f"`{p}mode='geo_mask'` needs `{p}geo_low` and/or `{p}geo_high`; both are None.")
        if (geo_low is not None and geo_low > 1.0) or (geo_high is not None and geo_high < 1.0):
            raise ValueError(
                f"The Geo-Mask band must contain 1 (an on-policy sequence must be kept): got `{p}geo_low`={geo_low}, "
                f"`{p}geo_high`={geo_high}. Use e.g. `{p}geo_low=0.99, {p}geo_high=1.01`."
            )
    if mode in ("seq_mis", "seq_tis", "token_tis", "token_mis"):
        if ratio_max is None and mode != "token_mis":
            raise ValueError(f"`{p}mode={mode!r}` needs `{p}ratio_max` (the truncation/rejection level C).")
        if mode == "token_mis" and ratio_max is None and ratio_min is None:
            raise ValueError(f"`{p}mode='token_mis'` needs `{p}ratio_min` and/or `{p}ratio_max`; both are None.")
        if (ratio_min is not None and ratio_min > 1.0) or (ratio_max is not None and ratio_max < 1.0):
            raise ValueError(
                f"The ratio band must contain 1 (an on-policy sequence must be kept at weight 1): got "
                f"`{p}ratio_min`={ratio_min}, `{p}ratio_max`={ratio_max}. Use e.g. `{p}ratio_max=2.0`."
            )


def _check_inputs(per_token_logps, sampling_per_token_logps, completion_mask) -> None:
    names = ("per_token_logps", "sampling_per_token_logps", "completion_mask")
    tensors = (per_token_logps, sampling_per_token_logps, completion_mask)
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 2:
            raise ValueError(f"`{name}` must have shape (B, T), got {tuple(t.shape)}.")
    shapes = {name: tuple(t.shape) for name, t in zip(names, tensors, strict=True)}
    if len(set(shapes.values())) != 1:
        raise ValueError(
            f"Mismatched shapes {shapes}: the rollout log-probs must have one entry per completion token, "
            "aligned with `completion_mask` (pad both on the right to the same length)."
        )
    for name, t in zip(names[:2], tensors[:2], strict=True):
        if not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor of log-probabilities, got {t.dtype}.")


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
    with torch.no_grad():
        log_ratio = per_token_logps.detach().to(dtype) - sampling_per_token_logps.detach().to(dtype)  # (B, T)
        mask = completion_mask.bool()  # (B, T)
        token_finite = torch.isfinite(log_ratio)  # (B, T)
        if kl_tok is not None:
            kl = kl_tok.detach().to(dtype)  # (B, T)
            token_finite = token_finite & torch.isfinite(kl)
        finite = (token_finite | ~mask).all(dim=-1)  # (B,)
        if nonfinite == "raise" and not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"Non-finite log-probs at valid completion positions in sequences {bad[:10]}: the rollout engine or "
                "the training forward returned NaN/inf. Use `nonfinite='reject'` to reject such sequences instead."
            )
        valid = mask & token_finite  # (B, T)
        lr = torch.where(valid, log_ratio, 0.0)  # (B, T), exact zeros off the valid set
        length = mask.sum(dim=-1)  # (B,)
        num_finite = valid.sum(dim=-1)  # (B,)
        n_finite = num_finite.clamp(min=1).to(dtype)  # (B,) safe denominator

        seq_log_ratio = lr.sum(dim=-1)  # (B,)
        log_geo = seq_log_ratio / n_finite  # (B,)
        log_ratio_abs_max = lr.abs().amax(dim=-1) if lr.size(-1) > 0 else lr.new_zeros(lr.size(0))  # (B,)
        k3 = torch.expm1(lr) - lr  # (B, T), exactly 0 where lr == 0 (padding)
        k3_mean = k3.sum(dim=-1) / n_finite  # (B,)
        k3_max = k3.amax(dim=-1) if k3.size(-1) > 0 else k3.new_zeros(k3.size(0))  # (B,), k3 >= 0 and 0 off-mask
        k1_mean = -log_geo  # (B,)

        kl_tok_max = kl_tok_sum = None
        if kl_tok is not None:
            kl_valid = torch.where(valid, kl, 0.0)  # (B, T)
            kl_tok_max = kl_valid.amax(dim=-1) if kl.size(-1) > 0 else kl.new_zeros(kl.size(0))  # (B,)
            kl_tok_sum = kl_valid.sum(dim=-1)  # (B,)

        rejected_by: dict[str, torch.Tensor] = {"nonfinite": ~finite}
        weights = None
        if mode == "trm":
            if delta_max is not None:
                rejected_by["delta_max"] = log_ratio_abs_max > delta_max
            if delta_avg is not None:
                rejected_by["delta_avg"] = k3_mean > delta_avg
        elif mode == "trm_exact":
            rejected_by["delta_kl"] = kl_tok_max > delta_kl
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
        elif mode == "seq_tis":
            lo = -math.inf if ratio_min is None else math.log(ratio_min)
            seq_w = torch.exp(seq_log_ratio.clamp(min=lo, max=math.log(ratio_max)))  # (B,)
            weights = seq_w.unsqueeze(-1).expand_as(lr)
        elif mode == "token_tis":
            lo = -math.inf if ratio_min is None else math.log(ratio_min)
            weights = torch.exp(lr.clamp(min=lo, max=math.log(ratio_max)))  # (B, T)
        elif mode == "token_mis":
            inside = valid
            if ratio_max is not None:
                inside = inside & (lr <= math.log(ratio_max))
            if ratio_min is not None:
                inside = inside & (lr >= math.log(ratio_min))
            weights = inside.to(dtype)  # (B, T)

        if mode == "none":  # diagnostics only: nothing is rejected, not even non-finite sequences
            rejected_by = {}
            keep = torch.ones_like(finite)
        else:
            keep = ~torch.stack(list(rejected_by.values())).any(dim=0)  # (B,)
        token_keep = mask & keep.unsqueeze(-1)  # (B, T)
        if weights is None:
            weights = token_keep.to(dtype)
        else:
            weights = torch.where(token_keep, weights, 0.0)

    return TrustRegionMaskOutput(
        keep=keep,
        weights=weights,
        log_ratio_abs_max=log_ratio_abs_max,
        k3_mean=k3_mean,
        k3_max=k3_max,
        k1_mean=k1_mean,
        geo_ratio=torch.exp(log_geo),
        seq_log_ratio=seq_log_ratio,
        length=length,
        num_finite=num_finite,
        finite=finite,
        rejected_by=rejected_by,
        token_weight_sum=weights.sum(dim=-1),
        kl_tok_max=kl_tok_max,
        kl_tok_sum=kl_tok_sum,
    )


def topk_token_kl(
    rollout_topk_logprobs: torch.Tensor,
    theta_topk_logprobs: torch.Tensor,
    topk_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL(pi_roll(.|c_t) || pi_theta(.|c_t)) from the rollout's top-k log-probs plus one "rest" bucket.

    The k stored ids (distinct within a position; the rollout's top-k, possibly plus the sampled token) are kept as
    outcomes and the remaining vocabulary is merged into one bucket holding the remaining mass of each distribution.
    By the data-processing inequality this is a **lower bound** of the exact KL, and it is exact when the ids cover
    the vocabulary (or the rest mass of pi_roll is 0). Memory is O(B·T·k): no (B, T, V) tensor is needed.

    Args:
        rollout_topk_logprobs: (B, T, k) log pi_roll at the stored ids.
        theta_topk_logprobs: (B, T, k) log pi_theta at the same ids (from the training forward).
        topk_mask: (B, T, k) bool, False for unused slots (a rollout that returned fewer than k entries).

    Returns:
        (B, T) float32 (float64 for float64 inputs), >= 0. Where pi_theta's rest mass is below rounding level but
        pi_roll's is not, the rest term uses that rounding level (a large, finite value) instead of +inf.
    """
    if rollout_topk_logprobs.shape != theta_topk_logprobs.shape or rollout_topk_logprobs.dim() != 3:
        raise ValueError(
            f"Mismatched shapes: rollout top-k log-probs {tuple(rollout_topk_logprobs.shape)} and pi_theta log-probs "
            f"{tuple(theta_topk_logprobs.shape)} must both be (B, T, k) over the same ids."
        )
    dtype = (
        torch.float64 if torch.float64 in (rollout_topk_logprobs.dtype, theta_topk_logprobs.dtype) else torch.float32
    )
    with torch.no_grad():
        log_p = rollout_topk_logprobs.detach().to(dtype)  # (B, T, k)
        log_q = theta_topk_logprobs.detach().to(dtype)  # (B, T, k)
        if topk_mask is not None:
            log_p = torch.where(topk_mask, log_p, -math.inf)
            log_q = torch.where(topk_mask, log_q, -math.inf)
        p, q = log_p.exp(), log_q.exp()  # (B, T, k)
        # sum_v p (log p - log q) over stored ids; xlogy-style: a slot with p = 0 contributes 0
        head = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)  # (B, T)
        # Rest masses within the rounding error of a k-term sum are zero (with k = V, 1 - sum p is +-1e-16, and a
        # positive p_rest against a clamped q_rest = 0 would read as an infinite KL).
        eps = torch.finfo(dtype).eps * max(log_p.size(-1), 1)
        p_rest = 1.0 - p.sum(dim=-1)  # (B, T)
        p_rest = torch.where(p_rest > eps, p_rest, 0.0)
        q_rest = (1.0 - q.sum(dim=-1)).clamp(min=eps)  # (B, T)
        rest = torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest)  # (B, T), 0 when p_rest = 0
        return (head + rest).clamp(min=0.0)


def _safe_mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() > 0 else float("nan")


def _safe_min(x: torch.Tensor) -> float:
    return float(x.min()) if x.numel() > 0 else float("nan")


def _safe_max(x: torch.Tensor) -> float:
    return float(x.max()) if x.numel() > 0 else float("nan")


def _bound_estimates(s: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """Error bounds (talk §2.5-2.6) for the accepted sequences. T is the longest accepted completion. With per-token
    KLs from stored rollout log-probs (`trm_exact`), D_KL^tok,max is their largest value over accepted tokens and
    D_KL^seq the mean over accepted sequences of sum_t KL_t (the KL chain rule); the keys then carry no suffix.
    Otherwise both come from sample-based k3(rho_t) and every key ends in `_estimate`: estimates, not certificates."""
    exact = "kl_tok_max" in s
    suffix = "" if exact else "_estimate"
    keys = ("kl_tok_max", "kl_seq", "trpo", "pinsker_marginal", "mixed")
    keys = ("length",) + tuple(k + suffix for k in keys)
    accepted = (s["keep"] > 0.5) & (s["finite"] > 0.5)
    if not bool(accepted.any()):
        return {f"{prefix}bound/{k}": float("nan") for k in keys}
    length = float(s["length"][accepted].max())
    if exact:
        kl_tok_max = float(s["kl_tok_max"][accepted].max())
        kl_seq = float(s["kl_tok_sum"][accepted].mean())
    else:
        kl_tok_max = float(s["k3_max"][accepted].max())
        kl_seq = float((s["k3_mean"] * s["num_finite"])[accepted].mean())
    bounds = error_bounds(length, kl_tok_max, kl_seq)
    values = (length, kl_tok_max, kl_seq, bounds["trpo"], bounds["pinsker_marginal"], bounds["mixed"])
    return {f"{prefix}bound/{k}": float(v) for k, v in zip(keys, values, strict=True)}


def summarize_mask_stats(stats: dict[str, torch.Tensor], prefix: str = "trm/") -> dict[str, float]:
    """Reduce (possibly gathered) per-sequence statistics to the documented ``trm/`` metrics.

    ``stats`` is :meth:`TrustRegionMaskOutput.sequence_stats` (after an all-gather in multi-process training), so
    every metric is a statistic of the global batch, not a mean of per-rank means. Empty completions (length 0, e.g.
    truncated ones masked by ``mask_truncated_completions``) carry no tokens and are excluded. A metric with no
    sequence to average is NaN, which TRL's ``log`` drops.
    """
    nonempty = stats["length"] > 0
    s = {k: v[nonempty].double() for k, v in stats.items()}
    length = s["length"]
    n_tokens = length.sum()
    n_fin = s["num_finite"]
    out: dict[str, float] = {
        f"{prefix}accept_rate": _safe_mean(s["keep"]),
        f"{prefix}nonfinite_frac": _safe_mean(1.0 - s["finite"]),
        f"{prefix}log_ratio_abs_max/mean": _safe_mean(s["log_ratio_abs_max"]),
        f"{prefix}log_ratio_abs_max/max": _safe_max(s["log_ratio_abs_max"]),
        f"{prefix}k3_mean/mean": _safe_mean(s["k3_mean"]),
        f"{prefix}k3_mean/max": _safe_max(s["k3_mean"]),
        # token-weighted means over every finite valid token of the batch
        f"{prefix}kl_k1": float((s["k1_mean"] * n_fin).sum() / n_fin.sum()) if n_fin.sum() > 0 else float("nan"),
        f"{prefix}kl_k3": float((s["k3_mean"] * n_fin).sum() / n_fin.sum()) if n_fin.sum() > 0 else float("nan"),
        f"{prefix}geo_ratio/min": _safe_min(s["geo_ratio"]),
        f"{prefix}geo_ratio/mean": _safe_mean(s["geo_ratio"]),
        f"{prefix}geo_ratio/max": _safe_max(s["geo_ratio"]),
        f"{prefix}token_weight/mean": float(s["token_weight_sum"].sum() / n_tokens) if n_tokens > 0 else float("nan"),
    }
    for key in sorted(k for k in s if k.startswith("rejected_by/")):
        out[f"{prefix}reject_rate/{key.split('/', 1)[1]}"] = _safe_mean(s[key])
    if "kl_tok_max" in s:  # per-token KL from stored rollout log-probs (a lower bound when computed from top-k)
        out[f"{prefix}kl_tok_max/mean"] = _safe_mean(s["kl_tok_max"])
        out[f"{prefix}kl_tok_max/max"] = _safe_max(s["kl_tok_max"])
        out[f"{prefix}kl_tok_mean/mean"] = _safe_mean(s["kl_tok_sum"] / n_fin.clamp(min=1))
        out[f"{prefix}kl_tok_mean/max"] = _safe_max(s["kl_tok_sum"] / n_fin.clamp(min=1))
    out.update(_bound_estimates(s, prefix))
    # Accept rate by completion-length quartile (q1 = shortest quarter): the length-bias diagnostic.
    if length.numel() > 0:
        edges = torch.quantile(length, torch.tensor([0.25, 0.5, 0.75], dtype=length.dtype, device=length.device))
        bucket = torch.bucketize(length, edges, right=False)  # 0..3, ties go to the lower quartile
        for q in range(4):
            in_q = bucket == q
            out[f"{prefix}accept_rate/length_q{q + 1}"] = _safe_mean(s["keep"][in_q])
    else:
        for q in range(4):
            out[f"{prefix}accept_rate/length_q{q + 1}"] = float("nan")
    return out
