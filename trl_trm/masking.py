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
        for name in ("chi2_sum", "ratio_m1_sum", "chi2_tok_sum"):
            if getattr(self, name) is not None:
                stats[name] = getattr(self, name)
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


# Row blocks of `compute_trust_region_mask` on CPU: about 2**17 elements (512 KiB of float32 per (rows, T) scratch
# tensor), so a block's scratch tensors stay in a 2 MiB L2 cache between the ~12 elementwise passes and reductions,
# and the temporaries are bounded by a block instead of the whole batch. Measured here (2 cores): 2**17 was the
# fastest of 2**14 ... 2**18 at (256, 8192) and (512, 16384); smaller blocks pay more per-op overhead.
_CPU_BLOCK_ELEMENTS = 1 << 17

# Torch intra-op threads of the CPU block loop (None: the caller's setting). Each block is ~12 small kernels; with
# several threads each one is a fork/join of the OpenMP team, and when another process holds one of the cores every
# join waits for a descheduled thread. Measured here (interleaved, (512, 16384)) with one competing busy process:
# 389 ms on 1 thread against 579 ms on 2; under heavy load 12.6 s against 29.7 s; two Python threads of one torch
# thread each were slower still (they wait for the GIL instead). The price: 1.25x on an idle machine (218 against
# 175 ms; benchmarks/README.md, section 5).
# Results are bit-identical for any thread count: every op is elementwise or a per-row reduction over a block of
# >= 2 rows, which torch does not split across threads.
_CPU_BLOCK_THREADS: int | None = 1


def _row_blocks(batch: int, length: int, device: torch.device) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering the batch. Every statistic is per row, so blocks are exact.

    On CPU, blocks of about ``_CPU_BLOCK_ELEMENTS`` elements (at least 2 rows); on other devices one block (fewer
    kernel launches; the accelerator's memory bandwidth is the bottleneck, not its cache). A batch of several rows is
    never cut into a 1-row block: torch splits a single-row reduction across threads (another summation order), so
    its sums would not be bit-identical to the same row reduced inside a larger batch.
    """
    if batch == 0:
        return []
    rows = batch if device.type != "cpu" else max(2, _CPU_BLOCK_ELEMENTS // max(length, 1))
    starts = list(range(0, batch, rows))
    if len(starts) > 1 and batch - starts[-1] == 1:
        starts.pop()  # merge a trailing 1-row block into the previous one
    return list(zip(starts, starts[1:] + [batch], strict=True))


@dataclass
class _BlockStats:
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
    def empty(cls, batch: int, dtype: torch.dtype, device: torch.device, with_kl: bool) -> _BlockStats:
        def new(kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(batch, dtype=kind, device=device)  # zeros: the max of an empty row (T = 0) is 0

        kl_max, kl_sum = (new(), new()) if with_kl else (None, None)
        return cls(new(torch.long), new(torch.long), new(), new(), new(), new(), new(), kl_max, kl_sum)


def _weight_band(mode: str, ratio_min: float | None, ratio_max: float | None) -> tuple[float | None, float | None]:
    """(lo, hi) log-space clamp of the weighting modes, as the reference formulas in the module docstring."""
    if mode in ("seq_tis", "token_tis"):
        return (-math.inf if ratio_min is None else math.log(ratio_min)), math.log(ratio_max)
    if mode == "token_mis":
        return (
            None if ratio_min is None else math.log(ratio_min),
            None if ratio_max is None else math.log(ratio_max),
        )
    return None, None


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
        chi2_tok: (B, T) per-token chi^2(pi_theta || pi_roll) from stored rollout log-probs, e.g. from
            :func:`topk_token_chi2`; statistics only (`chi2_tok_sum`).

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

    dtype = (
        torch.float64 if torch.float64 in (per_token_logps.dtype, sampling_per_token_logps.dtype) else torch.float32
    )
    batch, length_t = completion_mask.shape
    device = per_token_logps.device
    with torch.no_grad():
        theta = per_token_logps.detach()  # (B, T)
        roll = sampling_per_token_logps.detach()  # (B, T)
        kl = None if kl_tok is None else kl_tok.detach()  # (B, T)
        blocks = _row_blocks(batch, length_t, device)
        rows = max((stop - start for start, stop in blocks), default=0)
        stats = _BlockStats.empty(batch, dtype, device, with_kl=kl is not None)
        weights = torch.empty(batch, length_t, dtype=dtype, device=device)  # (B, T), returned
        band = _weight_band(mode, ratio_min, ratio_max)

        scratch = (
            torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) log-ratios
            torch.empty(rows, length_t, dtype=dtype, device=device),  # (rows, T) k3, |log rho|, kl_tok
            torch.empty(rows, length_t, dtype=torch.bool, device=device),  # (rows, T) padding
        )

        def fill(start: int, stop: int, check_finite: bool) -> None:
            _fill_row_block(
                theta, roll, completion_mask, kl, start, stop, stats, weights, scratch, mode, band, check_finite
            )

        # One torch thread on CPU (see _CPU_BLOCK_THREADS), except for a single row: torch would split its reductions
        # across the caller's threads, and a 1-row batch keeps the summation order it always had.
        threads_before = torch.get_num_threads()
        one_thread = _CPU_BLOCK_THREADS is not None and device.type == "cpu" and batch >= 2
        if one_thread:
            torch.set_num_threads(_CPU_BLOCK_THREADS)
        try:
            # Fast pass: assumes every valid log-prob (and kl_tok) is finite, so the valid set is the completion mask.
            for start, stop in blocks:
                fill(start, stop, check_finite=False)
            # A non-finite value at a valid position makes its row's sum non-finite: recompute those row blocks with
            # the per-token finiteness check (rare; a finite row that merely overflowed is recomputed too, harmlessly).
            row_sums = stats.seq_log_ratio if kl is None else stats.seq_log_ratio + stats.kl_tok_sum  # (B,)
            bad_rows = (~torch.isfinite(row_sums)).nonzero().flatten().tolist()
            if bad_rows:
                bad_rows = set(bad_rows)
                for start, stop in blocks:
                    if any(start <= i < stop for i in bad_rows):
                        fill(start, stop, check_finite=True)
            chi2_sum, ratio_m1_sum, chi2_tok_sum = _variance_sums(theta, roll, completion_mask, kl, chi2_tok)
        finally:
            if one_thread:
                torch.set_num_threads(threads_before)

        length = stats.length
        num_finite = stats.num_finite
        finite = num_finite == length  # (B,) every valid position finite
        if nonfinite == "raise" and not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"Non-finite log-probs at valid completion positions in sequences {bad[:10]}: the rollout engine or "
                "the training forward returned NaN/inf. Use `nonfinite='reject'` to reject such sequences instead."
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
        chi2_sum=chi2_sum,
        ratio_m1_sum=ratio_m1_sum,
        chi2_tok_sum=chi2_tok_sum,
    )


def _variance_sums(
    theta: torch.Tensor,
    roll: torch.Tensor,
    completion_mask: torch.Tensor,
    kl: torch.Tensor | None,
    chi2_tok: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B,) float64 sums over the valid set of :func:`compute_trust_region_mask` (valid, finite log-probs and
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

    With ``ratio_factor=False`` the mask modes give the plain 0/1 mask (the factor is dropped; the truncated TIS
    weights are unaffected). In `trm` the mask bounds the factor by [e^-delta_max, e^delta_max] when pi_old is the
    policy the mask was evaluated against (``num_iterations=1``). The weights are exactly 0 on padding and on every
    rejected sequence (``result.keep`` False, including non-finite ones); a non-finite pi_old at a position that
    would get a weight rejects its sequence too (weight 0 on the whole row), never a NaN.

    Args:
        result: the mask of the same batch (:func:`compute_trust_region_mask`).
        old_per_token_logps: (B, T) log pi_old: TRL's ``old_per_token_logps``, or the loss forward's own log-probs
            (detached) when TRL computes none. Detached here.
        sampling_per_token_logps: (B, T) log pi_roll.
        completion_mask: (B, T) 1 on valid tokens.
        mode, ratio_min, ratio_max: as in :func:`compute_trust_region_mask` (the TIS truncation band).
        ratio_factor: multiply the mask modes' 0/1 mask by pi_old/pi_roll (the default, the seeds' estimator).

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
            seq = torch.where(valid, log_w, 0.0).sum(dim=-1)  # (B,) sum_t log(pi_old / pi_roll)
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
) -> tuple[TrustRegionMaskOutput, torch.Tensor]:
    """The mask of one batch and the (B, T) loss weights of the seeds' estimator, in one call: the batch entry point
    of the math layer (what the trainer's mask evaluation needs).

    Equals :func:`compute_trust_region_mask` on (``per_token_logps``, ``sampling_per_token_logps``,
    ``completion_mask``) followed by :func:`estimator_weights` on (that result, ``old_per_token_logps``,
    ``sampling_per_token_logps``, ``completion_mask``), bit for bit; ``result.token_weight_sum`` is then replaced by
    the per-row sum of the returned weights (what the loss multiplies, so the `trm/token_weight` metric reports it).

    Args:
        per_token_logps: (B, T) log pi of the policy the mask checks (pi_theta, or pi_old for a mask against the
            generation policy).
        sampling_per_token_logps: (B, T) log pi_roll.
        old_per_token_logps: (B, T) log pi_old, the denominator of the loss's ratio r_t.
        completion_mask: (B, T) completion mask (times the tool mask when there is one).
        mode, delta_max, delta_avg, geo_low, geo_high, ratio_min, kl_tok, chi2_tok, delta_kl, nonfinite: as in
            :func:`compute_trust_region_mask`.
        ratio_max: a float or None (a caller with an automatic clip resolves it first, e.g. with
            :func:`seq_tis_auto_log_clip`).
        ratio_factor: as in :func:`estimator_weights`.

    Returns:
        ``(result, weights)``: the :class:`TrustRegionMaskOutput` and the (B, T) weights.
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
    )  # (B, T)
    result.token_weight_sum = weights.sum(dim=-1).to(result.token_weight_sum.dtype)  # (B,) what the loss multiplies
    return result, weights


def seq_tis_auto_log_clip(seq_log_ratio: torch.Tensor) -> float:
    """log C* of the Seq-TIS clip that minimises the bias/variance bound of ``003_*``: C* = sqrt(2 (1 + chi2_seq))
    with chi2_seq = mean_i exp(2 s_i) - 1, so log C* = (log 2 + logsumexp(2 s) - log N) / 2, computed in log space
    (never exponentiating s). ``seq_log_ratio``: (N,) finite s_i of the batch (non-finite entries are ignored).
    C* >= sqrt(2) > 1, so the clip band always contains 1. An empty batch gives log sqrt(2)."""
    s = seq_log_ratio.detach().double()
    s = s[torch.isfinite(s)]
    if s.numel() == 0:
        return 0.5 * math.log(2.0)
    return 0.5 * (math.log(2.0) + float(torch.logsumexp(2.0 * s, dim=0)) - math.log(s.numel()))


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
        :func:`compute_trust_region_mask` rejects and counts the sequence as non-finite. A log-prob of -inf is a
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
