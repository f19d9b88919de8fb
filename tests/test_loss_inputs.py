"""`trl_trm.loss_inputs`: how the (B, T) weights enter TRL's loss inputs (advantages, reference log-probs, entropies),
and which π_old the estimator uses."""

from __future__ import annotations

import torch

from trl_trm.loss_inputs import detach_unweighted, old_logps_for, weight_loss_inputs


def test_advantages_are_scaled_per_token_and_the_input_tensor_is_not_modified():
    advantages = torch.tensor([1.0, -2.0])
    inputs = {"advantages": advantages}
    weights = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    weight_loss_inputs(inputs, weights, torch.zeros(2, 3), beta=0.0)
    assert torch.equal(inputs["advantages"], torch.tensor([[1.0, 0.5, 0.0], [-0.0, -0.0, -0.0]]))
    assert torch.equal(advantages, torch.tensor([1.0, -2.0]))  # TRL's buffered batch is reused across iterations
    per_token = {"advantages": torch.ones(2, 3)}
    weight_loss_inputs(per_token, weights, torch.zeros(2, 3), beta=0.0)
    assert torch.equal(per_token["advantages"], weights)


def test_reference_logps_of_zero_weight_tokens_become_the_current_ones_only_with_beta():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-5.0, -6.0]])
    weights = torch.tensor([[0.0, 2.0]])
    inputs = {"advantages": torch.ones(1), "ref_per_token_logps": ref}
    weight_loss_inputs(inputs, weights, logps, beta=0.0)
    assert inputs["ref_per_token_logps"] is ref
    weight_loss_inputs(inputs, weights, logps, beta=0.1)
    assert torch.equal(inputs["ref_per_token_logps"], torch.tensor([[-1.0, -6.0]]))
    assert not inputs["ref_per_token_logps"].requires_grad


def test_zero_weight_entropies_keep_their_value_but_no_gradient():
    entropies = torch.tensor([[0.3, 0.7]], requires_grad=True)
    out = detach_unweighted(entropies, torch.tensor([[0.0, 1.0]]))
    assert torch.equal(out, entropies.detach())
    out.sum().backward()
    assert torch.equal(entropies.grad, torch.tensor([[0.0, 1.0]]))
    assert detach_unweighted(entropies, None) is entropies
    assert detach_unweighted(None, torch.ones(1, 2)) is None


def test_old_logps_prefer_the_processed_twin_then_trls_then_the_detached_forward():
    mask_logps = torch.tensor([[-1.0]], requires_grad=True)
    trl_old, processed_old = torch.tensor([[-2.0]]), torch.tensor([[-3.0]])
    assert old_logps_for({"old_per_token_logps": trl_old, "trm_old_logps": processed_old}, mask_logps) is processed_old
    assert old_logps_for({"old_per_token_logps": trl_old, "trm_old_logps": None}, mask_logps) is trl_old
    fallback = old_logps_for({"old_per_token_logps": None}, mask_logps)
    assert torch.equal(fallback, mask_logps.detach()) and not fallback.requires_grad
