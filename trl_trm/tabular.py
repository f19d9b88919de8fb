"""Exact tabular toolkit: every quantity of the TRM error analysis (talk ``shared/seeds/001_*`` §2) by enumeration.

A :class:`TabularPolicy` over a vocabulary of ``V`` tokens and a horizon of ``T`` tokens (one fixed prompt x) stores
the next-token distribution after every prefix. Prefixes of length ``t`` are indexed in base ``V``, most significant
digit first: ``(y_1, ..., y_t) -> sum_s y_s V^(t - s)``, so prefix ``r`` followed by token ``y`` is prefix
``r V + y`` and a row-major ``reshape`` of a (V^t, V) table enumerates the prefixes of length t + 1. All tables are
float64 and may carry leading batch dimensions, so thousands of (pi_theta, pi_roll) pairs are evaluated at once.

:func:`exact_quantities` computes, with ``c_t`` the context before token ``t`` (0-indexed here: step ``t`` of the
code is step ``t + 1`` of the talk) and ``A_t`` the per-step advantage ``Q^roll(c_t, y_t) - V^roll(c_t)``::

    J(pi)      = E_{y ~ pi}[R(y)]
    g_t(c)     = E_{y ~ pi_theta(.|c)}[A_t(c, y)]
    surrogate  = J(pi_roll) + sum_t E_{c ~ d_t^roll}[g_t(c)]        # J(pi_roll) + the talk's L(pi_theta)
    pdi_gain   = sum_t E_{c ~ d_t^theta}[g_t(c)]                    # = J(pi_theta) - J(pi_roll) (PDI, talk §2.3.1)
    error      = J(pi_theta) - surrogate                            # the talk's Error(pi_theta)
    kl_tok_max = max over ALL prefixes c of length 0..T-1 of KL(pi_roll(.|c) || pi_theta(.|c))
    kl_seq     = KL(P^pi_roll || P^pi_theta) over the V^T full sequences

``kl_tok_max`` is the talk's ``max_{t, c_t}``: the maximum over every context the table defines, reachable or not
(with full-support policies all are reachable). It upper-bounds the maximum over the contexts reachable under either
policy, which is all the proofs need, and it is the per-context quantity that TRM's exact mode checks, position by
position, along each sequence it keeps (:func:`per_position_kl`).

:func:`validate_bounds` draws random close pairs and reports the largest |Error| / bound of each bound of
:mod:`trl_trm.bounds`; ``python -m trl_trm.tabular`` prints that report.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch

from .bounds import BOUND_NAMES, error_bounds

_ROW_SUM_ATOL = 1e-9
_ABS_TOL = 1e-12  # float64 roundoff allowance in |Error| <= bound


@dataclass(frozen=True)
class TabularPolicy:
    """An autoregressive policy given by its next-token table for every prefix of a fixed prompt.

    Attributes:
        probs: T float64 tensors; ``probs[t]`` has shape (*batch, V**t, V): row ``r`` is pi(. | prefix r) for the
            prefixes of length t (base-V index, see the module docstring). Rows are non-negative and sum to 1.
    """

    probs: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if len(self.probs) == 0:
            raise ValueError("A TabularPolicy needs at least one step (horizon >= 1).")
        vocab_size = self.probs[0].shape[-1]
        batch_shape = self.probs[0].shape[:-2]
        for t, table in enumerate(self.probs):
            expected = (*batch_shape, vocab_size**t, vocab_size)
            if tuple(table.shape) != expected:
                raise ValueError(f"`probs[{t}]` must have shape {expected}, got {tuple(table.shape)}.")
            if table.dtype != torch.float64:
                raise ValueError(f"`probs[{t}]` must be float64, got {table.dtype}.")
            if bool((table < 0).any()) or not torch.allclose(
                table.sum(-1), torch.ones((), dtype=torch.float64), rtol=0.0, atol=_ROW_SUM_ATOL
            ):
                raise ValueError(f"Every row of `probs[{t}]` must be a probability distribution.")

    @property
    def vocab_size(self) -> int:
        return self.probs[0].shape[-1]

    @property
    def horizon(self) -> int:
        return len(self.probs)

    @property
    def batch_shape(self) -> torch.Size:
        return self.probs[0].shape[:-2]

    def prefix_probs(self) -> tuple[torch.Tensor, ...]:
        """Probabilities of the prefixes of each length under this policy.

        Returns:
            T + 1 tensors; entry t has shape (*batch, V**t). Entries 0..T-1 are the context distributions d_t
            (d_0 = 1 on the empty prefix), entry T is the distribution P^pi over full sequences.
        """
        probs = [torch.ones((*self.batch_shape, 1), dtype=torch.float64, device=self.probs[0].device)]
        for table in self.probs:
            probs.append((probs[-1].unsqueeze(-1) * table).flatten(-2))
        return tuple(probs)


@dataclass(frozen=True)
class ExactQuantities:
    """Exact quantities of one (pi_theta, pi_roll, R) triple; every field has the policies' batch shape.

    Attributes:
        j_theta: J(pi_theta) = E_{pi_theta}[R].
        j_roll: J(pi_roll).
        surrogate: J(pi_roll) + sum_t E_{c ~ d_t^roll}[g_t(c)], the surrogate estimate of J(pi_theta).
        pdi_gain: sum_t E_{c ~ d_t^theta}[g_t(c)]; equals j_theta - j_roll by the performance difference identity.
        error: j_theta - surrogate (the talk's Error = J(pi_theta) - J(pi_roll) - L(pi_theta)).
        kl_tok_max: max over all prefixes c of KL(pi_roll(.|c) || pi_theta(.|c)).
        kl_seq: KL(P^pi_roll || P^pi_theta) over full sequences.
        horizon: T.
    """

    j_theta: torch.Tensor
    j_roll: torch.Tensor
    surrogate: torch.Tensor
    pdi_gain: torch.Tensor
    error: torch.Tensor
    kl_tok_max: torch.Tensor
    kl_seq: torch.Tensor
    horizon: int

    def bounds(self) -> dict[str, torch.Tensor]:
        """:func:`trl_trm.bounds.error_bounds` at (T, kl_tok_max, kl_seq): upper bounds on |error|."""
        return error_bounds(torch.tensor(float(self.horizon), dtype=torch.float64), self.kl_tok_max, self.kl_seq)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, with 0 log 0 = 0, +inf where q = 0 < p, and float64 roundoff below 0
    (about -1e-16 for q ~ p) clamped to the true lower bound 0."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1).clamp(min=0.0)


def _check_pair(pi_theta: TabularPolicy, pi_roll: TabularPolicy) -> None:
    if (pi_theta.vocab_size, pi_theta.horizon) != (pi_roll.vocab_size, pi_roll.horizon):
        raise ValueError(
            f"`pi_theta` (V={pi_theta.vocab_size}, T={pi_theta.horizon}) and `pi_roll` "
            f"(V={pi_roll.vocab_size}, T={pi_roll.horizon}) must share the vocabulary and the horizon."
        )


def kl_per_context(pi_roll: TabularPolicy, pi_theta: TabularPolicy) -> tuple[torch.Tensor, ...]:
    """KL(pi_roll(.|c) || pi_theta(.|c)) for every context.

    Returns:
        T tensors; entry t has shape (*batch, V**t), one value per prefix of length t.
    """
    _check_pair(pi_theta, pi_roll)
    return tuple(_kl(p, q) for p, q in zip(pi_roll.probs, pi_theta.probs, strict=True))


def roll_advantages(pi_roll: TabularPolicy, reward: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-step advantages A_t(c, y) = Q^roll(c, y) - V^roll(c) of a terminal reward (talk §2.3.1).

    Args:
        pi_roll: the policy whose values are used.
        reward: (*batch, V**T) R(y) in [0, 1] for every full sequence (batch dimensions broadcast).

    Returns:
        T tensors; entry t has shape (*batch, V**t, V).
    """
    vocab_size = pi_roll.vocab_size
    value = reward  # V at full sequences is the reward
    advantages = []
    for t in reversed(range(pi_roll.horizon)):
        q = value.unflatten(-1, (vocab_size**t, vocab_size))  # (*batch, V^t, V): Q(c, y) = V(c y)
        value = (pi_roll.probs[t] * q).sum(-1)  # (*batch, V^t)
        advantages.append(q - value.unsqueeze(-1))
    return tuple(reversed(advantages))


def exact_quantities(pi_theta: TabularPolicy, pi_roll: TabularPolicy, reward: torch.Tensor) -> ExactQuantities:
    """Compute J, the surrogate, the PDI gain, the Error and the divergences exactly (see the module docstring).

    Args:
        pi_theta: the training policy.
        pi_roll: the rollout policy (samples, values and advantages come from it).
        reward: (*batch, V**T) or (V**T,) float64 terminal reward in [0, 1], indexed like the full sequences.

    Returns:
        :class:`ExactQuantities` with tensors of the broadcast batch shape (differentiable in the tables).
    """
    _check_pair(pi_theta, pi_roll)
    expected = pi_roll.vocab_size**pi_roll.horizon
    if reward.shape[-1:] != (expected,):
        raise ValueError(f"`reward` must have a last dimension of V**T = {expected}, got shape {tuple(reward.shape)}.")
    if bool(((reward < 0) | (reward > 1)).any()):
        raise ValueError("`reward` must lie in [0, 1] (the bounds assume it).")
    advantages = roll_advantages(pi_roll, reward)
    d_theta = pi_theta.prefix_probs()
    d_roll = pi_roll.prefix_probs()
    j_theta = (d_theta[-1] * reward).sum(-1)
    j_roll = (d_roll[-1] * reward).sum(-1)
    gains = [(table * adv).sum(-1) for table, adv in zip(pi_theta.probs, advantages, strict=True)]  # g_t: (*b, V^t)
    surrogate_gain = sum((d * g).sum(-1) for d, g in zip(d_roll[:-1], gains, strict=True))
    pdi_gain = sum((d * g).sum(-1) for d, g in zip(d_theta[:-1], gains, strict=True))
    kl_tok_max = torch.stack([kl.amax(-1) for kl in kl_per_context(pi_roll, pi_theta)]).amax(0)
    surrogate = j_roll + surrogate_gain
    return ExactQuantities(
        j_theta=j_theta,
        j_roll=j_roll,
        surrogate=surrogate,
        pdi_gain=pdi_gain,
        error=j_theta - surrogate,
        kl_tok_max=kl_tok_max,
        kl_seq=_kl(d_roll[-1], d_theta[-1]),
        horizon=pi_roll.horizon,
    )


def per_position_kl(pi_roll: TabularPolicy, pi_theta: TabularPolicy, sequence: torch.Tensor) -> torch.Tensor:
    """KL(pi_roll(.|y_<t) || pi_theta(.|y_<t)) at every position of given sequences: what a full-vocabulary
    max-KL mask (TRM exact mode) inspects; such a mask keeps y iff ``per_position_kl(...).max() <= delta``.

    Args:
        pi_roll, pi_theta: unbatched policies.
        sequence: (..., L) long token ids in [0, V), L <= T.

    Returns:
        (..., L) float64.
    """
    if pi_roll.batch_shape or pi_theta.batch_shape:
        raise ValueError("`per_position_kl` takes unbatched policies.")
    if sequence.shape[-1] > pi_roll.horizon or bool(((sequence < 0) | (sequence >= pi_roll.vocab_size)).any()):
        raise ValueError(
            f"`sequence` must hold at most T={pi_roll.horizon} token ids in [0, {pi_roll.vocab_size}), "
            f"got shape {tuple(sequence.shape)}."
        )
    kls = kl_per_context(pi_roll, pi_theta)
    prefix = torch.zeros(sequence.shape[:-1], dtype=torch.long, device=sequence.device)
    per_position = []
    for t in range(sequence.shape[-1]):
        per_position.append(kls[t][prefix])
        prefix = prefix * pi_roll.vocab_size + sequence[..., t]
    return torch.stack(per_position, dim=-1) if per_position else kls[0].new_zeros((*sequence.shape[:-1], 0))


def random_policy(
    vocab_size: int,
    horizon: int,
    generator: np.random.Generator,
    concentration: float = 1.0,
    batch_size: int | None = None,
) -> TabularPolicy:
    """A policy with every next-token distribution drawn independently from Dirichlet(concentration * 1_V).

    Small ``concentration`` (e.g. 0.2) gives peaked rows, large (e.g. 10) nearly uniform ones.

    Args:
        vocab_size: V >= 2.
        horizon: T >= 1.
        generator: the numpy random generator (``np.random.default_rng(seed)``).
        concentration: Dirichlet parameter (> 0).
        batch_size: if given, a leading batch dimension of that many independent policies.

    Returns:
        :class:`TabularPolicy` with batch shape () or (batch_size,).
    """
    if vocab_size < 2 or horizon < 1 or not concentration > 0:
        raise ValueError(
            f"Need vocab_size >= 2, horizon >= 1 and concentration > 0, got {vocab_size}, {horizon}, {concentration}."
        )
    batch = () if batch_size is None else (batch_size,)
    alpha = np.full(vocab_size, float(concentration))
    return TabularPolicy(
        tuple(
            torch.from_numpy(generator.dirichlet(alpha, size=(*batch, vocab_size**t)))  # (*batch, V^t, V)
            for t in range(horizon)
        )
    )


def perturb_policy(
    policy: TabularPolicy, scale: float | torch.Tensor, generator: np.random.Generator
) -> TabularPolicy:
    """A nearby policy: pi'(.|c) proportional to pi(.|c) exp(scale * eps), eps ~ N(0, 1) per context and token.

    Zero-probability tokens stay at zero, so the supports agree and every KL is finite.

    Args:
        policy: the policy to perturb.
        scale: logit noise level (>= 0); a float or a tensor of the policy's batch shape (one scale per policy).
        generator: the numpy random generator.

    Returns:
        :class:`TabularPolicy` with the same shape.
    """
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if bool((scale < 0).any()):
        raise ValueError(f"`scale` must be non-negative, got {scale}.")
    scale = scale.reshape(*scale.shape, 1, 1)  # broadcast over (V^t, V)
    tables = []
    for table in policy.probs:
        noise = torch.from_numpy(generator.standard_normal(tuple(table.shape)))
        tables.append(torch.softmax(torch.log(table) + scale * noise, dim=-1))
    return TabularPolicy(tuple(tables))


def random_reward(
    vocab_size: int,
    horizon: int,
    generator: np.random.Generator,
    binary: bool = False,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Terminal rewards R(y) for every full sequence: uniform in [0, 1], or 0/1 with probability 1/2 if ``binary``.

    Returns:
        (V**T,) or (batch_size, V**T) float64.
    """
    shape = (vocab_size**horizon,) if batch_size is None else (batch_size, vocab_size**horizon)
    values = generator.integers(0, 2, size=shape) if binary else generator.random(size=shape)
    return torch.from_numpy(values.astype(np.float64))


def appendix_a8_counterexample(epsilon: float = 1e-3, horizon: int = 2) -> tuple[TabularPolicy, TabularPolicy]:
    """The talk's appendix A.8 counterexample: tiny D_KL^seq, large D_KL^tok,max (no bound in D_KL^seq alone).

    The talk describes it qualitatively ("at one rare context c*, D_KL^tok(c*) = 1 and 0 at every other context,
    Pr(c*) = epsilon under d^roll"); this is a concrete instance. V = 2; both policies emit the first token 1 with
    probability ``epsilon`` and 0 otherwise, and are uniform after every prefix except c* = (1,), where
    pi_roll(.|c*) = (1/2, 1/2) and pi_theta(.|c*) = (q, 1 - q) with q = (1 - sqrt(1 - e^-2)) / 2, the root of
    -log 2 - log(q (1 - q)) / 2 = 1. Then D_KL^tok,max = 1 for every epsilon while D_KL^seq = epsilon * 1 exactly
    (chain rule), so D_KL^seq -> 0 with D_KL^tok,max fixed.

    Args:
        epsilon: Pr(c*) under pi_roll, in (0, 1).
        horizon: T >= 2.

    Returns:
        ``(pi_theta, pi_roll)``.
    """
    if not 0 < epsilon < 1 or horizon < 2:
        raise ValueError(f"Need 0 < epsilon < 1 and horizon >= 2, got epsilon={epsilon}, horizon={horizon}.")
    first = torch.tensor([[1.0 - epsilon, epsilon]], dtype=torch.float64)
    uniform = [torch.full((2**t, 2), 0.5, dtype=torch.float64) for t in range(1, horizon)]
    q = (1.0 - math.sqrt(1.0 - math.exp(-2.0))) / 2.0
    theta_second = uniform[0].clone()
    theta_second[1] = torch.tensor([q, 1.0 - q], dtype=torch.float64)  # prefix (1,) has index 1
    pi_roll = TabularPolicy((first, *uniform))
    pi_theta = TabularPolicy((first.clone(), theta_second, *uniform[1:]))
    return pi_theta, pi_roll


@dataclass(frozen=True)
class BoundValidation:
    """Result of :func:`validate_bounds`.

    Attributes:
        num_cases: number of (pi_theta, pi_roll, R) triples checked.
        vocab_size, horizon: V and T.
        max_ratio: bound name -> largest |Error| / bound over the cases (a case with bound 0 counts as ratio 0 if
            |Error| <= 1e-12, else inf). The bounds hold iff every ratio is <= 1.
        num_violations: bound name -> cases with |Error| > bound + 1e-12.
        max_pdi_residual: largest |J(pi_theta) - J(pi_roll) - pdi_gain|.
    """

    num_cases: int
    vocab_size: int
    horizon: int
    max_ratio: dict[str, float]
    num_violations: dict[str, int]
    max_pdi_residual: float

    def format(self) -> str:
        """One line: V, T, number of cases, the largest ratio per bound, violations and the PDI residual."""
        ratios = ", ".join(f"{name}={self.max_ratio[name]:.4f}" for name in BOUND_NAMES)
        violations = sum(self.num_violations.values())
        return (
            f"V={self.vocab_size} T={self.horizon}: {self.num_cases} cases, max |Error|/bound: {ratios}; "
            f"violations: {violations}; max PDI residual: {self.max_pdi_residual:.1e}"
        )


def validate_bounds(
    num_cases: int, seed: int, vocab_size: int, horizon: int, chunk_size: int = 100
) -> BoundValidation:
    """Check |Error| <= bound for each bound of :func:`trl_trm.bounds.error_bounds` on random close pairs.

    Cases come in chunks of ``chunk_size``; each chunk draws pi_roll from :func:`random_policy` with a
    concentration log-uniform in [0.2, 5], pi_theta = :func:`perturb_policy` with a per-case scale log-uniform in
    [10^-2.5, 10^0.5], and rewards that are uniform in [0, 1] (even chunks) or 0/1 (odd chunks).

    Returns:
        :class:`BoundValidation`.
    """
    generator = np.random.default_rng(seed)
    max_ratio = dict.fromkeys(BOUND_NAMES, 0.0)
    num_violations = dict.fromkeys(BOUND_NAMES, 0)
    max_pdi_residual = 0.0
    for chunk, start in enumerate(range(0, num_cases, chunk_size)):
        size = min(chunk_size, num_cases - start)
        concentration = float(10 ** generator.uniform(math.log10(0.2), math.log10(5.0)))
        pi_roll = random_policy(vocab_size, horizon, generator, concentration, batch_size=size)
        scale = torch.from_numpy(10 ** generator.uniform(-2.5, 0.5, size=size))
        pi_theta = perturb_policy(pi_roll, scale, generator)
        reward = random_reward(vocab_size, horizon, generator, binary=chunk % 2 == 1, batch_size=size)
        quantities = exact_quantities(pi_theta, pi_roll, reward)
        error = quantities.error.abs()
        for name, bound in quantities.bounds().items():
            if name == "best":
                continue
            ratio = torch.where(bound > 0, error / bound, torch.where(error <= _ABS_TOL, 0.0, math.inf))
            max_ratio[name] = max(max_ratio[name], float(ratio.max()))
            num_violations[name] += int((error > bound + _ABS_TOL).sum())
        residual = quantities.j_theta - quantities.j_roll - quantities.pdi_gain
        max_pdi_residual = max(max_pdi_residual, float(residual.abs().max()))
    return BoundValidation(num_cases, vocab_size, horizon, max_ratio, num_violations, max_pdi_residual)


def main(argv: list[str] | None = None) -> None:
    """``python -m trl_trm.tabular [--cases N] [--seed S]``: print :func:`validate_bounds` for several (V, T)."""
    parser = argparse.ArgumentParser(description="Check the TRM error bounds on random exact tabular cases.")
    parser.add_argument("--cases", type=int, default=1000, help="cases per (V, T)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for vocab_size, horizon in [(2, 1), (2, 2), (3, 2), (2, 3), (3, 3), (4, 3), (2, 5), (3, 4)]:
        print(validate_bounds(args.cases, args.seed, vocab_size, horizon).format())


if __name__ == "__main__":
    main()
