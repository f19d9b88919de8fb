"""The `trm/` logging window: per-sequence statistics of every micro-batch in, one value per `trm/` key out.

Pure torch, no TRL import. The trainer evaluates the mask once per micro-batch, gathers the batch's per-sequence
statistics across processes (:func:`pack_sequence_stats`, O(B) communication) and hands them to a
:class:`MetricsWindow`; when TRL logs, :meth:`MetricsWindow.flush` reduces everything since the last log at once, each
statistic with the reduction its name states (:func:`~trl_trm.masking.summarize_mask_stats`): a max is the window's
max over every micro-batch, process and iteration, a quartile is over the window's sequences. TRL's `log` then
averages one-element lists, so the values pass unchanged.

Besides the mask statistics the window keeps, per mode (`"train"` / `"eval"`): the top-k coverage counts
(`trm/topk_missing_frac`), the Seq-TIS clips of `trm_ratio_max="auto"` (`trm/seq_tis_clip`), and, with adaptive
thresholds, the thresholds in force (`trm/delta_max`, `trm/delta_avg`) and the current optimizer step's global accept
counts (:meth:`MetricsWindow.step_accept_rate`), and the completions with a non-finite reward
(`trm/reward_nonfinite_frac`, logged once a run has seen one).
"""

from __future__ import annotations

import math

import torch

from .masking import TrustRegionMaskOutput, summarize_mask_stats

MODES = ("train", "eval")


def sequence_statistics(
    result: TrustRegionMaskOutput, advantages: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A batch's (B,) per-sequence statistics: :meth:`TrustRegionMaskOutput.sequence_stats`, plus the advantage A_i
    (for the surrogate estimate) when ``advantages`` is given; a per-token (B, T) advantage is averaged over ``mask``."""
    stats = result.sequence_stats()
    if advantages is not None:
        if advantages.dim() == 2:
            valid = mask.to(advantages.dtype)
            advantages = (advantages * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)
        stats["advantage"] = advantages.detach()
    return stats


def pack_sequence_stats(stats: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """``(names, packed)``: the statistics as one (B, K) float64 tensor (one collective gathers them all), column j
    holding ``stats[names[j]]``."""
    names = list(stats)
    return names, torch.stack([stats[n].double() for n in names], dim=1)  # (B, K)


def _mean(values: list[float]) -> float:
    """TRL's `log` average of a metric list: NaN entries dropped, NaN (logged as None) when nothing is left."""
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else float("nan")


class MetricsWindow:
    """The `trm/` statistics since the last log, per mode, reduced once by :meth:`flush`.

    ``head_vocab``: the LM head's vocabulary size V, set by the trainer when a capture of the head has run (None
    before). With `trm_rollout_topk = k` it tells exact per-token KLs (k >= V) from lower bounds (metrics ending in
    `_lb`).
    """

    def __init__(self) -> None:
        self.head_vocab: int | None = None
        self._sequences: dict[str, list[dict[str, torch.Tensor]]] = {m: [] for m in MODES}
        self._topk_counts = {m: [0.0, 0.0] for m in MODES}  # short, valid
        self._clips: dict[str, list[float]] = {m: [] for m in MODES}
        self._thresholds: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
        self._step = [0.0, 0.0]  # kept, counted
        self._rewards = {m: [0, 0] for m in MODES}  # completions with a non-finite reward, completions
        self._reward_nonfinite_seen = {m: False for m in MODES}  # `trm/reward_nonfinite_frac` is logged from then on
        self._routing: dict[str, torch.Tensor | None] = {m: None for m in MODES}  # (2 + L,) MoE routing counts

    def add_sequences(self, mode: str, names: list[str], gathered: torch.Tensor) -> None:
        """One micro-batch's statistics, gathered from every process: (N, K) with column j holding ``names[j]``."""
        self._sequences[mode].append({n: gathered[:, j].cpu() for j, n in enumerate(names)})

    def count_step(
        self, mode: str, names: list[str], gathered: torch.Tensor, delta_max: float | None, delta_avg: float | None
    ) -> None:
        """Adaptive thresholds: add a micro-batch's global accept counts to the current optimizer step (sequences
        with tokens only) and log the thresholds in force (`None`, a criterion that is off, logs as NaN)."""
        counted = gathered[:, names.index("length")] > 0
        self._step[0] += float(gathered[counted, names.index("keep")].sum())
        self._step[1] += float(counted.sum())
        for key, value in (("trm/delta_max", delta_max), ("trm/delta_avg", delta_avg)):
            self._thresholds[mode].setdefault(key, []).append(value or float("nan"))

    def step_accept_rate(self) -> float | None:
        """The accept rate of the optimizer step that just ended (None without counted sequences); starts a new step."""
        (kept, counted), self._step = self._step, [0.0, 0.0]
        return kept / counted if counted > 0 else None

    def add_topk_coverage(self, mode: str, counts: torch.Tensor) -> None:
        """``counts`` (2,): global [tokens whose rollout top-k is short, valid tokens] of one batch."""
        self._topk_counts[mode][0] += float(counts[0])
        self._topk_counts[mode][1] += float(counts[1])

    def add_rewards(self, mode: str, nonfinite: int, total: int) -> None:
        """One batch's global counts: completions with at least one non-finite reward, completions. Normal runs log
        nothing new: `trm/reward_nonfinite_frac` appears from the first window with a non-finite reward on."""
        self._rewards[mode][0] += nonfinite
        self._rewards[mode][1] += total
        self._reward_nonfinite_seen[mode] |= nonfinite > 0

    def add_routing(self, mode: str, counts: torch.Tensor) -> None:
        """One batch's global MoE routing counts (2 + L,): counted tokens, tokens whose routing disagrees in at least
        one layer, then per layer (`trl_trm.routing.TrainerRouting.counts`)."""
        counts = counts.detach().double().cpu()
        held = self._routing[mode]
        self._routing[mode] = counts if held is None or held.shape != counts.shape else held + counts

    def add_clip(self, mode: str, clip: float) -> None:
        """One batch's Seq-TIS clip C* (`trm_ratio_max="auto"`)."""
        self._clips[mode].append(clip)

    def flush(self, mode: str, topk: int = 0) -> dict[str, float]:
        """Reduce and clear the window of ``mode``: one value per `trm/` key (nothing for an empty window). ``topk``:
        `trm_rollout_topk`; per-token KLs are lower bounds unless a head of ``head_vocab <= topk`` ids was seen."""
        window, self._sequences[mode] = self._sequences[mode], []
        out: dict[str, float] = {}
        if window:
            names = [n for n in window[0] if all(n in entry for entry in window)]
            stats = {n: torch.cat([entry[n] for entry in window]) for n in names}
            # Per-token KLs from a top-k with k < V are lower bounds: their metrics end in `_lb`.
            lower_bound = self.head_vocab is None or topk < self.head_vocab
            out.update(summarize_mask_stats(stats, kl_tok_lower_bound=lower_bound))
        (short, valid), self._topk_counts[mode] = self._topk_counts[mode], [0.0, 0.0]
        if valid > 0:
            out["trm/topk_missing_frac"] = short / valid
        clips, self._clips[mode] = self._clips[mode], []
        if clips:
            out["trm/seq_tis_clip"] = sum(clips) / len(clips)
        (nonfinite, total), self._rewards[mode] = self._rewards[mode], [0, 0]
        if self._reward_nonfinite_seen[mode] and total > 0:
            out["trm/reward_nonfinite_frac"] = nonfinite / total
        routing, self._routing[mode] = self._routing[mode], None
        if routing is not None and routing[0] > 0:
            out["trm/routing_disagree_frac"] = float(routing[1] / routing[0])
            out.update(
                {f"trm/routing_disagree_frac/layer_{i}": float(v / routing[0]) for i, v in enumerate(routing[2:])}
            )
        thresholds, self._thresholds[mode] = self._thresholds[mode], {}
        out.update({key: _mean(values) for key, values in thresholds.items()})
        return out
