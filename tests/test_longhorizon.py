"""Tests for `trl_trm.longhorizon`: equality with the exact tabular enumeration (both directions), the three error
bounds on thousands of random long-horizon cases, sampling and per-token quantities along sampled sequences."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_trm import longhorizon as lh
from trl_trm import tabular as tb
from trl_trm.bounds import BOUND_NAMES, error_bounds, minorizer

FIELDS = ("j_theta", "j_roll", "surrogate", "pdi_gain", "error", "kl_tok_max", "kl_seq")


def _point_mass_machine(num_states, vocab_size, horizon, generator, binary=False):
    machine = lh.random_machine(num_states, vocab_size, horizon, generator, binary=binary)
    start = torch.zeros(num_states, dtype=torch.float64)
    start[int(generator.integers(num_states))] = 1.0
    return lh.StateMachine(machine.transition, machine.reward, start, horizon)


@pytest.mark.parametrize(("V", "T"), [(2, 1), (2, 3), (3, 3), (4, 3), (2, 5), (3, 4)])
def test_prefix_automaton_equals_tabular(V, T):
    generator = np.random.default_rng(V * 7 + T)
    pi_roll = tb.random_policy(V, T, generator, concentration=0.7, batch_size=6)
    pi_theta = tb.perturb_policy(pi_roll, 0.5, generator)
    reward = tb.random_reward(V, T, generator, batch_size=6)
    expected = tb.exact_quantities(pi_theta, pi_roll, reward)
    machine, probs_roll = lh.from_tabular(pi_roll, reward)
    _, probs_theta = lh.from_tabular(pi_theta, reward)
    got = lh.exact_quantities(machine, probs_theta, probs_roll)
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-14, msg=name)
    # The chain-rule D_seq is the sequence-level KL: d_T is the distribution over full sequences here.
    full_roll, full_theta = got.d_roll[..., -1, -(V**T) :], got.d_theta[..., -1, -(V**T) :]
    direct = (torch.xlogy(full_roll, full_roll) - torch.xlogy(full_roll, full_theta)).sum(-1)
    torch.testing.assert_close(got.kl_seq, direct, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("time_dependent", [False, True])
@pytest.mark.parametrize(("S", "V", "T"), [(3, 2, 4), (5, 3, 3), (6, 2, 6)])
def test_state_policy_equals_its_enumeration(S, V, T, time_dependent):
    # The other direction: a (possibly position-dependent) state policy, enumerated prefix by prefix.
    generator = np.random.default_rng(S * 100 + V * 10 + T)
    machine = _point_mass_machine(S, V, T, generator)
    probs_roll = lh.random_state_policy(machine, generator, 0.8, batch_size=4, time_dependent=time_dependent)
    probs_theta = lh.perturb_state_policy(probs_roll, 0.6, generator)
    got = lh.exact_quantities(machine, probs_theta, probs_roll)
    pi_roll, reward = lh.to_tabular(machine, probs_roll)
    pi_theta, _ = lh.to_tabular(machine, probs_theta)
    expected = tb.exact_quantities(pi_theta, pi_roll, reward)
    for name in ("j_theta", "j_roll", "surrogate", "pdi_gain", "error", "kl_seq"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-14, msg=name)
    # Tabular maximises over every prefix; here only reachable (t, s) count. Every prefix is reachable (full
    # support), so they agree.
    torch.testing.assert_close(got.kl_tok_max, expected.kl_tok_max, rtol=0, atol=1e-15)
    assert float(got.error.abs().max()) > 1e-6  # not a vacuous comparison


def test_kl_tok_max_ignores_unreachable_states():
    # State 2 is never reached: its (huge) KL must not count, while it would in a max over all states.
    transition = torch.tensor([[0, 1], [1, 0], [2, 2]])
    machine = lh.StateMachine(
        transition, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 0, 0]).double(), 8
    )
    roll = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.99, 0.01]], dtype=torch.float64)
    theta = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.01, 0.99]], dtype=torch.float64)
    q = lh.exact_quantities(machine, theta.unsqueeze(0), roll.unsqueeze(0))
    expected = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4)
    assert float(q.kl_tok_max) == pytest.approx(expected, rel=1e-12)
    assert float(q.kl_context.max()) > 4.0
    assert float(q.tv_tok_max) == pytest.approx(0.1, rel=1e-12)


def _random_case(generator, S, V, T, batch, time_dependent, log_scale):
    machine = lh.random_machine(S, V, T, generator, binary=bool(generator.integers(2)))
    concentration = float(10 ** generator.uniform(math.log10(0.3), math.log10(5.0)))
    probs_roll = lh.random_state_policy(machine, generator, concentration, batch, time_dependent=time_dependent)
    scale = torch.from_numpy(10 ** (log_scale + generator.uniform(-1.0, 0.5, size=batch)))
    return machine, lh.perturb_state_policy(probs_roll, scale, generator), probs_roll


def _check_identities_and_bounds(machine, probs_theta, probs_roll):
    q = lh.exact_quantities(machine, probs_theta, probs_roll)
    T = machine.horizon
    assert float((q.j_theta - q.j_roll - q.pdi_gain).abs().max()) <= 1e-11  # PDI
    assert bool((q.kl_seq <= T * q.kl_tok_max * (1 + 1e-12) + 1e-12).all())  # equality when S = 1
    assert bool((q.tv_tok_max <= torch.sqrt(q.kl_tok_max / 2) + 1e-12).all())  # Pinsker, per context
    bounds = q.bounds()
    ratios = {}
    for name in BOUND_NAMES:
        assert bool((q.error.abs() <= bounds[name] + 1e-12).all()), name
        ratios[name] = float((q.error.abs() / bounds[name]).max())
    assert bool((minorizer(q.surrogate, T, q.kl_tok_max, q.kl_seq) <= q.j_theta + 1e-12).all())
    return q, ratios


def test_bounds_hold_on_thousands_of_long_horizon_cases(capsys):
    generator = np.random.default_rng(2024)
    num_cases = 0
    worst = dict.fromkeys(BOUND_NAMES, 0.0)
    # (S, V, T, cases, time-dependent): 3,000 cases from T = 2 to T = 1024.
    grid = [
        (4, 2, 2, 500, True),
        (6, 3, 8, 500, True),
        (8, 3, 64, 500, False),
        (8, 4, 256, 500, False),
        (12, 3, 1024, 500, False),
        (5, 2, 128, 500, True),
    ]
    for S, V, T, cases, time_dependent in grid:
        for start in range(0, cases, 250):
            log_scale = float(generator.uniform(-3.0, 0.0))
            case = _random_case(generator, S, V, T, min(250, cases - start), time_dependent, log_scale)
            _, ratios = _check_identities_and_bounds(*case)
            worst = {k: max(worst[k], ratios[k]) for k in BOUND_NAMES}
            num_cases += case[1].shape[0]
    with capsys.disabled():
        print(
            f"\n{num_cases} long-horizon cases, max |Error|/bound: "
            + ", ".join(f"{k}={v:.3g}" for k, v in worst.items())
        )
    assert num_cases == 3000
    assert 1e-4 < max(worst.values()) <= 1.0  # the check is not vacuous


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    S=st.integers(1, 10),
    V=st.integers(2, 5),
    T=st.sampled_from([1, 2, 3, 17, 100, 333]),
    time_dependent=st.booleans(),
    log_scale=st.floats(-4.0, 0.5),
)
def test_bounds_property(seed, S, V, T, time_dependent, log_scale):
    generator = np.random.default_rng(seed)
    q, _ = _check_identities_and_bounds(*_random_case(generator, S, V, T, 8, time_dependent, log_scale))
    if T == 1:  # no context shift: the surrogate is exact
        assert float(q.error.abs().max()) <= 1e-14


def test_identical_policies_have_zero_error_at_t4096():
    generator = np.random.default_rng(0)
    machine = lh.random_machine(16, 4, 4096, generator)
    probs = lh.random_state_policy(machine, generator, batch_size=3)
    q = lh.exact_quantities(machine, probs, probs)
    assert float(q.kl_tok_max.max()) == 0.0 and float(q.kl_seq.max()) == 0.0
    assert float(q.error.abs().max()) <= 1e-13  # float64 roundoff of 4096-term sums only
    torch.testing.assert_close(q.d_theta.sum(-1), torch.ones(3, 4097, dtype=torch.float64), rtol=0, atol=1e-12)


def test_t4096_is_seconds_and_error_grows_with_horizon():
    torch.set_num_threads(1)
    generator = np.random.default_rng(1)
    machine = lh.random_machine(16, 4, 4096, generator)
    probs_roll = lh.random_state_policy(machine, generator, batch_size=8, time_dependent=True)
    probs_theta = lh.perturb_state_policy(probs_roll, 0.05, generator)
    start = time.perf_counter()
    q = lh.exact_quantities(machine, probs_theta, probs_roll)
    elapsed = time.perf_counter() - start
    assert elapsed < 30.0, elapsed  # ~1 s on an idle core; generous for a shared machine
    bounds = q.bounds()
    assert bool((q.error.abs() <= bounds["best"]).all())
    # Truncating the same pair to T = 16 gives a smaller D_seq (chain rule: partial sums of non-negative terms).
    short = lh.StateMachine(machine.transition, machine.reward, machine.initial, 16)
    q16 = lh.exact_quantities(short, probs_theta[..., :16, :, :], probs_roll[..., :16, :, :])
    assert bool((q16.kl_seq < q.kl_seq).all())


def test_surrogate_is_tangent_to_j_at_pi_roll():
    generator = np.random.default_rng(3)
    machine = lh.random_machine(6, 3, 50, generator)
    probs_roll = lh.random_state_policy(machine, generator)
    logits = torch.log(probs_roll).clone().requires_grad_(True)

    def grads(shift):
        probs_theta = torch.softmax(logits + shift * torch.arange(3.0, dtype=torch.float64), -1)
        q = lh.exact_quantities(machine, probs_theta, probs_roll)
        g_j = torch.autograd.grad(q.j_theta, logits, retain_graph=True)[0]
        g_l = torch.autograd.grad(q.surrogate, logits)[0]
        return g_j, g_l

    g_j, g_l = grads(0.0)
    assert float(g_j.abs().max()) > 1e-3
    torch.testing.assert_close(g_l, g_j, rtol=0, atol=1e-12)
    g_j, g_l = grads(1.0)
    assert float((g_l - g_j).abs().max()) > 1e-3


def test_sampling_matches_exact_quantities():
    generator = np.random.default_rng(5)
    machine = lh.random_machine(6, 3, 200, generator)
    probs_roll = lh.random_state_policy(machine, generator, batch_size=2, time_dependent=True)
    probs_theta = lh.perturb_state_policy(probs_roll, 0.3, generator)
    states, tokens, final = lh.sample(machine, probs_roll, 4000, torch.Generator().manual_seed(0))
    assert states.shape == tokens.shape == (2, 4000, 200) and final.shape == (2, 4000)
    # States follow the automaton.
    torch.testing.assert_close(machine.transition[states[..., :-1], tokens[..., :-1]], states[..., 1:])
    torch.testing.assert_close(machine.transition[states[..., -1], tokens[..., -1]], final)
    q = lh.exact_quantities(machine, probs_theta, probs_roll)
    rewards = machine.reward[final]  # (2, N)
    assert bool(((rewards.mean(-1) - q.j_roll).abs() <= 5 * rewards.std(-1) / math.sqrt(4000) + 1e-9).all())
    # Empirical state occupancy at t = 100 matches d_100 (within 5 sigma per state).
    occupancy = torch.nn.functional.one_hot(states[..., 100], 6).double().mean(-2)  # (2, S)
    d = q.d_roll[..., 100, :]
    assert bool(((occupancy - d).abs() <= 5 * torch.sqrt(d * (1 - d) / 4000) + 1e-3).all())
    # Along the samples: the mean of sum_t KL_t is D_seq (chain rule), the IS form of L matches the exact L.
    kl = lh.path_kl(probs_roll, probs_theta, states)  # (2, N, T)
    sums = kl.sum(-1)
    assert bool(((sums.mean(-1) - q.kl_seq).abs() <= 5 * sums.std(-1) / math.sqrt(4000)).all())
    logp_roll = lh.path_logprobs(probs_roll, states, tokens)
    logp_theta = lh.path_logprobs(probs_theta, states, tokens)
    v = lh.values(machine, probs_roll)  # (2, T + 1, S)
    all_states = torch.cat([states, final.unsqueeze(-1)], -1)  # (2, N, T + 1)
    v_path = v.unsqueeze(1).expand(2, 4000, 201, 6).gather(-1, all_states.unsqueeze(-1)).squeeze(-1)
    per_sample = (torch.exp(logp_theta - logp_roll) * (v_path[..., 1:] - v_path[..., :-1])).sum(-1)  # (2, N)
    assert bool(((per_sample.mean(-1) - q.surrogate_gain).abs() <= 5 * per_sample.std(-1) / math.sqrt(4000)).all())


def test_path_quantities_against_tabular_per_position_kl():
    generator = np.random.default_rng(7)
    pi_roll = tb.random_policy(3, 3, generator)
    pi_theta = tb.perturb_policy(pi_roll, 0.4, generator)
    reward = tb.random_reward(3, 3, generator)
    machine, probs_roll = lh.from_tabular(pi_roll, reward)
    _, probs_theta = lh.from_tabular(pi_theta, reward)
    states, tokens, _ = lh.sample(machine, probs_roll, 50, torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        lh.path_kl(probs_roll, probs_theta, states),
        tb.per_position_kl(pi_roll, pi_theta, tokens),
        rtol=1e-12,
        atol=1e-15,
    )
    # Log-probs along the path: the product over t is the tabular sequence probability.
    seq_prob = pi_roll.prefix_probs()[-1]  # (V^T,)
    index = tokens[:, 0] * 9 + tokens[:, 1] * 3 + tokens[:, 2]
    torch.testing.assert_close(lh.path_logprobs(probs_roll, states, tokens).sum(-1).exp(), seq_prob[index])


def test_validation_errors():
    generator = np.random.default_rng(0)
    machine = lh.random_machine(3, 2, 5, generator)
    good = lh.random_state_policy(machine, generator)
    with pytest.raises(ValueError, match="time steps"):
        lh.exact_quantities(machine, good.expand(3, 3, 2).clone(), good)
    with pytest.raises(ValueError, match=r"\(S, V\)"):
        lh.exact_quantities(machine, good[..., :1], good)
    with pytest.raises(ValueError, match="probability distribution"):
        lh.exact_quantities(machine, good * 2, good)
    with pytest.raises(ValueError, match="float64"):
        lh.exact_quantities(machine, good.float(), good)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lh.StateMachine(machine.transition, machine.reward + 1.0, machine.initial, 5)
    with pytest.raises(ValueError, match="states in"):
        lh.StateMachine(machine.transition + 3, machine.reward, machine.initial, 5)
    with pytest.raises(ValueError, match="horizon"):
        lh.StateMachine(machine.transition, machine.reward, machine.initial, 0)
    with pytest.raises(ValueError, match="point-mass"):
        lh.to_tabular(machine, good)


def test_error_bounds_at_long_horizon_match_bounds_module():
    generator = np.random.default_rng(11)
    machine = lh.random_machine(8, 3, 2048, generator)
    probs_roll = lh.random_state_policy(machine, generator, batch_size=2)
    q = lh.exact_quantities(machine, lh.perturb_state_policy(probs_roll, 0.01, generator), probs_roll)
    expected = error_bounds(2048, float(q.kl_tok_max[0]), float(q.kl_seq[0]))
    for name in (*BOUND_NAMES, "best"):
        assert float(q.bounds()[name][0]) == pytest.approx(expected[name], rel=1e-12)


@pytest.mark.parametrize("time_dependent", [False, True])
def test_expected_reward_matches_exact_quantities(time_dependent):
    # The homogeneous fast path (matrix power) and the backward pass agree with the forward d_T.
    generator = np.random.default_rng(13)
    machine = lh.random_machine(7, 3, 300, generator)
    probs = lh.random_state_policy(machine, generator, batch_size=3, time_dependent=time_dependent)
    q = lh.exact_quantities(machine, probs, probs)
    torch.testing.assert_close(lh.expected_reward(machine, probs), q.j_theta, rtol=0, atol=1e-13)
