"""How a batch's (B, T) TRM weights enter TRL's loss: by editing the loss's inputs, not its code. Pure torch.

TRL 1.16 has no per-token loss-weight hook inside `GRPOTrainer._compute_loss` (it multiplies by
`importance_sampling_ratio` only on the vLLM path). `TRMTrainer` acts at the one point inside the loss where π_θ's
log-probs exist and the advantages have not been read yet (`_get_per_token_logps_and_entropies`), on a shallow copy
of the batch:

* :func:`weight_loss_inputs` scales the advantages by the weights. Every TRL loss type is linear in the advantage with
  a non-negative factor (-min(c1·w·A, c2·w·A) = -w·min(c1·A, c2·A) for w >= 0), so this multiplies the per-token policy
  loss (and its gradient) by the weights, and the loss normaliser (`loss_type`'s own, over the whole batch, rejected
  sequences included) is untouched. With `beta != 0` the reference log-prob of a zero-weight token is set to its
  current (detached) one, so its KL term is zero in value and gradient.
* :func:`detach_unweighted` detaches the entropy of a zero-weight token: it keeps its value (TRL's `entropy` metric,
  the adaptive entropy controller and `top_entropy_quantile` see the policy's entropy) but the entropy bonus
  (`entropy_coef`, `use_adaptive_entropy`) cannot move it. A rejected sequence then contributes exactly zero.
"""

from __future__ import annotations

from typing import Any

import torch


def old_logps_for(inputs: dict[str, Any], mask_logps: torch.Tensor) -> torch.Tensor:
    """(B, T) π_old for the ρ factor: TRL's `old_per_token_logps` when it exists (its processed twin `trm_old_logps`
    when the sampler's processors are active), else ``mask_logps`` detached (TRL's own rule, `num_iterations=1`)."""
    old = inputs.get("trm_old_logps")
    if old is None:
        old = inputs.get("old_per_token_logps")
    if old is None:
        old = mask_logps.detach()
    return old


def rollout_as_old_policy(inputs: dict[str, Any]) -> None:
    """`trm_old_policy="rollout"`: π_old := π_roll in ``inputs`` (a shallow copy of TRL's batch), so TRL's ratio is
    π_θ/π_roll, clipped against the rollout policy, and the ρ factor π_old/π_roll of :func:`old_logps_for` is 1."""
    sampling = inputs.get("sampling_per_token_logps")
    if sampling is None:
        raise ValueError(
            "`trm_old_policy='rollout'` needs the rollout log-probs, and this batch has none (a `rollout_func` must "
            "return `logprobs`). Return them, or use `trm_old_policy='trainer'`."
        )
    inputs.pop("trm_old_logps", None)
    inputs["old_per_token_logps"] = sampling  # (B, T)


def weight_loss_inputs(inputs: dict[str, Any], weights: torch.Tensor, per_token_logps: torch.Tensor, beta: float):
    """Scale ``inputs["advantages"]`` ((B,) or (B, T)) by the (B, T) ``weights`` in place, and with ``beta != 0`` set
    the reference log-probs of zero-weight tokens to ``per_token_logps`` (detached). ``inputs``: a shallow copy of TRL's
    batch (the buffered one is reused across `num_iterations`)."""
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    inputs["advantages"] = advantages * weights.to(advantages.dtype)  # (B, T)
    if beta != 0.0 and "ref_per_token_logps" in inputs:
        inputs["ref_per_token_logps"] = torch.where(
            weights != 0, inputs["ref_per_token_logps"], per_token_logps.detach()
        )


def detach_unweighted(entropies: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) ``entropies`` with the entries of zero-weight tokens detached (same values, no gradient)."""
    if weights is None or entropies is None:
        return entropies
    return torch.where(weights == 0, entropies.detach(), entropies)
