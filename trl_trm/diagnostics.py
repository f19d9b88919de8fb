"""Diagnostics of the mask and their reduction to the documented ``trm/`` metrics (pure torch, no TRL import): the
variance sums (chi^2 per token, surrogate terms), the effective sample size, the per-token KL and chi^2 from stored
top-k log-probs, the error-bound estimates, and :func:`summarize_mask_stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bounds import error_bounds
from .row_blocks import _BlockStats, _row_blocks


def _variance_sums_rows(
    theta: torch.Tensor, roll: torch.Tensor, completion_mask: torch.Tensor, kl: torch.Tensor | None, stats: _BlockStats
) -> None:
    """The float64 fallback of the row-block loop's variance sums: rows whose ``stats.chi2_sum`` came out non-finite
    (rho_t - 1 computed in a float32 working dtype overflows beyond log rho = 88.7; its square is taken in float64)
    are recomputed elementwise in float64 by :func:`_variance_sums`, in place. Rare, so the common case costs one
    (B,) check and no second pass over (B, T)."""
    rows = (~torch.isfinite(stats.chi2_sum)).nonzero().flatten()  # (R,)
    if rows.numel() == 0:
        return
    sub_kl = None if kl is None else kl[rows]
    chi2_sum, ratio_m1_sum, _ = _variance_sums(theta[rows], roll[rows], completion_mask[rows], sub_kl, None)
    stats.chi2_sum[rows] = chi2_sum
    stats.ratio_m1_sum[rows] = ratio_m1_sum


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


def effective_sample_size(seq_log_ratio: torch.Tensor) -> float:
    """Normalised ESS (sum_i e^{s_i})^2 / (N sum_i e^{2 s_i}) in log space: 1 = no mismatch (all s_i equal), 1/N =
    one sequence carries the whole batch (spec "Variance diagnostics"). ``seq_log_ratio``: (N,) s_i; non-finite
    entries are ignored; NaN for an empty batch."""
    s = seq_log_ratio.detach().double()
    s = s[torch.isfinite(s)]
    if s.numel() == 0:
        return float("nan")
    log_ess = 2.0 * torch.logsumexp(s, dim=0) - math.log(s.numel()) - torch.logsumexp(2.0 * s, dim=0)
    return float(torch.exp(log_ess).clamp(max=1.0))


def topk_token_chi2(
    rollout_topk_logprobs: torch.Tensor,
    theta_topk_logprobs: torch.Tensor,
    topk_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token chi^2(pi_theta(.|c_t) || pi_roll(.|c_t)) = sum_v (q_v - p_v)^2 / p_v (p = pi_roll, q = pi_theta)
    from the stored ids plus one "rest" bucket: a **lower bound** of the exact value (data processing), exact when
    the ids cover the vocabulary. It is what the sample mean of (rho_t - 1)^2 estimates under pi_roll.

    The rest bucket's masses 1 - sum p and 1 - sum q carry the inputs' rounding (see :func:`topk_token_kl`); the
    rest term uses |q_rest - p_rest| shrunk by both slacks over p_rest grown by its slack, and is dropped when p_rest
    is within rounding of 0, so the result stays below the exact value. A stored id with p = 0 and q > 0 gives +inf
    (pi_theta puts mass where pi_roll never samples). Same shapes, dtypes and NaN convention as
    :func:`topk_token_kl`: (B, T), NaN where a used log-prob is NaN or +inf.
    """
    d = _topk_distributions(rollout_topk_logprobs, theta_topk_logprobs, topk_mask)
    with torch.no_grad():
        log_p, log_q, p, q = d.log_p, d.log_q, d.p, d.q  # (B, T, k) each
        # p (q/p - 1)^2 = p expm1(log q - log p)^2; 0 where both are 0, +inf where only p is 0
        both_zero = (p == 0) & (q == 0)
        ratio_m1 = torch.where(p > 0, torch.expm1(log_q - log_p), math.inf)
        head = torch.where(both_zero, 0.0, torch.where(p > 0, p * ratio_m1.square(), math.inf)).sum(dim=-1)  # (B, T)
        p_rest = 1.0 - p.sum(dim=-1)  # (B, T)
        q_rest = (1.0 - q.sum(dim=-1)).clamp(min=0.0)  # (B, T)
        gap = ((q_rest - p_rest).abs() - d.slack_p - d.slack_q).clamp(min=0.0)  # (B, T)
        rest = torch.where(p_rest > d.slack_p, gap.square() / (p_rest + d.slack_p), 0.0)  # (B, T)
        return torch.where(d.corrupt, math.nan, head + rest).to(d.out_dtype)  # (B, T)


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
        pi_roll's is not, the rest term uses that rounding level (a large, finite value) instead of +inf. A NaN or
        +inf log-prob in a used slot of either input makes that position's KL NaN (never a silently finite value), so
        :func:`~trl_trm.masks.compute_trust_region_mask` rejects and counts the sequence as non-finite. A log-prob of -inf is a
        legitimate zero probability (e.g. a token removed by top-k/top-p sampling).
    """
    d = _topk_distributions(rollout_topk_logprobs, theta_topk_logprobs, topk_mask)
    with torch.no_grad():
        log_p, log_q, p, q = d.log_p, d.log_q, d.p, d.q  # (B, T, k) each
        # sum_v p (log p - log q) over stored ids; xlogy-style: a slot with p = 0 contributes 0
        head = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)  # (B, T)
        # A rest mass of pi_roll within its slack is zero (with k = V, 1 - sum p is rounding noise, and a positive
        # p_rest against q_rest ~ 0 would read as a huge KL) ...
        p_rest = 1.0 - p.sum(dim=-1)  # (B, T)
        p_rest = torch.where(p_rest > d.slack_p, p_rest, 0.0)
        # ... and pi_theta's gets the slack added: the rest term decreases in q_rest, so the result stays below the
        # exact value (a lower bound) even when 1 - sum q has lost its low digits to cancellation.
        q_rest = (1.0 - q.sum(dim=-1)).clamp(min=0.0) + d.slack_q  # (B, T)
        rest = torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest)  # (B, T), 0 when p_rest = 0
        return torch.where(d.corrupt, math.nan, (head + rest).clamp(min=0.0)).to(d.out_dtype)  # (B, T)


@dataclass
class _TopKDistributions:
    """Float64 views of two top-k log-prob tensors (unused slots at -inf) with the rounding slack of their rest masses
    and the positions holding a NaN / +inf log-prob: what :func:`topk_token_kl` and :func:`topk_token_chi2` share."""

    log_p: torch.Tensor  # (B, T, k) log pi_roll
    log_q: torch.Tensor  # (B, T, k) log pi_theta
    p: torch.Tensor  # (B, T, k)
    q: torch.Tensor  # (B, T, k)
    slack_p: torch.Tensor  # (B, T) how far off 1 - sum p can be
    slack_q: torch.Tensor  # (B, T)
    corrupt: torch.Tensor  # (B, T) bool
    out_dtype: torch.dtype


def _topk_distributions(
    rollout_topk_logprobs: torch.Tensor, theta_topk_logprobs: torch.Tensor, topk_mask: torch.Tensor | None
) -> _TopKDistributions:
    if rollout_topk_logprobs.shape != theta_topk_logprobs.shape or rollout_topk_logprobs.dim() != 3:
        raise ValueError(
            f"Mismatched shapes: rollout top-k log-probs {tuple(rollout_topk_logprobs.shape)} and pi_theta log-probs "
            f"{tuple(theta_topk_logprobs.shape)} must both be (B, T, k) over the same ids."
        )
    in_dtypes = (rollout_topk_logprobs.dtype, theta_topk_logprobs.dtype)
    out_dtype = torch.float64 if torch.float64 in in_dtypes else torch.float32
    # Relative precision of the inputs (float32 log-probs: 1.2e-7). The arithmetic runs in float64, so the only
    # rounding that matters is the inputs' own.
    rounding = max(torch.finfo(d).eps for d in in_dtypes)
    with torch.no_grad():
        log_p = rollout_topk_logprobs.detach().double()  # (B, T, k)
        log_q = theta_topk_logprobs.detach().double()  # (B, T, k)
        if topk_mask is not None:
            log_p = torch.where(topk_mask, log_p, -math.inf)
            log_q = torch.where(topk_mask, log_q, -math.inf)
        p, q = log_p.exp(), log_q.exp()  # (B, T, k)
        # The rest masses 1 - sum p and 1 - sum q inherit the inputs' rounding: a stored log-prob is off by up to
        # rounding * |log p| (plus its own rounding), i.e. p by a relative rounding * (1 + |log p|). Summed over the
        # slots, that is how far off 1 - sum p can be (a float64 k-term sum adds k * 2.2e-16).
        k = max(log_p.size(-1), 1)
        eps64 = torch.finfo(torch.float64).eps * k
        slack_p = rounding * torch.where(p > 0, p * (1.0 + log_p.abs()), 0.0).sum(dim=-1) + eps64  # (B, T)
        slack_q = rounding * torch.where(q > 0, q * (1.0 + log_q.abs()), 0.0).sum(dim=-1) + eps64  # (B, T)
        # `p > 0` is False for NaN, and NaN would vanish from the sums: such positions are flagged explicitly.
        corrupt = (torch.isnan(log_p) | (log_p == math.inf) | torch.isnan(log_q) | (log_q == math.inf)).any(dim=-1)
    return _TopKDistributions(log_p, log_q, p, q, slack_p, slack_q, corrupt, out_dtype)


def _safe_mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() > 0 else float("nan")


def _safe_min(x: torch.Tensor) -> float:
    return float(x.min()) if x.numel() > 0 else float("nan")


def _safe_max(x: torch.Tensor) -> float:
    return float(x.max()) if x.numel() > 0 else float("nan")


def _bound_estimates(
    s: dict[str, torch.Tensor], prefix: str, kl_tok_lower_bound: bool = False, surrogate: float | None = None
) -> dict[str, float]:
    """Error bounds (talk §2.5-2.6) for the accepted sequences. T is the longest accepted completion. With per-token
    KLs from stored rollout log-probs (`trm_exact`), D_KL^tok,max is their largest value over accepted tokens and
    D_KL^seq the mean over accepted sequences of sum_t KL_t (the KL chain rule); the keys then carry no suffix, or
    `_lb` when those KLs are lower bounds (top-k with k < V: every bound is increasing in both, so the values are
    lower bounds of the bounds at the exact KLs). Otherwise both come from sample-based k3(rho_t) and every key ends
    in `_estimate`: estimates, not certificates. With ``surrogate`` (the batch estimate of the masked surrogate L),
    `bound/minorizer*` is L - min(Pinsker-Marginal, Mixed) (with `_lb` KLs it is an upper estimate of M)."""
    exact = "kl_tok_max" in s
    suffix = ("_lb" if kl_tok_lower_bound else "") if exact else "_estimate"
    keys = ("kl_tok_max", "kl_seq", "trpo", "pinsker_marginal", "mixed")
    keys = ("length",) + tuple(k + suffix for k in keys)
    accepted = (s["keep"] > 0.5) & (s["finite"] > 0.5)
    if surrogate is not None:
        keys = keys + ("minorizer" + suffix,)
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
    out = {f"{prefix}bound/{k}": float(v) for k, v in zip(keys[: len(values)], values, strict=True)}
    if surrogate is not None:  # the talk's minorizer M = L - min(Pinsker-Marginal, Mixed) (§2.6.1)
        out[f"{prefix}bound/minorizer{suffix}"] = surrogate - min(bounds["pinsker_marginal"], bounds["mixed"])
    return out


def summarize_mask_stats(
    stats: dict[str, torch.Tensor], prefix: str = "trm/", kl_tok_lower_bound: bool = False
) -> dict[str, float]:
    """Reduce (possibly gathered) per-sequence statistics to the documented ``trm/`` metrics.

    ``kl_tok_lower_bound=True`` says the per-token KLs (if any) are lower bounds of the exact values (computed from a
    top-k with k < V): their metrics and the bounds computed from them then end in ``_lb`` (``trm/kl_tok_max_lb/max``,
    ``trm/bound/trpo_lb``, ...), so a reader sees which numbers are lower bounds.

    ``stats`` is :meth:`~trl_trm.masks.TrustRegionMaskOutput.sequence_stats` (after an all-gather in multi-process training), so
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
        lb = "_lb" if kl_tok_lower_bound else ""
        out[f"{prefix}kl_tok_max{lb}/mean"] = _safe_mean(s["kl_tok_max"])
        out[f"{prefix}kl_tok_max{lb}/max"] = _safe_max(s["kl_tok_max"])
        out[f"{prefix}kl_tok_mean{lb}/mean"] = _safe_mean(s["kl_tok_sum"] / n_fin.clamp(min=1))
        out[f"{prefix}kl_tok_mean{lb}/max"] = _safe_max(s["kl_tok_sum"] / n_fin.clamp(min=1))
    # Variance diagnostics (spec "Variance diagnostics", seeds 003_*): chi^2 per token, ESS and chi^2 of the product
    # ratio over the window's finite sequences, in log space.
    if "chi2_sum" in s:
        out[f"{prefix}chi2_tok"] = float(s["chi2_sum"].sum() / n_fin.sum()) if n_fin.sum() > 0 else float("nan")
    if "chi2_tok_sum" in s:
        lb = "_lb" if kl_tok_lower_bound else ""
        total = n_fin.sum()
        out[f"{prefix}chi2_tok_topk{lb}"] = float(s["chi2_tok_sum"].sum() / total) if total > 0 else float("nan")
    finite_seq = s["seq_log_ratio"][s["finite"] > 0.5]
    out[f"{prefix}ess"] = effective_sample_size(finite_seq)
    if finite_seq.numel() > 0:
        log_mean = float(torch.logsumexp(2.0 * finite_seq, dim=0)) - math.log(finite_seq.numel())
        out[f"{prefix}chi2_seq"] = math.expm1(log_mean) if log_mean < 709.0 else math.inf
    else:
        out[f"{prefix}chi2_seq"] = float("nan")
    surrogate = None
    if "advantage" in s and "ratio_m1_sum" in s and s["keep"].numel() > 0:
        # L_masked estimate (talk §4.5.1): (1/N) sum_i M_i A_i sum_t (rho_t - 1), rejected sequences counted in N.
        kept = (s["keep"] > 0.5) & (s["finite"] > 0.5)
        surrogate = float(torch.where(kept, s["advantage"] * s["ratio_m1_sum"], 0.0).sum() / s["keep"].numel())
        out[f"{prefix}surrogate_estimate"] = surrogate
    out.update(_bound_estimates(s, prefix, kl_tok_lower_bound, surrogate))
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
