"""The environment and the mismatch families of the simulator sweep (issue 17): a "gate" task whose fragile states
matter for reward, and rollout policies keyed by state.

Environment (a :class:`trl_trm.longhorizon.StateMachine`, V = 4 tokens, T tokens per sequence). The state is a
counter q = (sum of counting tokens) mod 3, a flag f (bonus collected) and whether the sequence stands at a gate::

    normal(q, f) --y in {0, 1, 2}--> normal((q + y) mod 3, f)
    normal(q, f) --y = 3 (key)-----> gate(q, f)                    # the fragile states
    gate(q, f)   --y = 0 (fatal)---> dead                          # absorbing, reward 0
    gate(q, f)   --y in {1, 2, 3}--> normal(q, 1)                  # bonus collected

Terminal reward 0.2 + 0.2 [q = 0] + 0.6 f for a live sequence (at most 1), 0 dead; prompts start at normal(q, 0)
with q uniform. The best policy opens the gate once (reward 0.8-1.0): passing through a fragile state is what the
reward asks for. The initial policy gives the key probability kappa in every normal state (kappa solved by the exact
dynamic programming so that the expected number of gate visits per sequence is lambda) and the fatal token
probability ``FATAL_INIT`` = 5e-4 at the gate.

Families (each gives pi_roll from the current pi_theta; every table is time-homogeneous, keyed by state):

* ``collapse`` (support collapse): at a gate the engine puts ``COLLAPSE_MASS`` = 0.9 (plus its share of the rest) on
  the fatal token that pi_theta gives <= 1e-3, so |log rho| ~ 7 there; elsewhere pi_roll = pi_theta.
* ``noise`` (the null family): at a gate the engine adds a fixed N(0, 3^2) logit perturbation per seed (the previous
  sweep's i.i.d. flips, now keyed by the same fragile states); elsewhere pi_roll = pi_theta.
* ``stale`` (drift under reuse): pi_roll = pi_theta of k updates ago, together with K epochs per batch.
* ``exact``: pi_roll = pi_theta (the no-mismatch reference of the positive control).
"""

from __future__ import annotations

import math

import torch

from trl_trm import longhorizon as lh

VOCAB = 4
KEY, FATAL = 3, 0
COUNTER = 3
NUM_STATES = 4 * COUNTER + 1  # normal(q, f): q + 3 f; gate(q, f): 6 + q + 3 f; dead: 12
DEAD = NUM_STATES - 1
GATES = tuple(range(2 * COUNTER, 4 * COUNTER))
FATAL_INIT = 5e-4  # pi_theta(fatal | gate) at initialisation (<= 1e-3: the support-collapse condition)
COLLAPSE_MASS = 0.9  # the engine's extra mass on the fatal token at a gate
NOISE_SIGMA = 3.0  # null family: logit perturbation at the gates
FAMILIES = ("exact", "collapse", "noise", "stale")


def normal(q: int, f: int) -> int:
    return q + COUNTER * f


def gate(q: int, f: int) -> int:
    return 2 * COUNTER + q + COUNTER * f


def build_machine(horizon: int) -> lh.StateMachine:
    """The gate environment of the module docstring."""
    transition = torch.full((NUM_STATES, VOCAB), DEAD, dtype=torch.long)
    reward = torch.zeros(NUM_STATES, dtype=torch.float64)
    for q in range(COUNTER):
        for f in range(2):
            for y in range(3):
                transition[normal(q, f), y] = normal((q + y) % COUNTER, f)
            transition[normal(q, f), KEY] = gate(q, f)
            for y in (1, 2, 3):
                transition[gate(q, f), y] = normal(q, 1)
            value = 0.2 + 0.2 * (q == 0) + 0.6 * f
            reward[normal(q, f)] = reward[gate(q, f)] = value
    initial = torch.zeros(NUM_STATES, dtype=torch.float64)
    initial[[normal(q, 0) for q in range(COUNTER)]] = 1.0 / COUNTER
    return lh.StateMachine(transition, reward, initial, horizon)


def logits_for(kappa: float, batch: int) -> torch.Tensor:
    """(batch, S, V) initial logits: key probability kappa in normal states, the rest uniform; fatal token
    ``FATAL_INIT`` at a gate, the rest uniform."""
    logits = torch.zeros(batch, NUM_STATES, VOCAB, dtype=torch.float64)
    normals = [normal(q, f) for q in range(COUNTER) for f in range(2)]
    logits[:, normals, KEY] = math.log(kappa * 3 / (1 - kappa))
    logits[:, list(GATES), FATAL] = math.log(FATAL_INIT * 3 / (1 - FATAL_INIT))
    return logits


def gate_visits(machine: lh.StateMachine, probs: torch.Tensor) -> torch.Tensor:
    """Expected number of fragile-state (gate) visits per sequence, exactly: sum_{t < T} d_t(gates). (*batch,)"""
    d = lh.state_distributions(machine, probs)  # (*batch, T + 1, S)
    return d[..., :-1, list(GATES)].sum((-2, -1))


def kappa_for(lam: float, horizon: int) -> float:
    """The key probability whose initial policy visits a gate ``lam`` times per sequence (bisection on the exact DP;
    the visit count rises monotonically with kappa)."""
    machine = build_machine(horizon)
    lo, hi = 1e-9, 0.5
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        visits = float(gate_visits(machine, torch.softmax(logits_for(mid, 1), -1).unsqueeze(1))[0])
        lo, hi = (mid, hi) if visits < lam else (lo, mid)
    return math.sqrt(lo * hi)


class Family:
    """pi_roll for one run group (R runs, one per seed), from the current detached logits (R, S, V)."""

    def __init__(self, kind: str, seeds: list[int], stale_k: int = 0):
        if kind not in FAMILIES:
            raise ValueError(f"unknown family {kind!r}; choose one of {FAMILIES}")
        self.kind, self.stale_k = kind, stale_k
        self.history: list[torch.Tensor] = []
        if kind == "noise":  # one fixed perturbation per seed: the same for every method of that seed
            z = [
                torch.randn(len(GATES), VOCAB, generator=torch.Generator().manual_seed(5000 + s), dtype=torch.float64)
                for s in seeds
            ]
            self.delta = torch.zeros(len(seeds), NUM_STATES, VOCAB, dtype=torch.float64)
            self.delta[:, list(GATES)] = NOISE_SIGMA * torch.stack(z)

    def roll_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(R, 1, S, V) pi_roll for (R, S, V) detached logits of pi_theta (call once per update)."""
        self.history.append(logits.clone())
        probs = torch.softmax(logits, -1)  # (R, S, V)
        if self.kind == "collapse":
            spike = torch.zeros_like(probs)
            spike[:, list(GATES), FATAL] = 1.0
            gates = torch.zeros(NUM_STATES, 1, dtype=torch.float64)
            gates[list(GATES)] = 1.0
            probs = probs * (1 - COLLAPSE_MASS * gates) + COLLAPSE_MASS * gates * spike
        elif self.kind == "noise":
            probs = torch.softmax(logits + self.delta, -1)
        elif self.kind == "stale":
            probs = torch.softmax(self.history[max(0, len(self.history) - 1 - self.stale_k)], -1)
        return probs.unsqueeze(1)


def crn_sample(machine: lh.StateMachine, probs: torch.Tensor, uniforms: torch.Tensor):
    """Inverse-CDF sampling from given uniforms (common random numbers): equal policies and equal uniforms give equal
    sequences. probs (R, 1, S, V); uniforms (R, n, T + 1) (column 0 draws the prompt). Returns (states, tokens,
    final): (R, n, T), (R, n, T), (R, n)."""
    R, n, T1 = uniforms.shape
    T = T1 - 1
    init_cdf = machine.initial.cumsum(-1)  # (S,)
    state = torch.searchsorted(
        init_cdf.expand(R * n, -1).contiguous(), uniforms[..., :1].reshape(R * n, 1).contiguous()
    )
    state = state.clamp(max=machine.num_states - 1).reshape(R, n)  # (R, n)
    cdf = probs[:, 0].cumsum(-1)  # (R, S, V)
    cdf[..., -1] = 1.0 + 1e-12  # rounding never lets a uniform pass the last bucket
    states = torch.empty(R, n, T, dtype=torch.long)
    tokens = torch.empty(R, n, T, dtype=torch.long)
    rows = torch.arange(R).unsqueeze(-1)  # (R, 1)
    for t in range(T):
        row_cdf = cdf[rows, state]  # (R, n, V)
        token = (uniforms[..., t + 1 : t + 2] >= row_cdf).sum(-1).clamp(max=VOCAB - 1)  # (R, n)
        states[..., t], tokens[..., t] = state, token
        state = machine.transition[state, token]
    return states, tokens, state


def uniforms_for(seeds: list[int], step: int, n: int, horizon: int) -> torch.Tensor:
    """(R, n, T + 1) uniforms seeded by (seed, step): every method of a seed draws the same numbers at a step."""
    rows = [
        torch.rand(n, horizon + 1, generator=torch.Generator().manual_seed(1_000_003 * s + step), dtype=torch.float64)
        for s in seeds
    ]
    return torch.stack(rows)
