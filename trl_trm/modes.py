"""The correction modes of Trust Region Masking, their documented default thresholds, and the validation of thresholds
and input tensors shared by :mod:`trl_trm.masks` and :mod:`trl_trm.estimator` (pure torch, no TRL import).

:class:`~trl_trm.config.TRMConfig` validates its `trm_*` fields with :func:`validate_thresholds` (``name_prefix="trm_"``),
so a bad value fails at configuration time with the same message the math would give.
"""

from __future__ import annotations

import math

import torch

TRM_MODES = ("trm", "trm_exact", "geo_mask", "seq_mis", "seq_tis", "token_tis", "token_mis", "none")
"""Correction modes implemented by :func:`~trl_trm.masks.compute_trust_region_mask`."""

SEQUENCE_MASK_MODES = ("trm", "trm_exact", "geo_mask", "seq_mis")
"""Modes whose weights are a 0/1 mask over whole sequences."""

# Documented, tunable defaults (docs/configuration.md gives the sources).
DEFAULT_DELTA_MAX = math.log(2.0)  # every token ratio within [1/2, 2]: the symmetric band of token IS/MIS presets
DEFAULT_DELTA_AVG = 0.01  # mean k3 per token; the value used by public k3 rejection presets
DEFAULT_GEO_LOW = 0.99  # Geo-Mask band 1 +- 0.01 (the loose end of the 1 +- 0.001...0.01 range in the Geo-Mask notes)
DEFAULT_GEO_HIGH = 1.01
DEFAULT_DELTA_KL = 1e-4  # per-token KL(pi_roll || pi_theta); the talk's numerical example (δ = 1e-4)
DEFAULT_RATIO_MAX = 2.0  # C = 2, the truncation used for TIS in the rollout/training-mismatch literature


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


def _weight_band(mode: str, ratio_min: float | None, ratio_max: float | None) -> tuple[float | None, float | None]:
    """(lo, hi) log-space clamp of the weighting modes, as the reference formulas in the :mod:`trl_trm.masks` docstring."""
    if mode in ("seq_tis", "token_tis"):
        return (-math.inf if ratio_min is None else math.log(ratio_min)), math.log(ratio_max)
    if mode == "token_mis":
        return (
            None if ratio_min is None else math.log(ratio_min),
            None if ratio_max is None else math.log(ratio_max),
        )
    return None, None
