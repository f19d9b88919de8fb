"""`trl_trm.state_machine`: the automaton's and the policy tables' validation, the builders, and sampling along
sequences (the exact dynamic programming on top of them is tests/test_longhorizon.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_trm import state_machine as sm


def _machine(S=3, V=2, T=4, seed=0):
    return sm.random_machine(S, V, T, np.random.default_rng(seed))


def test_random_builders_give_valid_tables():
    machine = _machine()
    rng = np.random.default_rng(1)
    for time_dependent in (False, True):
        probs = sm.random_state_policy(machine, rng, batch_size=5, time_dependent=time_dependent)
        assert probs.shape == (5, machine.horizon if time_dependent else 1, 3, 2) and probs.dtype == torch.float64
        sm.check_policy(machine, probs)
        sm.check_policy(machine, sm.perturb_state_policy(probs, torch.linspace(0.0, 1.0, 5), rng))
    assert torch.equal(sm.perturb_state_policy(probs, 0.0, rng), torch.softmax(torch.log(probs), -1))


def test_machine_and_policy_errors_name_the_field():
    machine = _machine()
    with pytest.raises(ValueError, match=r"`transition` entries must be states"):
        sm.StateMachine(machine.transition + 5, machine.reward, machine.initial, 4)
    with pytest.raises(ValueError, match=r"`reward` must lie in \[0, 1\]"):
        sm.StateMachine(machine.transition, machine.reward + 2.0, machine.initial, 4)
    with pytest.raises(ValueError, match=r"`horizon` must be an int >= 1"):
        sm.StateMachine(machine.transition, machine.reward, machine.initial, 0)
    with pytest.raises(ValueError, match=r"`probs_x` has 2 time steps"):
        sm.check_policy(machine, torch.full((2, 3, 2), 0.5, dtype=torch.float64), "probs_x")
    with pytest.raises(ValueError, match=r"Every row of `probs` must be a probability distribution"):
        sm.check_policy(machine, torch.full((1, 3, 2), 0.6, dtype=torch.float64))


def test_sampled_paths_follow_the_automaton():
    machine = _machine(S=4, V=3, T=6, seed=2)
    probs = sm.random_state_policy(machine, np.random.default_rng(3), batch_size=2, time_dependent=True)
    states, tokens, final = sm.sample(machine, probs, 50, torch.Generator().manual_seed(0))
    assert states.shape == tokens.shape == (2, 50, 6) and final.shape == (2, 50)
    nxt = machine.transition[states, tokens]  # (2, 50, 6) the state after each token
    assert torch.equal(nxt[..., :-1], states[..., 1:]) and torch.equal(nxt[..., -1], final)
    logps = sm.path_logprobs(probs, states, tokens)
    expected = torch.log(probs[torch.arange(2)[:, None, None], torch.arange(6), states, tokens])
    torch.testing.assert_close(logps, expected, rtol=0, atol=0)
    assert torch.equal(sm.path_kl(probs, probs, states), torch.zeros(2, 50, 6, dtype=torch.float64))


def test_prefix_machine_round_trip():
    machine, probs = sm.from_tabular(*_tabular())
    policy, reward = sm.to_tabular(machine, probs)
    original, original_reward = _tabular()
    for a, b in zip(policy.probs, original.probs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(reward, original_reward)


def _tabular():
    from trl_trm import tabular as tb

    rng = np.random.default_rng(4)
    return tb.random_policy(2, 3, rng), tb.random_reward(2, 3, rng)
