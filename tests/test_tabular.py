"""Tests for `trl_trm.tabular`: an independent brute-force enumeration, the performance difference identity, the
three error bounds on thousands of random exact cases, the per-position KL of a full-vocabulary max-KL mask and the
talk's appendix A.8 counterexample."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_trm.bounds import BOUND_NAMES, error_bounds, minorizer
from trl_trm.tabular import (
    TabularPolicy,
    appendix_a8_counterexample,
    exact_quantities,
    per_position_kl,
    perturb_policy,
    random_policy,
    random_reward,
    validate_bounds,
)

SHAPES = [(2, 1), (2, 2), (3, 2), (2, 3), (3, 3), (4, 3), (2, 5), (3, 4)]  # (V, T), V**T <= 81


# ---------------------------------------------------------------------------------------------------------------------
# Independent brute force: plain Python over explicit prefixes, using only the documented base-V prefix index.
# ---------------------------------------------------------------------------------------------------------------------


def _cond(tables: list, prefix: tuple[int, ...], vocab_size: int) -> list[float]:
    index = 0
    for token in prefix:
        index = index * vocab_size + token
    return tables[len(prefix)][index]


def brute_force(pi_theta: TabularPolicy, pi_roll: TabularPolicy, reward: torch.Tensor) -> dict[str, float]:
    V, T = pi_roll.vocab_size, pi_roll.horizon
    theta = [t.tolist() for t in pi_theta.probs]
    roll = [t.tolist() for t in pi_roll.probs]
    sequences = list(itertools.product(range(V), repeat=T))  # lexicographic = base-V order
    R = dict(zip(sequences, reward.tolist(), strict=True))

    def prob(tables, y):
        return math.prod(_cond(tables, y[:t], V)[y[t]] for t in range(len(y)))

    values: dict[tuple[int, ...], float] = {}

    def value(prefix):  # V^roll(prefix) by recursion
        if prefix not in values:
            values[prefix] = (
                R[prefix]
                if len(prefix) == T
                else sum(p * value((*prefix, y)) for y, p in enumerate(_cond(roll, prefix, V)))
            )
        return values[prefix]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)

    j_theta = sum(prob(theta, y) * R[y] for y in sequences)
    j_roll = sum(prob(roll, y) * R[y] for y in sequences)
    # Surrogate in its importance-sampling form (talk A.4): L = E_roll[sum_t rho_t A_t].
    gain = 0.0
    for y in sequences:
        inner = 0.0
        for t in range(T):
            rho = _cond(theta, y[:t], V)[y[t]] / _cond(roll, y[:t], V)[y[t]]
            inner += rho * (value(y[: t + 1]) - value(y[:t]))
        gain += prob(roll, y) * inner
    prefixes = [p for t in range(T) for p in itertools.product(range(V), repeat=t)]
    kl_tok = {p: kl(_cond(roll, p, V), _cond(theta, p, V)) for p in prefixes}
    return {
        "j_theta": j_theta,
        "j_roll": j_roll,
        "surrogate": j_roll + gain,
        "kl_tok_max": max(kl_tok.values()),
        "kl_seq": kl([prob(roll, y) for y in sequences], [prob(theta, y) for y in sequences]),
        "kl_seq_chain_rule": sum(prob(roll, p) * kl_tok[p] for p in prefixes),  # talk §2.5.0
        "telescoping": max(  # talk A.4: sum_t A_t = R - J(pi_roll) along every sequence
            abs(sum(value(y[: t + 1]) - value(y[:t]) for t in range(T)) - (R[y] - j_roll)) for y in sequences
        ),
    }


def _pair(seed: int, V: int, T: int, concentration: float = 1.0, scale: float = 0.3, batch_size: int | None = None):
    generator = np.random.default_rng(seed)
    pi_roll = random_policy(V, T, generator, concentration, batch_size=batch_size)
    pi_theta = perturb_policy(pi_roll, scale, generator)
    reward = random_reward(V, T, generator, binary=seed % 2 == 0, batch_size=batch_size)
    return pi_theta, pi_roll, reward


def _unbatch(policy: TabularPolicy, i: int) -> TabularPolicy:
    return TabularPolicy(tuple(t[i] for t in policy.probs))


@pytest.mark.parametrize(("V", "T"), SHAPES)
def test_exact_quantities_match_brute_force(V, T):
    pi_theta, pi_roll, reward = _pair(seed=V * 10 + T, V=V, T=T, concentration=0.7, scale=0.5, batch_size=4)
    quantities = exact_quantities(pi_theta, pi_roll, reward)
    assert quantities.error.shape == (4,)
    for i in range(4):
        expected = brute_force(_unbatch(pi_theta, i), _unbatch(pi_roll, i), reward[i])
        for name in ("j_theta", "j_roll", "surrogate", "kl_tok_max", "kl_seq"):
            assert float(getattr(quantities, name)[i]) == pytest.approx(expected[name], rel=1e-12, abs=1e-13), name
        assert expected["kl_seq_chain_rule"] == pytest.approx(expected["kl_seq"], rel=1e-12, abs=1e-13)
        assert expected["telescoping"] < 1e-12
        assert float(quantities.error[i]) == pytest.approx(expected["j_theta"] - expected["surrogate"], abs=1e-12)


def test_kl_direction_is_roll_to_theta():
    # pi_roll = (1/2, 1/2), pi_theta = (0.9, 0.1): KL(roll || theta) = 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1) differs from
    # KL(theta || roll) = 0.9 log 1.8 + 0.1 log 0.2.
    pi_roll = TabularPolicy((torch.tensor([[0.5, 0.5]], dtype=torch.float64),))
    pi_theta = TabularPolicy((torch.tensor([[0.9, 0.1]], dtype=torch.float64),))
    quantities = exact_quantities(pi_theta, pi_roll, torch.tensor([1.0, 0.0], dtype=torch.float64))
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(quantities.kl_tok_max) == pytest.approx(forward) and float(quantities.kl_seq) == pytest.approx(
        forward
    )
    assert abs(forward - (0.9 * math.log(1.8) + 0.1 * math.log(0.2))) > 0.1
    # T = 1: no context shift, so the surrogate is exact: J(theta) = 0.9.
    assert float(quantities.surrogate) == pytest.approx(0.9) and float(quantities.error) == pytest.approx(
        0.0, abs=1e-15
    )


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(SHAPES),
    concentration=st.floats(0.2, 10.0),
    log_scale=st.floats(-4.0, 0.7),
    binary=st.booleans(),
)
def test_pdi_and_bounds_on_random_pairs(seed, shape, concentration, log_scale, binary):
    V, T = shape
    generator = np.random.default_rng(seed)
    pi_roll = random_policy(V, T, generator, concentration, batch_size=20)
    scales = torch.from_numpy(10 ** (log_scale + generator.uniform(-0.5, 0.5, size=20)))
    pi_theta = perturb_policy(pi_roll, scales, generator)
    reward = random_reward(V, T, generator, binary=binary, batch_size=20)
    q = exact_quantities(pi_theta, pi_roll, reward)
    # Performance difference identity (talk §2.3.1), and Error = J(theta) - J(roll) - L.
    assert float((q.j_theta - q.j_roll - q.pdi_gain).abs().max()) <= 1e-10
    torch.testing.assert_close(q.error, q.pdi_gain - (q.surrogate - q.j_roll), rtol=0, atol=1e-12)
    # Chain-rule consequence: D_seq <= T * D_tok,max.
    assert bool((q.kl_seq <= T * q.kl_tok_max + 1e-12).all())
    bounds = error_bounds(T, q.kl_tok_max, q.kl_seq)
    for name in BOUND_NAMES:
        assert bool((q.error.abs() <= bounds[name] + 1e-12).all()), name
    # The minorizer is a lower bound on J(theta) when fed J(roll) + L.
    assert bool((minorizer(q.surrogate, T, q.kl_tok_max, q.kl_seq) <= q.j_theta + 1e-12).all())


def test_validate_bounds_thousands_of_cases(capsys):
    results = [validate_bounds(500, seed=i, vocab_size=V, horizon=T) for i, (V, T) in enumerate(SHAPES)]
    with capsys.disabled():
        print()
        for result in results:
            print(result.format())
    assert sum(r.num_cases for r in results) == 500 * len(SHAPES)
    for result in results:
        assert result.num_violations == dict.fromkeys(BOUND_NAMES, 0)
        assert all(0 <= ratio <= 1 for ratio in result.max_ratio.values()), result.format()
        assert result.max_pdi_residual <= 1e-10
        if result.horizon > 1:  # the check is not vacuous: the error is a visible fraction of each bound
            assert min(result.max_ratio.values()) > 0.01, result.format()


def test_identical_policies_and_one_step_have_zero_error():
    pi_theta, pi_roll, reward = _pair(seed=3, V=3, T=3, batch_size=5)
    q = exact_quantities(pi_roll, pi_roll, reward)
    torch.testing.assert_close(q.error, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(q.surrogate, q.j_roll, rtol=0, atol=1e-15)
    assert float(q.kl_tok_max.abs().max()) == 0.0 and float(q.kl_seq.abs().max()) < 1e-15
    # Nearly identical policies: float64 roundoff must not make a KL negative (error_bounds would reject it).
    q = exact_quantities(perturb_policy(pi_roll, 1e-9, np.random.default_rng(0)), pi_roll, reward)
    assert bool((q.kl_seq >= 0).all()) and bool((q.kl_tok_max >= 0).all())
    assert bool((q.error.abs() <= q.bounds()["best"] + 1e-12).all())
    pi_theta, pi_roll, reward = _pair(seed=4, V=4, T=1, scale=2.0, batch_size=5)
    q = exact_quantities(pi_theta, pi_roll, reward)
    assert float(q.kl_tok_max.min()) > 0.01
    torch.testing.assert_close(q.error, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-15)


def test_surrogate_is_tangent_to_j_at_pi_roll():
    # Talk §2.2.5: grad L = grad J at pi_theta = pi_roll, but not away from it.
    generator = np.random.default_rng(0)
    pi_roll = random_policy(3, 3, generator)
    reward = random_reward(3, 3, generator)
    logits = [torch.log(t).clone().requires_grad_(True) for t in pi_roll.probs]

    def grads(shift: float):
        pi_theta = TabularPolicy(tuple(torch.softmax(lg + shift * torch.arange(3.0), -1) for lg in logits))
        q = exact_quantities(pi_theta, pi_roll, reward)
        g_j = torch.autograd.grad(q.j_theta, logits, retain_graph=True)
        g_l = torch.autograd.grad(q.surrogate, logits)
        return torch.cat([g.flatten() for g in g_j]), torch.cat([g.flatten() for g in g_l])

    g_j, g_l = grads(0.0)
    assert float(g_j.abs().max()) > 1e-3
    torch.testing.assert_close(g_l, g_j, rtol=0, atol=1e-12)
    g_j, g_l = grads(1.0)
    assert float((g_l - g_j).abs().max()) > 1e-3


@pytest.mark.parametrize(("V", "T"), [(2, 3), (3, 3), (4, 2)])
def test_full_vocabulary_max_kl_mask(V, T):
    pi_theta, pi_roll, _ = _pair(seed=V + T, V=V, T=T, scale=0.4)
    # Same first-token distribution, so that the per-sequence maximum is not the root's KL for every sequence.
    pi_theta = TabularPolicy((pi_roll.probs[0], *pi_theta.probs[1:]))
    sequences = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (V^T, T): every sequence
    theta = [t.tolist() for t in pi_theta.probs]
    roll = [t.tolist() for t in pi_roll.probs]
    # Full-vocabulary log-probs along each sequence, as the rollout and training engines would report them.
    logp_roll, logp_theta = (
        torch.tensor(
            [[_cond(tables, tuple(y[:t]), V) for t in range(T)] for y in sequences.tolist()], dtype=torch.float64
        ).log()
        for tables in (roll, theta)
    )  # (N, T, V) each
    reference = torch.nn.functional.kl_div(logp_theta, logp_roll, reduction="none", log_target=True).sum(-1)  # (N, T)
    kl = per_position_kl(pi_roll, pi_theta, sequences)
    torch.testing.assert_close(kl, reference, rtol=1e-12, atol=1e-15)
    # Every context of length < T lies on some sequence, so the largest per-position KL is D_tok,max.
    q = exact_quantities(pi_theta, pi_roll, torch.zeros(V**T, dtype=torch.float64))
    assert float(kl.max()) == pytest.approx(float(q.kl_tok_max), rel=1e-12)
    delta = float(reference.amax(-1).median())
    keep = reference.amax(-1) <= delta  # the TRM exact-mode mask, from the engines' log-probs
    assert 0 < int(keep.sum()) < len(sequences)
    assert bool((kl[keep].amax(-1) <= delta + 1e-12).all())
    assert bool((kl[~keep].amax(-1) > delta - 1e-12).all())
    assert per_position_kl(pi_roll, pi_theta, sequences[:, :1]).shape == (len(sequences), 1)


def test_per_position_kl_validates():
    pi_theta, pi_roll, _ = _pair(seed=0, V=2, T=2)
    with pytest.raises(ValueError, match="sequence"):
        per_position_kl(pi_roll, pi_theta, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="sequence"):
        per_position_kl(pi_roll, pi_theta, torch.tensor([0, 1, 1]))
    batched = _pair(seed=0, V=2, T=2, batch_size=2)
    with pytest.raises(ValueError, match="unbatched"):
        per_position_kl(batched[1], batched[0], torch.tensor([0, 1]))


@pytest.mark.parametrize("horizon", [2, 4])
@pytest.mark.parametrize("epsilon", [0.1, 1e-3, 1e-6])
def test_appendix_a8_counterexample(epsilon, horizon):
    pi_theta, pi_roll = appendix_a8_counterexample(epsilon, horizon)
    reward = random_reward(2, horizon, np.random.default_rng(0), binary=True)
    q = exact_quantities(pi_theta, pi_roll, reward)
    expected = brute_force(pi_theta, pi_roll, reward)
    # Talk A.8: D_tok,max = 1 regardless of epsilon, D_seq = epsilon * 1 -> 0.
    assert float(q.kl_tok_max) == pytest.approx(1.0, abs=1e-12)
    assert expected["kl_tok_max"] == pytest.approx(1.0, abs=1e-12)
    assert float(q.kl_seq) == pytest.approx(epsilon, rel=1e-9)
    assert expected["kl_seq"] == pytest.approx(epsilon, rel=1e-6)
    # Hence Pinsker-Marginal stays put while Mixed shrinks like sqrt(epsilon), and still bounds the error.
    bounds = q.bounds()
    assert float(bounds["pinsker_marginal"]) == pytest.approx(4 / 3 * horizon**1.5)
    assert float(bounds["mixed"]) == pytest.approx(2 * horizon * math.sqrt(epsilon), rel=1e-6)
    assert abs(float(q.error)) <= float(bounds["mixed"])


def test_tabular_policy_validation():
    good = torch.full((2, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        TabularPolicy((torch.full((1, 2), 0.5, dtype=torch.float64), torch.full((3, 2), 0.5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="probability distribution"):
        TabularPolicy((torch.tensor([[0.6, 0.6]], dtype=torch.float64), good))
    with pytest.raises(ValueError, match="float64"):
        TabularPolicy((torch.tensor([[0.5, 0.5]]),))
    pi_theta, pi_roll, reward = _pair(seed=1, V=2, T=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        exact_quantities(pi_theta, pi_roll, reward + 1.0)
    with pytest.raises(ValueError, match="horizon"):
        exact_quantities(random_policy(2, 3, np.random.default_rng(0)), pi_roll, reward)
    with pytest.raises(ValueError, match="epsilon"):
        appendix_a8_counterexample(0.0)
