"""A run that cannot learn is a failed run: the counts behind that verdict, and the error it raises.

Pure torch, no TRL import. `TRMTrainer` feeds a :class:`RunHealth` during `train()` (reward values from
`_calculate_rewards`, already gathered over every process; the mask's accept counts, gathered; the gradient norm of
every optimizer step) and, when `train()` returns, warns once and sets `trainer.trm_run_problem` to a one-line reason
when the run could not have learned anything:

- every reward of every completion was non-finite (NaN, inf, or None, which TRL turns into NaN): TRL leaves such
  completions out of the baseline and gives them advantage 0, so the loss and gradient are 0 at every step;
- every sequence was rejected by the mask at every step (accept rate 0 for the whole run): the policy loss has no
  gradient. Not a warning: the thresholds are wrong for this rollout engine, and the run's model is the initial one;
- the gradient was exactly 0 at every optimizer step (e.g. constant rewards within every group, so every advantage
  is 0): the model did not change.

The first of these that applies is reported (they are listed from the most specific to the most general). A Python
user gets a `RuntimeWarning` (the trained state is theirs to inspect); `trl-trm train` (`trl_trm.train.check_trained`)
raises :class:`TrainingError`, prints the line, saves no final model and exits with code 1.
"""

from __future__ import annotations

import torch


class TrainingError(RuntimeError):
    """The run started but cannot give a result (it trained 0 steps, or could not learn): `trl-trm` exits with code
    1. Also importable as `trl_trm.train.TrainingError`."""


def reward_nonfinite_counts(rewards_per_func: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rewards_per_func`` (N, F), one column per reward function (N completions of every process) ->
    ``(per_func, any_row, scored_row)``: (F,) non-finite values per function, the number of completions with at least
    one non-finite reward, and the number with at least one finite reward (0-dim tensors)."""
    nonfinite = ~torch.isfinite(rewards_per_func)  # (N, F)
    return nonfinite.sum(dim=0), nonfinite.any(dim=1).sum(), (~nonfinite).any(dim=1).sum()


def _add(total, value):
    """Sum kept on the device (no synchronisation per step); ``None`` is 0."""
    return value if total is None else total + value


class RunHealth:
    """Counts of one `train()` call (training mode only; evaluation does not train). Tensors stay on their device
    until :meth:`problem` reads them once, at the end."""

    def __init__(self) -> None:
        self.reward_warned = False  # partly non-finite rewards: warned once per trainer
        self.reset()

    def reset(self) -> None:
        self.completions = 0  # train completions whose rewards were computed (every process)
        self.scored = None  # ... with at least one finite reward
        self.nonfinite_by_func = None  # (F,) non-finite reward values per function
        self.sequences = None  # sequences the mask evaluated (with at least one token), every process
        self.accepted = None  # ... that it kept
        self.steps = 0  # optimizer steps
        self.nonzero_grad_steps = None  # ... whose gradient norm was not 0

    def add_rewards(self, rewards_per_func: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's gathered (N, F) rewards; returns ``(per_func, any_row)`` of :func:`reward_nonfinite_counts`."""
        per_func, any_row, scored = reward_nonfinite_counts(rewards_per_func)
        self.completions += rewards_per_func.size(0)
        self.scored = _add(self.scored, scored)
        self.nonfinite_by_func = _add(self.nonfinite_by_func, per_func)
        return per_func, any_row

    def observe_rewards(self, rewards_per_func, train: bool, names: list[str], step: int) -> tuple[int, str | None]:
        """One batch's gathered (N, F) rewards (counted toward the run in training only): the number of completions
        with a non-finite reward, and the once-per-trainer warning about them (else None)."""
        if train:
            per_func, any_row = self.add_rewards(rewards_per_func)
        else:
            per_func, any_row, _ = reward_nonfinite_counts(rewards_per_func)
        nonfinite = int(any_row)
        if nonfinite == 0 or self.reward_warned:
            return nonfinite, None
        self.reward_warned = True
        return nonfinite, nonfinite_reward_warning(names, per_func, nonfinite, rewards_per_func.size(0), step)

    def add_sequences(self, kept: torch.Tensor, counted: torch.Tensor) -> None:
        """One mask evaluation's global (0-dim) counts: sequences kept, sequences with tokens."""
        self.accepted = _add(self.accepted, kept)
        self.sequences = _add(self.sequences, counted)

    def add_grad_norm(self, grad_norm) -> None:
        """One optimizer step's gradient norm (a tensor or a float; NaN counts as non-zero: another failure)."""
        self.steps += 1
        nonzero = grad_norm != 0
        self.nonzero_grad_steps = _add(self.nonzero_grad_steps, nonzero.int() if torch.is_tensor(nonzero) else nonzero)

    def problem(self, reward_names: list[str], mode: str) -> str | None:
        """The one-line reason the run could not learn, or None (also None for a run of 0 steps: reported elsewhere)."""
        if self.steps == 0:
            return None
        if self.completions > 0 and int(self.scored) == 0:
            return (
                f"every reward of the run was non-finite: the reward functions {list(reward_names)} returned no finite "
                f"value (NaN, inf or None) for any of the {self.completions} completions of {self.steps} steps, so "
                "every advantage was 0 and nothing was learned. Make them return one finite float per completion."
            )
        if self.sequences is not None and int(self.sequences) > 0 and int(self.accepted) == 0:
            return (
                f"every sequence was rejected at every one of the {self.steps} steps ({int(self.sequences)} sequences, "
                f"trm/accept_rate 0): the policy loss had no gradient. The thresholds of trm_mode={mode!r} are too "
                "tight for this rollout engine (trm/reject_rate/* names the criterion): loosen them, or set "
                "trm_target_accept_rate; or the engines have drifted apart (vLLM dtype, weight sync)."
            )
        if self.nonzero_grad_steps is not None and int(self.nonzero_grad_steps) == 0:
            return (
                f"the gradient was zero at every one of the {self.steps} optimizer steps: the model did not change. "
                "Usually every advantage was 0: the rewards are constant within each group of num_generations "
                "completions (see frac_reward_zero_std); give rewards that tell the completions of a prompt apart."
            )
        return None


def nonfinite_reward_warning(names: list[str], per_func: torch.Tensor, nonfinite: int, total: int, step: int) -> str:
    """The one warning of a run whose rewards are partly non-finite: how many completions, per reward function."""
    counts = ", ".join(f"{n}: {int(c)}" for n, c in zip(names, per_func.tolist(), strict=True) if c)
    return (
        f"{nonfinite} of {total} completions at step {step} have a non-finite reward (NaN, inf or None; per reward "
        f"function: {counts}). TRL leaves such a reward out of the sum, a completion with no finite reward gets "
        "advantage 0, and the logged reward averages the finite ones only. Counted in trm/reward_nonfinite_frac; "
        "warned once per run. Ignore this only if a function returns None on purpose for completions it does not "
        "apply to."
    )
