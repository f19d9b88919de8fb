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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bounds import error_bounds
from .tabular import TabularPolicy

_ROW_SUM_ATOL = 1e-9


def _broadcast(*shapes: torch.Size) -> tuple[int, ...]:
    """Broadcast batch shapes (numpy's rule; ``torch.broadcast_shapes`` imports the symbolic-shape machinery)."""
    return tuple(np.broadcast_shapes(*(tuple(s) for s in shapes)))


@dataclass(frozen=True)
class StateMachine:
    """The environment: a deterministic automaton over tokens with a terminal reward.

    Attributes:
        transition: (S, V) long; ``transition[s, y]`` is the state after emitting token y in state s.
        reward: (*batch, S) float64 in [0, 1]; the terminal reward R = reward[s_T].
        initial: (*batch, S) float64 distribution of s_0 (the prompt distribution P(x)).
        horizon: T >= 1, the number of generated tokens (every sequence has exactly T tokens).
    """

    transition: torch.Tensor
    reward: torch.Tensor
    initial: torch.Tensor
    horizon: int

    def __post_init__(self) -> None:
        if self.transition.dim() != 2 or self.transition.dtype != torch.long:
            raise ValueError(
                f"`transition` must be an (S, V) long tensor, got {self.transition.dtype} "
                f"{tuple(self.transition.shape)}."
            )
        S = self.transition.shape[0]
        if bool(((self.transition < 0) | (self.transition >= S)).any()):
            raise ValueError(f"`transition` entries must be states in [0, {S}).")
        for name in ("reward", "initial"):
            value = getattr(self, name)
            if value.dtype != torch.float64 or value.shape[-1:] != (S,):
                raise ValueError(
                    f"`{name}` must be float64 with last dimension S = {S}, got {value.dtype} {tuple(value.shape)}."
                )
        if bool(((self.reward < 0) | (self.reward > 1)).any()):
            raise ValueError("`reward` must lie in [0, 1] (the bounds assume it).")
        if bool((self.initial < 0).any()) or not torch.allclose(
            self.initial.sum(-1), torch.ones((), dtype=torch.float64), rtol=0.0, atol=_ROW_SUM_ATOL
        ):
            raise ValueError("`initial` must be a probability distribution over states.")
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"`horizon` must be an int >= 1, got {self.horizon!r}.")

    @property
    def num_states(self) -> int:
        return self.transition.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.transition.shape[1]

    def one_hot(self) -> torch.Tensor:
        """(S, V, S) float64 indicator of ``transition``."""
        return torch.nn.functional.one_hot(self.transition, self.num_states).to(torch.float64)


def check_policy(machine: StateMachine, probs: torch.Tensor, name: str = "probs") -> None:
    """Raise ``ValueError`` unless ``probs`` is a (*batch, 1 or T, S, V) float64 table of distributions."""
    S, V, T = machine.num_states, machine.vocab_size, machine.horizon
    if probs.dtype != torch.float64 or probs.dim() < 3 or tuple(probs.shape[-2:]) != (S, V):
        raise ValueError(
            f"`{name}` must be float64 of shape (*batch, 1 or T, S, V) with (S, V) = ({S}, {V}), got {probs.dtype} "
            f"{tuple(probs.shape)}. Use `probs.unsqueeze(-3)` for a time-homogeneous (S, V) table."
        )
    if probs.shape[-3] not in (1, T):
        raise ValueError(f"`{name}` has {probs.shape[-3]} time steps; use 1 (time-homogeneous) or T = {T}.")
    if bool((probs < 0).any()) or not torch.allclose(
        probs.sum(-1), torch.ones((), dtype=torch.float64), rtol=0.0, atol=_ROW_SUM_ATOL
    ):
        raise ValueError(f"Every row of `{name}` must be a probability distribution.")


def _at(probs: torch.Tensor, t: int) -> torch.Tensor:
    """(*batch, S, V) table at position t of a (*batch, 1 or T, S, V) table."""
    return probs[..., 0 if probs.shape[-3] == 1 else t, :, :]


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


def kl_per_context(probs_roll: torch.Tensor, probs_theta: torch.Tensor) -> torch.Tensor:
    """KL(pi_roll(. | t, s) || pi_theta(. | t, s)) with 0 log 0 = 0 and float64 roundoff clamped at 0.

    Returns:
        (*batch, 1 or T, S): one value per context (t, s); time dimension 1 when both tables are homogeneous.
    """
    return (torch.xlogy(probs_roll, probs_roll) - torch.xlogy(probs_roll, probs_theta)).sum(-1).clamp(min=0.0)


def tv_per_context(probs_roll: torch.Tensor, probs_theta: torch.Tensor) -> torch.Tensor:
    """Total variation (1/2) sum_y |pi_theta(y | t, s) - pi_roll(y | t, s)|, shape (*batch, 1 or T, S)."""
    return 0.5 * (probs_theta - probs_roll).abs().sum(-1)


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


# ---------------------------------------------------------------------------------------------------------------------
# Sampling and per-token quantities along sampled sequences
# ---------------------------------------------------------------------------------------------------------------------


def sample(
    machine: StateMachine, probs: torch.Tensor, num_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw sequences from a policy, vectorised over the batch and the samples (inverse-CDF sampling).

    Args:
        machine: the environment; its ``initial`` must be unbatched or match ``probs``' batch shape.
        probs: (*batch, 1 or T, S, V) policy table.
        num_samples: N sequences per batch element.
        generator: torch random generator.

    Returns:
        ``(states, tokens, final_state)``: (*batch, N, T) long states s_t before each token, (*batch, N, T) long
        tokens y_t, (*batch, N) long final states s_T.
    """
    check_policy(machine, probs)
    batch = _broadcast(probs.shape[:-3], machine.initial.shape[:-1])
    T, S, V = machine.horizon, machine.num_states, machine.vocab_size
    steps = probs.shape[-3]
    init_cdf = machine.initial.expand(*batch, S).cumsum(-1).contiguous()  # (*batch, S)
    u = torch.rand(*batch, num_samples, generator=generator, dtype=torch.float64)
    state = torch.searchsorted(init_cdf, u).clamp(max=S - 1).reshape(-1)  # (B' N,) flattened over batch
    flat_batch = state.numel() // num_samples
    # One flat (B' * steps * S, V) CDF table; a sequence's row at (t, s) is (b * steps + t) * S + s.
    cdf = probs.cumsum(-1).expand(*batch, steps, S, V).reshape(-1, V)
    base = torch.arange(flat_batch).repeat_interleave(num_samples) * (steps * S)  # (B' N,)
    uniforms = torch.rand(T, flat_batch * num_samples, 1, generator=generator, dtype=torch.float64)
    transition = machine.transition.reshape(-1)  # (S V,): next state at s * V + y
    states = torch.empty(T, flat_batch * num_samples, dtype=torch.long)
    tokens = torch.empty(T, flat_batch * num_samples, dtype=torch.long)
    for t in range(T):
        row = base + state if steps == 1 else base + t * S + state  # (B' N,)
        token = (cdf[row] < uniforms[t]).sum(-1).clamp_(max=V - 1)  # (B' N,)
        states[t] = state
        tokens[t] = token
        state = transition[state * V + token]
    shape = (*batch, num_samples, T)
    return states.T.reshape(shape), tokens.T.reshape(shape), state.reshape(*batch, num_samples)


def path_logprobs(probs: torch.Tensor, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | t, s_t) along sequences (what an engine reports for the sampled tokens).

    Args:
        probs: (*batch, 1 or T, S, V) policy table.
        states, tokens: (*batch, N, T) long from :func:`sample`.

    Returns:
        (*batch, N, T) float64 (differentiable in ``probs``).
    """
    V = probs.shape[-1]
    return torch.log(gather_context(probs.flatten(-2), states * V + tokens))


def path_kl(probs_roll: torch.Tensor, probs_theta: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Exact KL(pi_roll(. | t, s_t) || pi_theta(. | t, s_t)) at every position of sampled sequences.

    Returns:
        (*batch, N, T) float64: the ``kl_tok`` that ``trm_exact`` takes (full vocabulary, hence exact).
    """
    return gather_context(kl_per_context(probs_roll, probs_theta), states)


def gather_context(per_context: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Read a (*batch, 1 or T, C) per-position table at (t, index[..., n, t]) for (*batch, N, T) indices in [0, C).

    Returns:
        (*batch, N, T), differentiable in ``per_context``.
    """
    N, T = index.shape[-2:]
    batch = index.shape[:-2]
    steps, C = per_context.shape[-2:]
    table = per_context.expand(*batch, steps, C).reshape(*batch, steps * C)  # (*batch, steps C)
    offset = (torch.arange(T) * C) if steps > 1 else torch.zeros(T, dtype=torch.long)  # (T,)
    flat = (index + offset).reshape(*batch, N * T)  # (*batch, N T)
    return table.gather(-1, flat).reshape(*batch, N, T)


# ---------------------------------------------------------------------------------------------------------------------
# Conversion to and from the exact tabular enumeration
# ---------------------------------------------------------------------------------------------------------------------


def prefix_machine(vocab_size: int, horizon: int, reward: torch.Tensor) -> StateMachine:
    """The prefix automaton: one state per prefix of length 0..T (state index = offset of its length + base-V index,
    as :mod:`trl_trm.tabular` numbers prefixes). The reward sits on the V^T full-sequence states (0 elsewhere).

    Args:
        vocab_size, horizon: V and T.
        reward: (*batch, V**T) float64 in [0, 1], indexed like the full sequences.
    """
    V, T = vocab_size, horizon
    offsets = [sum(V**k for k in range(t)) for t in range(T + 2)]  # offsets[t] = first state of length t
    S = offsets[T + 1]
    transition = torch.zeros(S, V, dtype=torch.long)
    for t in range(T + 1):
        index = torch.arange(V**t)
        if t < T:
            transition[offsets[t] + index] = offsets[t + 1] + index[:, None] * V + torch.arange(V)
        else:
            transition[offsets[t] + index] = (offsets[t] + index)[:, None]  # full sequences: absorbing, never used
    full = torch.zeros(*reward.shape[:-1], S, dtype=torch.float64)
    full[..., offsets[T] :] = reward
    initial = torch.zeros(S, dtype=torch.float64)
    initial[0] = 1.0
    return StateMachine(transition, full, initial, T)


def from_tabular(policy: TabularPolicy, reward: torch.Tensor) -> tuple[StateMachine, torch.Tensor]:
    """The same policy as a state policy on :func:`prefix_machine`.

    Returns:
        ``(machine, probs)`` with probs (*batch, 1, S, V): rows of full-sequence states are uniform (never used).
    """
    V, T = policy.vocab_size, policy.horizon
    machine = prefix_machine(V, T, reward)
    uniform = torch.full((*policy.batch_shape, V**T, V), 1.0 / V, dtype=torch.float64)
    probs = torch.cat([*policy.probs, uniform], dim=-2)  # (*batch, S, V), same state order as the machine
    return machine, probs.unsqueeze(-3)


def to_tabular(machine: StateMachine, probs: torch.Tensor) -> tuple[TabularPolicy, torch.Tensor]:
    """Enumerate a state policy over every prefix (small V^T only), for validation.

    The machine's ``initial`` must be a point mass (one prompt): the tabular toolkit has a single fixed prompt.

    Returns:
        ``(policy, reward)``: a :class:`TabularPolicy` and the (*batch, V**T) reward of every full sequence.
    """
    check_policy(machine, probs)
    if machine.initial.dim() != 1 or int((machine.initial > 0).sum()) != 1:
        raise ValueError("`to_tabular` needs an unbatched point-mass `initial` (a single prompt).")
    T = machine.horizon
    state = machine.initial.argmax().reshape(1)  # (1,) state of the empty prefix
    tables = []
    for t in range(T):
        tables.append(_at(probs, t)[..., state, :])  # (*batch, V^t, V)
        state = machine.transition[state].reshape(-1)  # (V^(t+1),) in base-V order
    return TabularPolicy(tuple(tables)), machine.reward[..., state]


# ---------------------------------------------------------------------------------------------------------------------
# Random instances (property tests, bound validation)
# ---------------------------------------------------------------------------------------------------------------------


def random_machine(
    num_states: int, vocab_size: int, horizon: int, generator: np.random.Generator, binary: bool = False
) -> StateMachine:
    """A random automaton: uniform random transitions, random initial distribution and reward (0/1 if ``binary``)."""
    transition = torch.from_numpy(generator.integers(0, num_states, size=(num_states, vocab_size)))
    reward = generator.integers(0, 2, size=num_states) if binary else generator.random(num_states)
    initial = generator.dirichlet(np.ones(num_states))
    return StateMachine(
        transition.long(), torch.from_numpy(reward.astype(np.float64)), torch.from_numpy(initial), horizon
    )


def random_state_policy(
    machine: StateMachine,
    generator: np.random.Generator,
    concentration: float = 1.0,
    batch_size: int | None = None,
    time_dependent: bool = False,
) -> torch.Tensor:
    """A policy table with rows drawn from Dirichlet(concentration * 1_V): (*batch, 1 or T, S, V) float64."""
    batch = () if batch_size is None else (batch_size,)
    steps = machine.horizon if time_dependent else 1
    alpha = np.full(machine.vocab_size, float(concentration))
    probs = generator.dirichlet(alpha, size=(*batch, steps, machine.num_states))
    return torch.from_numpy(probs).clamp(min=1e-300)  # no exact zeros: every KL stays finite


def perturb_state_policy(
    probs: torch.Tensor, scale: float | torch.Tensor, generator: np.random.Generator
) -> torch.Tensor:
    """pi'(. | t, s) proportional to pi(. | t, s) exp(scale * eps), eps ~ N(0, 1) per context and token.

    Args:
        probs: (*batch, 1 or T, S, V).
        scale: logit noise level, a float or a (*batch,) tensor.
        generator: numpy random generator.

    Returns:
        A table of the same shape (zero-probability tokens stay at zero).
    """
    scale = torch.as_tensor(scale, dtype=torch.float64)
    scale = scale.reshape(*scale.shape, 1, 1, 1)
    noise = torch.from_numpy(generator.standard_normal(tuple(probs.shape)))
    return torch.softmax(torch.log(probs) + scale * noise, dim=-1)
