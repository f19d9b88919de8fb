"""Calibration: the rollout/training mismatch of a sample of sequences, and the thresholds that reach a target accept
rate (pure torch, no TRL import; the engine side, which runs a recipe's rollouts, is :mod:`trl_trm.calibrate`).

Input: per-sequence statistics of N sequences (:func:`batch_statistics` of each batch, gathered over every process
and concatenated: (N,) tensors keyed by name). Output: :func:`calibration_report`, a JSON-able dict.

**Thresholds for a target accept rate a.** For each mode, every sequence i gets the smallest value of the mode's
free parameter at which the mode's own criterion accepts it ("required" value; +inf when nothing accepts it: a
non-finite log-prob, or a fixed criterion of the recipe that rejects it). The calibrated parameter is the
ceil(a N)-th smallest required value, rounded up by 1 ppm so that float rounding never flips a decision, so it
accepts at least a of the calibration sequences (more when values tie). The parameters:

| mode        | parameter                   | required value of sequence i                               | thresholds written         |
|-------------|-----------------------------|------------------------------------------------------------|----------------------------|
| `trm`       | scale s of both deltas      | max(D_max_i / delta_max, D_avg_i / delta_avg) (criteria on) | delta_max s, delta_avg s   |
| `trm_exact` | scale s of delta_kl (and delta_avg) | max(kl_tok_max_i / delta_kl, D_avg_i / delta_avg)  | delta_kl s (, delta_avg s) |
| `geo_mask`  | half-width eta of a log band | abs(log geo_i) = abs(mean_t log rho_t)                    | geo_low e^-eta, geo_high e^eta |
| `seq_mis`   | log C (C >= 1)              | max(seq_log_ratio_i, 0) (+inf below a recipe's ratio_min)   | ratio_max C                |

`seq_mis`'s C is at least 1 (a band that rejects an on-policy sequence is refused by the mask), so a target below the
fraction of sequences with seq_log_ratio <= 0 is exceeded. `trm` and `trm_exact` scale the recipe's thresholds by one
common factor, as the adaptive controller does
(:mod:`trl_trm.adaptive`), so a criterion that is off stays off and the recipe's ratio between the two is kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .bounds import format_bounds_table
from .diagnostics import effective_sample_size
from .estimator import seq_tis_auto_log_clip
from .masks import compute_trust_region_mask

CALIBRATED_MODES = ("trm", "trm_exact", "geo_mask", "seq_mis")
"""Modes whose thresholds calibration sets (the other modes accept every finite sequence)."""

QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)
ROUND_UP = 1e-6  # relative: a calibrated threshold is the required value times (1 + ROUND_UP)
THRESHOLD_KEYS = ("delta_max", "delta_avg", "delta_kl", "geo_low", "geo_high", "ratio_min", "ratio_max")
"""The threshold settings (`TRMConfig.trm_<key>`) the mask reads; :func:`batch_statistics` takes them as a dict."""

_BASE_STATS = ("log_ratio_abs_max", "k3_mean", "k3_max", "k1_mean", "geo_ratio", "seq_log_ratio", "length",
               "num_finite", "finite", "chi2_sum", "kl_tok_max", "kl_tok_sum")  # fmt: skip


def batch_statistics(
    per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    settings: dict[str, Any],
    kl_tok: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """(B,) statistics of one batch: the mismatch (``compute_trust_region_mask(mode="none")``'s per-sequence values),
    ``accept/<mode>`` (1.0 where that mode keeps the sequence at the recipe's ``settings``, one key per mode of
    :data:`CALIBRATED_MODES` that can run: `trm_exact` needs ``kl_tok`` (B, T)), and ``token_keep/token_mis`` (the
    number of tokens `token_mis` keeps). ``settings``: the :data:`THRESHOLD_KEYS` (a missing key is off)."""
    args = (per_token_logps, sampling_per_token_logps, completion_mask)
    base = compute_trust_region_mask(*args, mode="none", kl_tok=kl_tok).sequence_stats()
    out = {name: base[name].double() for name in _BASE_STATS if name in base}
    thresholds = {key: settings.get(key) for key in THRESHOLD_KEYS}
    for mode in (*CALIBRATED_MODES, "token_mis"):
        if mode == "trm_exact" and (kl_tok is None or thresholds["delta_kl"] is None):
            continue
        if mode in ("seq_mis", "token_mis") and thresholds["ratio_max"] is None:
            continue
        result = compute_trust_region_mask(*args, mode=mode, kl_tok=kl_tok, **thresholds)
        if mode == "token_mis":
            out["token_keep/token_mis"] = result.token_weight_sum.double()
        else:
            out[f"accept/{mode}"] = result.keep.double()
    return out


def _rounded(value: float) -> float:
    return value * (1.0 + ROUND_UP) if value > 0 else value + ROUND_UP * 1e-3


def required_values(mode: str, stats: dict[str, torch.Tensor], settings: dict[str, Any]) -> torch.Tensor | str:
    """(N,) float64: per sequence, the smallest value of ``mode``'s parameter (module docstring) that accepts it; +inf
    where none does. A string instead says why the mode cannot be calibrated from these statistics."""
    finite = stats["finite"] > 0
    inf = torch.full_like(stats["k3_mean"], math.inf)
    if mode in ("trm", "trm_exact"):
        first = ("log_ratio_abs_max", "delta_max") if mode == "trm" else ("kl_tok_max", "delta_kl")
        if first[0] not in stats:
            return "needs the rollout top-k (`trm_rollout_topk >= 1`) for the per-token KL"
        parts = [stats[name] / settings[key] for name, key in (first, ("k3_mean", "delta_avg")) if settings.get(key)]
        if not parts:
            return f"both of its criteria are off (`trm_{first[1]}` and `trm_delta_avg` are None): it keeps everything"
        required = torch.stack(parts).amax(dim=0)
    elif mode == "geo_mask":
        required = (stats["seq_log_ratio"] / stats["num_finite"].clamp(min=1.0)).abs()
    elif mode == "seq_mis":
        required = stats["seq_log_ratio"].clamp(min=0.0)  # C >= 1: the band must keep an on-policy sequence
        if settings.get("ratio_min") is not None:
            below = stats["seq_log_ratio"] < math.log(settings["ratio_min"])
            required = torch.where(below, inf, required)
    else:
        return f"has no threshold to calibrate (`{mode}` keeps every finite sequence)"
    return torch.where(finite & torch.isfinite(required), required, inf)


def thresholds_for_target(
    mode: str, stats: dict[str, torch.Tensor], settings: dict[str, Any], target: float
) -> dict[str, float | None] | str:
    """The `trm_*` thresholds of ``mode`` that accept at least ``target`` of the sequences in ``stats`` (module
    docstring), as ``{"delta_max": ..., ...}``; a string says why no threshold reaches the target."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"a target accept rate must lie in (0, 1], got {target!r}.")
    required = required_values(mode, stats, settings)
    if isinstance(required, str):
        return f"`{mode}` {required}"
    required = required[stats["length"] > 0]  # sequences without a valid token are not counted (as in training)
    n = required.numel()
    if n == 0:
        return "no sampled sequence has a valid completion token"
    ordered = torch.sort(required).values
    value = float(ordered[max(0, math.ceil(target * n - 1e-9) - 1)])
    if not math.isfinite(value):
        reachable = float(torch.isfinite(required).double().mean())
        return (
            f"`{mode}` cannot accept {target:g}: only {reachable:.3f} of the sequences can be accepted at any "
            "threshold (non-finite log-probs, or a fixed criterion of the recipe rejects the rest)"
        )
    if mode in ("trm", "trm_exact"):
        keys = ("delta_max", "delta_avg") if mode == "trm" else ("delta_kl", "delta_avg")
        scale = _rounded(value)
        return {k: (None if settings.get(k) is None else settings[k] * scale) for k in keys}
    if mode == "geo_mask":
        eta = _rounded(value)
        return {"geo_low": math.exp(-eta), "geo_high": math.exp(eta)}
    return {"ratio_max": math.exp(value + ROUND_UP * max(1.0, abs(value)))}


def accepted_rows(mode: str, stats: dict[str, torch.Tensor], settings: dict[str, Any]) -> torch.Tensor:
    """(N,) bool: the sequences ``mode`` keeps at ``settings``, from their statistics (the criteria of
    :func:`~trl_trm.masks.compute_trust_region_mask` applied to per-sequence values). Modes without a sequence
    criterion keep every finite sequence."""
    required = required_values(mode, stats, settings)
    if isinstance(required, str):
        return stats["finite"] > 0
    if mode in ("trm", "trm_exact"):
        return required <= 1.0
    if mode == "geo_mask":
        log_geo = stats["seq_log_ratio"] / stats["num_finite"].clamp(min=1.0)
        low, high = settings.get("geo_low"), settings.get("geo_high")
        ok = torch.isfinite(required)
        ok &= log_geo >= (math.log(low) if low is not None else -math.inf)
        return ok & (log_geo <= (math.log(high) if high is not None else math.inf))
    return required <= math.log(settings["ratio_max"])


def predicted_accept(mode: str, stats: dict[str, torch.Tensor], settings: dict[str, Any]) -> float:
    """The fraction of the sequences with tokens in ``stats`` that :func:`accepted_rows` keeps (NaN without any)."""
    rows = accepted_rows(mode, stats, settings)[stats["length"] > 0]
    return float(rows.double().mean()) if rows.numel() else float("nan")


def _quantiles(values: torch.Tensor) -> dict[str, float | None]:
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return {f"q{int(q * 100)}": None for q in QUANTILES}
    return {f"q{int(q * 100)}": float(torch.quantile(values, q)) for q in QUANTILES}


def mismatch_summary(stats: dict[str, torch.Tensor], kl_exact: bool = False) -> dict[str, Any]:
    """Per-token k1, k3, chi^2 (and the top-k KL), the normalised ESS, D_max and D_avg quantiles, overall and by length
    quartile (the sequences sorted by length, in 4 groups of equal count; none below 4 sequences). ``kl_exact``: the top-k covered the whole vocabulary (else the KL is a lower bound)."""
    finite = stats["finite"] > 0
    tokens = float(stats["num_finite"][finite].sum())
    per_token = lambda name: float((stats[name] * stats["num_finite"])[finite].sum()) / max(tokens, 1.0)  # noqa: E731
    out: dict[str, Any] = {
        "sequences": int(stats["length"].numel()),
        "tokens": int(stats["length"].sum()),
        "nonfinite_sequences": int((~finite).sum()),
        "k1": per_token("k1_mean"),
        "k3": per_token("k3_mean"),
        "chi2": float(stats["chi2_sum"][finite].sum()) / max(tokens, 1.0),
        "ess": effective_sample_size(stats["seq_log_ratio"][finite]),
        "d_max": _quantiles(stats["log_ratio_abs_max"][finite]),
        "d_avg": _quantiles(stats["k3_mean"][finite]),
    }
    if "kl_tok_sum" in stats:
        out["kl_tok"] = float(stats["kl_tok_sum"][finite].sum()) / max(tokens, 1.0)
        out["kl_tok_max"] = _quantiles(stats["kl_tok_max"][finite])
        out["kl_tok_lower_bound"] = not kl_exact
    lengths = stats["length"][finite]
    order = torch.argsort(lengths, stable=True)  # the sequences by length, split into 4 groups of equal count
    quartiles = []
    for rows in torch.tensor_split(order, 4) if lengths.numel() >= 4 else []:
        d_max, d_avg = stats["log_ratio_abs_max"][finite][rows], stats["k3_mean"][finite][rows]
        quartiles.append({"lengths": [float(lengths[rows].min()), float(lengths[rows].max())],
                          "sequences": int(rows.numel()), "d_max": _quantiles(d_max), "d_avg": _quantiles(d_avg)})  # fmt: skip
    out["by_length_quartile"] = quartiles
    return out


def recipe_accept_rates(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The accept rate each mode had at the recipe's thresholds (from :func:`batch_statistics`'s ``accept/<mode>``);
    `token_mis`: the fraction of tokens it keeps; `seq_tis`, `token_tis`: the finite sequences (they reweight, and
    reject only non-finite ones); `none` rejects nothing."""
    rates = {key.split("/", 1)[1]: float(v.mean()) for key, v in stats.items() if key.startswith("accept/")}
    if "token_keep/token_mis" in stats:
        rates["token_mis"] = float(stats["token_keep/token_mis"].sum()) / max(float(stats["length"].sum()), 1.0)
    finite = float((stats["finite"] > 0).double().mean()) if stats["finite"].numel() else float("nan")
    rates.update(seq_tis=finite, token_tis=finite, none=1.0)
    return rates


def recommend(summary: dict[str, Any], recipe_mode: str) -> tuple[str, str]:
    """``(mode, reason)``: the correction that `docs/choosing-a-correction.md` points to for the measured mismatch,
    with its reason in one line (the rules: docs/calibrate.md, "The recommendation")."""
    k3, d_max = summary["k3"], summary["d_max"]["q50"]
    keep = recipe_mode if recipe_mode in CALIBRATED_MODES else "trm"
    if summary["sequences"] == 0 or d_max is None:
        return keep, "no finite sequence was measured: nothing to base a choice on; keep the recipe's mode."
    if k3 <= 1e-5:
        return keep, (
            f"tiny mismatch (k3 {k3:.2g} per token <= 1e-5, ESS {summary['ess']:.3f}): every mode behaves the same; "
            f"`{keep}` at these thresholds keeps the trust region at no measurable cost."
        )
    if d_max > 1.0:
        return "seq_mis", (
            f"rare large jumps (median D_max {d_max:.2g} > 1): a max criterion rejects long sequences first, and "
            "`seq_mis` kept learning where sequence masks rejected nearly everything (simulator flips)."
        )
    if k3 > 1e-2:
        return "seq_mis", (
            f"strong smooth mismatch (k3 {k3:.2g} per token > 1e-2, as under staleness): `seq_mis` and token-level "
            "corrections did best in the study; sequence masks cut gradient spikes but learned less."
        )
    return keep, (
        f"moderate smooth mismatch (k3 {k3:.2g} per token): `{keep}` at thresholds sized from it keeps the trust "
        "region; token-level corrections were as good in the experiments if you do not need it."
    )


def bound_inputs(
    mode: str, stats: dict[str, torch.Tensor], thresholds: dict[str, Any], kl_exact: bool = False
) -> dict[str, Any] | None:
    """The `trl-trm bounds` inputs at ``mode``'s ``thresholds`` and the observed T: ``length`` (the longest
    sequence), ``kl_tok_max`` (the enforced delta_kl for `trm_exact`; else the largest per-token KL of an accepted
    sequence: the top-k KL when measured, else the one-sample k3) and ``kl_seq`` (mean sum_t k3 of the accepted
    sequences, an estimate of D_KL^seq). Estimates, not certificates (`trl_trm.bounds`). None without an accepted
    sequence."""
    rows = accepted_rows(mode, stats, thresholds)
    if not bool(rows.any()):
        return None
    if mode == "trm_exact":
        delta, source = float(thresholds["delta_kl"]), "enforced delta_kl"
    elif "kl_tok_max" in stats:
        delta = float(stats["kl_tok_max"][rows].max())
        source = "largest per-token KL of an accepted sequence" + ("" if kl_exact else " (top-k: a lower bound)")
    else:
        delta, source = float(stats["k3_max"][rows].max()), "largest per-token k3 of an accepted sequence (estimate)"
    kl_seq = float((stats["k3_mean"] * stats["num_finite"])[rows].mean())
    length = int(stats["length"].max())
    command = f"trl-trm bounds --length {length} --kl-tok-max {delta!r} --kl-seq {kl_seq!r}"
    return {"length": length, "kl_tok_max": delta, "kl_seq": kl_seq, "kl_tok_max_source": source,
            "command": command, "table": format_bounds_table(length, delta, kl_seq)}  # fmt: skip


def recipe_update(mode: str, thresholds: dict[str, Any]) -> dict[str, Any]:
    """The recipe keys to set: ``trm_mode`` and the mode's calibrated thresholds as `TRMConfig` fields."""
    return {"trm_mode": mode, **{f"trm_{key}": value for key, value in thresholds.items()}}


def calibration_report(
    stats: dict[str, torch.Tensor],
    settings: dict[str, Any],
    recipe_mode: str,
    targets: tuple[float, ...] = (0.9, 0.95, 0.99),
    kl_exact: bool = False,
) -> dict[str, Any]:
    """Everything `trl-trm calibrate` prints, as a JSON-able dict (the keys are documented in docs/calibrate.md):
    ``mismatch``, ``recipe_accept``, ``targets`` (per target, per mode: the thresholds or the reason none reach it,
    and ``accept``, the accept rate they give on these sequences), ``seq_tis_clip``, ``recommendation``,
    ``recipe_update`` (at the first target) and ``bounds`` (at those thresholds)."""
    if not targets:
        raise ValueError("give at least one target accept rate (e.g. `--target_accept 0.9`).")
    summary = mismatch_summary(stats, kl_exact)
    per_target: dict[str, dict[str, Any]] = {}
    for target in targets:
        row: dict[str, Any] = {}
        for mode in CALIBRATED_MODES:
            chosen = thresholds_for_target(mode, stats, settings, target)
            if isinstance(chosen, str):
                row[mode] = {"reason": chosen}
            else:
                row[mode] = {"thresholds": chosen, "accept": predicted_accept(mode, stats, {**settings, **chosen})}
        per_target[f"{target:g}"] = row
    mode, reason = recommend(summary, recipe_mode)
    first = per_target[f"{targets[0]:g}"][mode]
    finite_seq = stats["seq_log_ratio"][stats["finite"] > 0]
    report: dict[str, Any] = {
        "mismatch": summary,
        "recipe_accept": recipe_accept_rates(stats),
        "targets": per_target,
        "seq_tis_clip": math.exp(seq_tis_auto_log_clip(finite_seq)),
        "recommendation": {"mode": mode, "target": targets[0], "reason": reason},
        "recipe_update": None,
        "bounds": None,
    }
    if "thresholds" in first:
        report["recipe_update"] = recipe_update(mode, first["thresholds"])
        report["bounds"] = bound_inputs(mode, stats, {**settings, **first["thresholds"]}, kl_exact)
    else:
        report["recommendation"]["reason"] += f" No thresholds: {first['reason']}."
    return report
