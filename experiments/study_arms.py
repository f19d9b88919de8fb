"""The mismatch study's arms beyond one `TRMConfig` each (`experiments/mismatch_study.py`): TRL's `sequence_mask`
emulation and the two controls of TRM (docs/mismatch-study.md).

* ``trm_random``: keep a random subset of the sequences at TRM's accept rate of the same step (from the `trm` run of
  the same mismatch kind and seed), no selection at all: what masking alone, at TRM's sample count, does.
* ``trm_equal``: `trm` with the batch (prompts per step; `num_generations` unchanged) scaled by 1 / TRM's mean accept
  rate of the same kind and seed, so that it trains on about as many accepted sequences as `none` does.
"""

from __future__ import annotations

import math
from typing import Any

CONTROLS = ("trm_random", "trm_equal")
"""Arms that need the `trm` run of the same (kind, seed) first."""

MAX_BATCH_SCALE = 4  # trm_equal never runs more than this many times the base batch


def trl_sequence_mask_trainer():
    """`TRMTrainer` whose mask is TRL's `sequence_mask` importance sampling (grpo_trainer.py, 1.16, the
    `vllm_importance_sampling_correction` block): ratio_i = exp(sum_t (log pi_old - log pi_roll)) per sequence,
    set to 0 outside [clip_min, clip_max] (defaults: None, 3.0), and the per-token loss is MULTIPLIED by that ratio
    (not by 1). The config is `seq_mis` with C = 3 (same keep set, same metrics); this override only turns the 0/1
    mask into ratio * keep. Seam: `TRMTrainer._trm_weights` (the loss weights of one batch's mask). pi_old here is
    the policy at the loss, which equals TRL's pi_old because generation happens every optimizer step."""
    from trl_trm import TRMTrainer

    class TRLSequenceMaskTrainer(TRMTrainer):
        def _trm_weights(self, result, old_logps, sampling, mask, ratio_max):
            ratio = result.seq_log_ratio.exp().unsqueeze(-1)  # (B, 1), zero weight already outside [0, 3]
            return result.weights * ratio  # (B, T): the 0/1 sequence mask times the product ratio

    return TRLSequenceMaskTrainer


def random_mask_trainer(rates: list[float], seed: int):
    """`TRMTrainer` (run with `trm_mode="trm"`, so the mask's statistics are still computed and logged) whose loss
    keeps each finite sequence with probability ``rates[global_step]`` (TRM's accept rate at that step), drawn
    afresh at every evaluation of the mask, with weight 1 on its tokens: no selection. `trm/accept_rate` reports the
    random keep. Seam: `TRMTrainer._trm_weights`."""
    import torch

    from trl_trm import TRMTrainer

    if not rates:
        raise ValueError("trm_random needs TRM's per-step accept rates of the same kind and seed (run `trm` first).")

    class RandomMaskTrainer(TRMTrainer):
        _study_generator: torch.Generator | None = None

        def _trm_weights(self, result, old_logps, sampling, mask, ratio_max):
            if self._study_generator is None:
                self._study_generator = torch.Generator().manual_seed(7_919 + seed)
            rate = rates[min(self.state.global_step, len(rates) - 1)]
            draw = torch.rand(result.keep.shape, generator=self._study_generator).to(result.keep.device)  # (B,)
            result.keep = (draw < rate) & result.finite  # (B,) what `_trm_log` reports as accepted
            return mask.to(result.weights.dtype) * result.keep.unsqueeze(-1).to(result.weights.dtype)  # (B, T)

    return RandomMaskTrainer


def equal_count_batch(batch: int, num_generations: int, accept_rate: float) -> int:
    """The batch of ``trm_equal``: ``batch`` / ``accept_rate`` rounded up to whole groups, at most
    :data:`MAX_BATCH_SCALE` x ``batch``."""
    if not 0.0 <= accept_rate <= 1.0 or math.isnan(accept_rate):
        raise ValueError(f"accept_rate must lie in [0, 1], got {accept_rate!r}.")
    want = batch / max(accept_rate, 1.0 / MAX_BATCH_SCALE)
    return min(MAX_BATCH_SCALE * batch, math.ceil(want / num_generations - 1e-9) * num_generations)


def control_setting(method: str, trm_run: dict[str, Any], batch: int, num_generations: int) -> dict[str, Any]:
    """What a control arm takes from the `trm` run of its (kind, seed): the per-step rates or the scaled batch."""
    rates = [r for r in trm_run["curves"].get("trm/accept_rate", []) if not math.isnan(r)]
    if method == "trm_random":
        return {"rates": rates}
    if method == "trm_equal":
        mean = sum(rates) / len(rates) if rates else 1.0
        return {"batch": equal_count_batch(batch, num_generations, mean)}
    raise ValueError(f"{method!r} is not a control arm: one of {list(CONTROLS)}.")
