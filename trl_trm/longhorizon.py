"""Exact long-horizon policies: every quantity of the TRM error analysis by dynamic programming over states.

:mod:`trl_trm.tabular` enumerates every prefix, so it stops at horizons of about 5 tokens. Here the next-token
distribution depends on the prefix only through a finite **state**: a deterministic automaton
``s_{t+1} = transition[s_t, y_t]`` (for example the previous token times the state of a small counter) started from a
prompt distribution ``initial``; the terminal reward ``R = reward[s_T]`` lies in [0, 1]. The policy's table may also
depend on the position t (a rollout engine whose numerics depend on where a token sits). Everything the talk
(``shared/seeds/001_*`` §2) defines is then exact and costs O(T · S · V) per policy pair, so T = 4096 takes well under
a second; many pairs are evaluated at once through leading batch dimensions.

Notation (0-indexed positions t = 0..T-1 here; the talk counts from 1). A context c_t = (x, y_<t) is summarised by
its state s_t; two contexts with the same (t, s_t) have the same next-token distribution and the same future, so::

    d_t(s)        = Pr_pi[s_t = s]                                          # context (state) distribution, t = 0..T
    V_t(s)        = E_roll[R | s_t = s],  V_T = reward                      # value of pi_roll
    A_t(s, y)     = V_{t+1}(transition[s, y]) - V_t(s)                      # per-step advantage of pi_roll
    g_t(s)        = sum_y pi_theta(y | t, s) A_t(s, y)
    J(pi)         = sum_s d_T^pi(s) reward(s)
    L             = sum_t sum_s d_t^roll(s) g_t(s)                          # the talk's surrogate L(pi_theta)
    pdi_gain      = sum_t sum_s d_t^theta(s) g_t(s)                         # = J(theta) - J(roll) (PDI, §2.3.1)
    Error         = J(pi_theta) - J(pi_roll) - L
    KL_t(s)       = KL(pi_roll(. | t, s) || pi_theta(. | t, s)),  TV_t(s) likewise (half L1)
    kl_tok_max    = max over (t < T, s reachable at t under either policy) of KL_t(s)     # D_KL^tok,max
    kl_seq        = sum_t sum_s d_t^roll(s) KL_t(s)                         # D_KL^seq by the chain rule (§2.5.0)

``kl_tok_max`` is a maximum over the contexts that either policy can reach (a structural, underflow-free reachability
pass), which is all the proofs need; for full-support policies it equals :mod:`trl_trm.tabular`'s maximum over every
prefix. :func:`from_tabular` (the prefix automaton: one state per prefix) and :func:`to_tabular` convert between the
two representations, so the exact enumeration validates this module (``tests/test_longhorizon.py``).

Sampling (:func:`sample`) is vectorised over sequences and batch, and :func:`path_logprobs` / :func:`path_kl` give the
log-probabilities and the exact per-token KL along sampled sequences: what a rollout engine and a training engine
report, and what ``trm_exact`` checks. Pure torch (float64), no TRL import.

This module holds the exact dynamic programming (:func:`state_distributions`, :func:`values`, :func:`reachable`,
:func:`exact_quantities`, :func:`expected_reward`); the automaton, the policy tables, sampling and the builders are in
:mod:`trl_trm.state_machine` and re-exported here (private helpers `_at`, `_ROW_SUM_ATOL` included), so
``from trl_trm.longhorizon import X`` works for every name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bounds import error_bounds
from .state_machine import _ROW_SUM_ATOL as _ROW_SUM_ATOL
from .state_machine import (
    StateMachine,
    _broadcast,
    check_policy,
    from_tabular,
    gather_context,
    kl_per_context,
    path_kl,
    path_logprobs,
    perturb_state_policy,
    prefix_machine,
    random_machine,
    random_state_policy,
    sample,
    to_tabular,
    tv_per_context,
)
from .state_machine import _at as _at

__all__ = [
    "LongHorizonQuantities",
    "StateMachine",
    "check_policy",
    "exact_quantities",
    "expected_reward",
    "from_tabular",
    "gather_context",
    "kl_per_context",
    "path_kl",
    "path_logprobs",
    "perturb_state_policy",
    "prefix_machine",
    "random_machine",
    "random_state_policy",
    "reachable",
    "sample",
    "state_distributions",
    "to_tabular",
    "tv_per_context",
    "values",
]

_CHUNK_ELEMENTS = 1 << 21  # transition matrices built per chunk of positions: bounds memory, few einsum calls


def _transition_matrices(machine: StateMachine, probs: torch.Tensor, reverse: bool = False):
    """Yield (t, P_t) for t = 0..T-1 (or T-1..0): P_t[s, s'] = sum_y pi(y | t, s) [transition[s, y] = s'], shape
    (*batch, S, S). A homogeneous table gives the same matrix at every t (built once)."""
    onehot = machine.one_hot()  # (S, V, S)
    T, S = machine.horizon, machine.num_states
    order = range(T - 1, -1, -1) if reverse else range(T)
    if probs.shape[-3] == 1:
        step = torch.einsum("...sv,svk->...sk", probs[..., 0, :, :], onehot)  # (*batch, S, S)
        for t in order:
            yield t, step
        return
    per_step = max(1, int(np.prod(probs.shape[:-3])) * S * S)
    chunk = max(1, _CHUNK_ELEMENTS // per_step)
    starts = list(range(0, T, chunk))
    for start in reversed(starts) if reverse else starts:
        stop = min(T, start + chunk)
        mats = torch.einsum("...tsv,svk->...tsk", probs[..., start:stop, :, :], onehot)  # (*batch, n, S, S)
        for t in range(stop - 1, start - 1, -1) if reverse else range(start, stop):
            yield t, mats[..., t - start, :, :]


def state_distributions(machine: StateMachine, probs: torch.Tensor) -> torch.Tensor:
    """d_t for t = 0..T: the state distribution before token t (d_T: the final state).

    Args:
        machine: the environment.
        probs: (*batch, 1 or T, S, V) policy table.

    Returns:
        (*batch, T + 1, S) float64.
    """
    batch = _broadcast(probs.shape[:-3], machine.initial.shape[:-1])
    d = machine.initial.expand(*batch, machine.num_states).unsqueeze(-2)  # (*batch, 1, S)
    out = [d]
    for _, step in _transition_matrices(machine, probs):
        d = d @ step  # (*batch, 1, S)
        out.append(d)
    return torch.cat(out, dim=-2)


def values(machine: StateMachine, probs: torch.Tensor) -> torch.Tensor:
    """V_t(s) = E_pi[R | s_t = s] for t = 0..T (V_T = reward).

    Returns:
        (*batch, T + 1, S) float64.
    """
    batch = _broadcast(probs.shape[:-3], machine.reward.shape[:-1])
    v = machine.reward.expand(*batch, machine.num_states).unsqueeze(-1)  # (*batch, S, 1)
    out = [v]
    for _, step in _transition_matrices(machine, probs, reverse=True):
        v = step @ v  # (*batch, S, 1): V_t(s) = sum_y pi(y | t, s) V_{t+1}(transition[s, y])
        out.append(v)
    return torch.cat(out[::-1], dim=-1).transpose(-1, -2)


def reachable(machine: StateMachine, *probs: torch.Tensor) -> torch.Tensor:
    """Which states can be occupied before each token under at least one of the given policies.

    Structural (supports only), so it does not underflow at long horizons the way d_t > 0 would.

    Returns:
        (*batch, T, S) bool; entry t says whether s_t = s has positive probability, t = 0..T-1.
    """
    support = sum((p > 0).to(torch.float64) for p in probs).clamp(max=1.0)  # (*batch, 1 or T, S, V)
    if support.shape[-3] > 1 and bool((support == support[..., :1, :, :]).all()):
        support = support[..., :1, :, :]  # the same support at every position (e.g. softmax tables): one matrix
    batch = _broadcast(support.shape[:-3], machine.initial.shape[:-1])
    r = (machine.initial > 0).to(torch.float64).expand(*batch, machine.num_states).unsqueeze(-2)  # (*batch, 1, S)
    out = []
    for _, step in _transition_matrices(machine, support):
        out.append(r > 0)
        r = (r @ step).clamp(max=1.0)  # counts of paths, clamped: stays exact 0/1-valued in float64
    return torch.cat(out, dim=-2)


@dataclass(frozen=True)
class LongHorizonQuantities:
    """Exact quantities of one (pi_theta, pi_roll, machine) triple; scalars have the batch shape.

    Attributes:
        j_theta, j_roll: J(pi_theta), J(pi_roll).
        surrogate: J(pi_roll) + L(pi_theta) (the surrogate estimate of J(pi_theta), as in :mod:`trl_trm.tabular`).
        pdi_gain: sum_t E_{d_t^theta}[g_t]; equals j_theta - j_roll by the performance difference identity.
        error: the talk's Error = J(pi_theta) - J(pi_roll) - L(pi_theta).
        kl_tok_max: D_KL^tok,max over contexts reachable under either policy.
        tv_tok_max: D_TV^tok,max over the same contexts.
        kl_seq: D_KL^seq = KL(P^roll || P^theta) via the chain rule.
        horizon: T.
        d_theta, d_roll: (*batch, T + 1, S) context distributions d_t.
        kl_context, tv_context: (*batch, 1 or T, S) per-context KL(pi_roll || pi_theta) and TV.
    """

    j_theta: torch.Tensor
    j_roll: torch.Tensor
    surrogate: torch.Tensor
    pdi_gain: torch.Tensor
    error: torch.Tensor
    kl_tok_max: torch.Tensor
    tv_tok_max: torch.Tensor
    kl_seq: torch.Tensor
    horizon: int
    d_theta: torch.Tensor
    d_roll: torch.Tensor
    kl_context: torch.Tensor
    tv_context: torch.Tensor

    @property
    def surrogate_gain(self) -> torch.Tensor:
        """L(pi_theta), the talk's surrogate (0 at pi_theta = pi_roll)."""
        return self.surrogate - self.j_roll

    def bounds(self) -> dict[str, torch.Tensor]:
        """:func:`trl_trm.bounds.error_bounds` at (T, kl_tok_max, kl_seq): upper bounds on |error|."""
        return error_bounds(torch.tensor(float(self.horizon), dtype=torch.float64), self.kl_tok_max, self.kl_seq)


def exact_quantities(
    machine: StateMachine, probs_theta: torch.Tensor, probs_roll: torch.Tensor
) -> LongHorizonQuantities:
    """J, the surrogate, the PDI gain, the Error, the divergences and the context distributions, exactly.

    Args:
        machine: the environment (terminal reward in [0, 1]).
        probs_theta: (*batch, 1 or T, S, V) training policy table.
        probs_roll: (*batch, 1 or T, S, V) rollout policy table (values and advantages are pi_roll's).

    Returns:
        :class:`LongHorizonQuantities` (differentiable in the tables, except the reachability used by the maxima).
    """
    check_policy(machine, probs_theta, "probs_theta")
    check_policy(machine, probs_roll, "probs_roll")
    T = machine.horizon
    v_roll = values(machine, probs_roll)  # (*batch, T + 1, S)
    d_theta = state_distributions(machine, probs_theta)  # (*batch, T + 1, S)
    d_roll = state_distributions(machine, probs_roll)  # (*batch, T + 1, S)
    q = v_roll[..., 1:, :][..., machine.transition]  # (*batch, T, S, V): Q_t(s, y) = V_{t+1}(transition[s, y])
    adv = q - v_roll[..., :-1, :, None]  # (*batch, T, S, V): A_t(s, y)
    g = (probs_theta * adv).sum(-1)  # (*batch, T, S): g_t(s) (a homogeneous table broadcasts over t)
    gain = (d_roll[..., :-1, :] * g).sum((-2, -1))  # L
    pdi_gain = (d_theta[..., :-1, :] * g).sum((-2, -1))
    j_theta = (d_theta[..., -1, :] * machine.reward).sum(-1)
    j_roll = (d_roll[..., -1, :] * machine.reward).sum(-1)
    kl = kl_per_context(probs_roll, probs_theta)  # (*batch, 1 or T, S)
    tv = tv_per_context(probs_roll, probs_theta)  # (*batch, 1 or T, S)
    reach = reachable(machine, probs_theta, probs_roll)  # (*batch, T, S)
    zero = torch.zeros((), dtype=torch.float64)
    kl_tok_max = torch.where(reach, kl.expand(*reach.shape), zero).amax((-2, -1))
    tv_tok_max = torch.where(reach, tv.expand(*reach.shape), zero).amax((-2, -1))
    kl_seq = (d_roll[..., :-1, :] * kl).sum((-2, -1))  # chain rule
    surrogate = j_roll + gain
    return LongHorizonQuantities(
        j_theta=j_theta,
        j_roll=j_roll,
        surrogate=surrogate,
        pdi_gain=pdi_gain,
        error=j_theta - surrogate,
        kl_tok_max=kl_tok_max,
        tv_tok_max=tv_tok_max,
        kl_seq=kl_seq,
        horizon=T,
        d_theta=d_theta,
        d_roll=d_roll,
        kl_context=kl,
        tv_context=tv,
    )


def expected_reward(machine: StateMachine, probs: torch.Tensor) -> torch.Tensor:
    """J(pi) alone, shape (*batch,). A time-homogeneous table uses the T-th power of its transition matrix
    (O(log T) products); a position-dependent one a backward pass."""
    check_policy(machine, probs)
    if probs.shape[-3] == 1:
        step = torch.einsum("...sv,svk->...sk", probs[..., 0, :, :], machine.one_hot())  # (*batch, S, S)
        power = torch.linalg.matrix_power(step, machine.horizon)  # (*batch, S, S)
        final = (machine.initial.unsqueeze(-2) @ power).squeeze(-2)  # (*batch, S) = d_T
        return (final * machine.reward).sum(-1)
    v0 = values(machine, probs)[..., 0, :]  # (*batch, S)
    return (machine.initial * v0).sum(-1)
