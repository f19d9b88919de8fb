"""Reference blocks that `bench_masking.py` times side by side with `compute_trust_region_mask`: TRL 1.16's
`vllm_importance_sampling_mode="sequence_mask"` correction, written here from its documented math (not imported: the
block sits inside `GRPOTrainer._generate_and_score_completions` and cannot be called on its own).

TRL 1.16, per batch (`grpo_trainer.py`, the `if self.use_vllm and self.vllm_importance_sampling_correction` blocks):

* the ratio: ``diff = nan_to_num((old - sampling) * mask)``, ``ratio_i = exp(sum_t diff)``, set to 0 outside
  ``[clip_min, clip_max]`` (defaults: no lower bound, 3.0), a (B, 1) tensor broadcast into the loss;
* its metrics: ``|old - sampling|`` over the valid, non-NaN tokens (boolean indexing, then mean and max:
  ``sampling/sampling_logp_difference/{mean,max}``) and the ratio's min / mean / max
  (``sampling/importance_sampling_ratio/*``), each read back with ``.item()`` (TRL also gathers them across processes,
  which one process does not need).

Our mask's counterpart is one call of `compute_trust_region_mask`, which returns every per-sequence statistic the
trainer logs (D_max, D_avg, k1, k3 max, geo ratio, product ratio, chi^2 and surrogate sums, lengths, finiteness,
per-criterion rejections) besides the mask and the (B, T) weights.
"""

from __future__ import annotations

import math

import torch

TRL_CLIP_MIN: float | None = None  # GRPOConfig.vllm_importance_sampling_clip_min default (TRL 1.16)
TRL_CLIP_MAX: float = 3.0  # GRPOConfig.vllm_importance_sampling_clip_max default (TRL 1.16)


def trl_sequence_mask(old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 1) TRL 1.16 `sequence_mask` weight: exp(sum_t log old/sampling), 0 outside [clip_min, clip_max]."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)  # (B, T)
    ratio = torch.exp(diff.sum(dim=-1, keepdim=True))  # (B, 1)
    low = -math.inf if TRL_CLIP_MIN is None else TRL_CLIP_MIN
    return ratio.masked_fill((ratio < low) | (ratio > TRL_CLIP_MAX), 0.0)


def trl_sequence_mask_with_metrics(
    old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, list[float]]:
    """The (B, 1) weight and the five metrics TRL 1.16 logs with it (read back as Python floats, as TRL does)."""
    ratio = trl_sequence_mask(old, sampling, mask)  # (B, 1)
    delta = torch.abs(old - sampling)  # (B, T)
    delta = delta[mask.bool() & ~torch.isnan(delta)]  # (n_valid,)
    zero = torch.tensor(0.0)
    metrics = [
        (delta.mean() if delta.numel() else zero).item(),
        (delta.max() if delta.numel() else zero).item(),
    ]
    flat = ratio.flatten()  # (B,)
    metrics += [flat.min().item(), flat.mean().item(), flat.max().item()]
    return ratio, metrics
