"""The environment and the policies of the long-horizon simulator (:mod:`trl_trm.longhorizon`): the automaton
(:class:`StateMachine`), the validation of (*batch, 1 or T, S, V) policy tables, the per-context divergences,
sampling along sequences with the log-probabilities and exact per-token KL an engine would report, and the builders
(the prefix automaton that converts to and from :mod:`trl_trm.tabular`, random instances). Pure torch (float64), no
TRL import; every name is also importable from :mod:`trl_trm.longhorizon`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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


def kl_per_context(probs_roll: torch.Tensor, probs_theta: torch.Tensor) -> torch.Tensor:
    """KL(pi_roll(. | t, s) || pi_theta(. | t, s)) with 0 log 0 = 0 and float64 roundoff clamped at 0.

    Returns:
        (*batch, 1 or T, S): one value per context (t, s); time dimension 1 when both tables are homogeneous.
    """
    return (torch.xlogy(probs_roll, probs_roll) - torch.xlogy(probs_roll, probs_theta)).sum(-1).clamp(min=0.0)


def tv_per_context(probs_roll: torch.Tensor, probs_theta: torch.Tensor) -> torch.Tensor:
    """Total variation (1/2) sum_y |pi_theta(y | t, s) - pi_roll(y | t, s)|, shape (*batch, 1 or T, S)."""
    return 0.5 * (probs_theta - probs_roll).abs().sum(-1)


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
