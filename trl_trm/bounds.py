"""Error bounds of the TRM surrogate (talk ``shared/seeds/001_*`` §2.5–2.6, spec ``shared/trm-spec.md``).

Pure Python + torch, no TRL import. Notation (talk §2.5.0), for a response of ``T`` tokens and contexts
``c_t = (x, y_<t)``:

    D_KL^tok(c_t)   = KL(pi_roll(.|c_t) || pi_theta(.|c_t))                 # TRPO direction, exact from logits
    delta           = D_KL^tok,max = max_{t, c_t} D_KL^tok(c_t)               # worst context, not an average
    D_KL^seq        = KL(P^pi_roll || P^pi_theta) = sum_t E_{c_t ~ d_t^roll}[D_KL^tok(c_t)]   # chain rule, <= T delta
    L(pi_theta)     = sum_t E_{c_t ~ d_t^roll}[ E_{y_t ~ pi_theta}[A_t^roll(c_t, y_t)] ]          # surrogate
    Error           = J(pi_theta) - J(pi_roll) - L(pi_theta)

For terminal rewards in [0, 1] the talk proves ``|Error| <= bound`` for each of

| key                | formula                   | scaling    | derivation (talk)                                          |
|--------------------|---------------------------|------------|------------------------------------------------------------|
| `trpo`             | T (T - 1) delta           | O(T^2)     | §2.5.1: TV simulation lemma, then Pinsker on (D_TV^max)^2  |
| `pinsker_marginal` | (4/3) T^{3/2} delta       | O(T^{3/2}) | §2.5.3–2.5.4: Pinsker on the marginal KL (chain rule)      |
| `mixed`            | 2 T sqrt(delta D_KL^seq)  | O(T)       | §2.5.5: marginal KL <= D_KL^seq (data processing)          |

and ``best`` is the smallest of the bounds that could be computed (all three are valid, so their minimum is too).
The TRPO bound is the smallest only for T <= 3. The minorizer of the talk (§2.6.1) is
``M = L - min(pinsker_marginal, mixed)``: ``J(pi_theta) - J(pi_roll) >= M``, so ``M > 0`` certifies improvement.
No bound in terms of D_KL^seq alone exists (talk A.8, reproduced in :func:`trl_trm.tabular.appendix_a8_counterexample`).

Estimates, not certificates: the bounds hold for the exact divergences. Plugging in sample-based values (k3 or
|log rho| along sampled tokens, D_avg as a proxy for D_KL^seq / T, or a top-k KL that is a lower bound of the exact
one) gives an *estimate* of the bound, not a guarantee. Even with the exact per-context KL of the full vocabulary,
TRM only checks the contexts that the sampled, accepted sequences visit, not every context.

Conventions: inputs may be Python numbers or broadcastable torch tensors (then tensors are returned); a zero factor
makes a bound 0 even if the other factor is ``inf`` (0 * inf = 0: with T <= 1, or with no divergence, the
corresponding term of the derivation vanishes). ``inf`` KL (a token impossible under pi_theta) gives an ``inf`` bound.
"""

from __future__ import annotations

import math

import torch

BOUND_NAMES = ("trpo", "pinsker_marginal", "mixed")
"""Keys of the individual bounds returned by :func:`error_bounds` (``"mixed"`` only when ``kl_seq`` is given)."""

BOUND_LABELS = {"trpo": "TRPO (TV chain)", "pinsker_marginal": "Pinsker-Marginal", "mixed": "Mixed"}
BOUND_FORMULAS = {"trpo": "T(T−1)·δ", "pinsker_marginal": "(4/3)·T^{3/2}·δ", "mixed": "2T·√(δ·D_seq)"}

_EXACT_LENGTH_LIMIT = 2**53  # beyond this float64 cannot tell T from T + 1


def _validated(name: str, value: float | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=dtype, device=device)
    if bool(torch.isnan(tensor).any()):
        raise ValueError(f"`{name}` must not be NaN, got {value!r}.")
    if bool((tensor < 0).any()):
        raise ValueError(f"`{name}` must be non-negative, got {value!r}.")
    return tensor


def _times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise a * b with the convention 0 * inf = 0."""
    return torch.where((a == 0) | (b == 0), torch.zeros((), dtype=a.dtype, device=a.device), a * b)


def error_bounds(
    length: int | float | torch.Tensor,
    kl_tok_max: float | torch.Tensor,
    kl_seq: float | torch.Tensor | None = None,
) -> dict[str, float] | dict[str, torch.Tensor]:
    """Upper bounds on |Error| = |J(pi_theta) - J(pi_roll) - L(pi_theta)| for rewards in [0, 1] (talk §2.5.6).

    Args:
        length: T, the number of generated tokens (finite, >= 0). A tensor gives one bound per element.
        kl_tok_max: delta = D_KL^tok,max, the largest KL(pi_roll(.|c) || pi_theta(.|c)) over contexts (>= 0).
        kl_seq: D_KL^seq = KL(P^pi_roll || P^pi_theta) over full sequences (>= 0), or None to skip ``"mixed"``.

    Returns:
        ``{"trpo", "pinsker_marginal", ["mixed",] "best"}``; ``"best"`` is the elementwise minimum of the others.
        Python floats when no argument is a tensor; otherwise tensors of the broadcast shape, in the promoted
        floating dtype of the tensor arguments (float64 when they are all integer tensors) on their device.

    Raises:
        ValueError: naming the argument, when it is negative or NaN (or when ``length`` is infinite).
    """
    tensors = [v for v in (length, kl_tok_max, kl_seq) if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    out_dtype = torch.float64
    if tensors:
        promoted = tensors[0].dtype
        for t in tensors[1:]:
            promoted = torch.promote_types(promoted, t.dtype)
        if promoted.is_floating_point:
            out_dtype = promoted

    T = _validated("length", length, torch.float64, device)
    if not bool(torch.isfinite(T).all()):
        raise ValueError(f"`length` must be finite, got {length!r}.")
    delta = _validated("kl_tok_max", kl_tok_max, torch.float64, device)

    bounds = {
        "trpo": _times(T * (T - 1), delta),
        "pinsker_marginal": _times(4.0 / 3.0 * T**1.5, delta),
    }
    if kl_seq is not None:
        seq = _validated("kl_seq", kl_seq, torch.float64, device)
        bounds["mixed"] = _times(2.0 * T, torch.sqrt(_times(delta, seq)))
    shape = torch.broadcast_shapes(*(b.shape for b in bounds.values()))
    bounds = {k: v.expand(shape) for k, v in bounds.items()}
    bounds["best"] = torch.stack(list(bounds.values())).amin(dim=0)

    if not tensors:
        return {k: float(v) for k, v in bounds.items()}
    return {k: v.to(out_dtype) for k, v in bounds.items()}


def minorizer(
    surrogate: float | torch.Tensor,
    length: int | float | torch.Tensor,
    kl_tok_max: float | torch.Tensor,
    kl_seq: float | torch.Tensor | None = None,
) -> float | torch.Tensor:
    """The talk's lower bound M = L - min(Pinsker-Marginal, Mixed) (§2.6.1, spec "Error bounds").

    ``J(pi_theta) - J(pi_roll) >= M`` when ``surrogate`` is the talk's L (0 at pi_theta = pi_roll); equally,
    ``J(pi_theta) >= M`` when ``surrogate`` is J(pi_roll) + L. Without ``kl_seq`` only Pinsker-Marginal is used.
    The TRPO bound is left out as in the spec; it is tighter only for T <= 3.

    Args:
        surrogate: L, scalar or tensor (broadcast against the bound).
        length: as in :func:`error_bounds`.
        kl_tok_max: as in :func:`error_bounds`.
        kl_seq: as in :func:`error_bounds`.

    Returns:
        ``surrogate - min(...)``: a float when no argument is a tensor, else a tensor.
    """
    bounds = error_bounds(length, kl_tok_max, kl_seq)
    penalty = bounds["pinsker_marginal"]
    if kl_seq is not None:
        mixed = bounds["mixed"]
        penalty = torch.minimum(penalty, mixed) if isinstance(penalty, torch.Tensor) else min(penalty, mixed)
    return surrogate - penalty


def _largest_length(name: str, guess: float, kl_tok_max: float, kl_seq: float | None, budget: float) -> int:
    """Largest integer T >= 0 with ``error_bounds(T, ...)[name] <= budget``, starting from a closed-form guess."""

    def bound(t: int) -> float:
        return error_bounds(t, kl_tok_max, kl_seq)[name]

    length = max(math.floor(guess), 0)
    if length >= _EXACT_LENGTH_LIMIT:
        return length
    # The closed form is off by at most one or two from rounding; settle it on the same float bound the caller sees.
    while length > 0 and bound(length) > budget:
        length -= 1
    while bound(length + 1) <= budget:
        length += 1
    return length


def max_nonvacuous_length(
    kl_tok_max: float, budget: float = 1.0, kl_seq: float | None = None
) -> dict[str, int | float]:
    """For each bound, the largest integer T for which it stays <= ``budget``.

    With rewards in [0, 1] a bound above 1 says nothing, so ``budget=1.0`` is the vacuity threshold; a smaller
    budget asks for a bound below an expected gain. Every bound grows with T, so the answer is exact at the integer
    boundary: ``bound(T*) <= budget < bound(T* + 1)`` (evaluated with :func:`error_bounds`, for T* < 2**53).
    ``kl_seq`` is held fixed although in practice D_KL^seq grows with T (D_KL^seq <= T delta).

    Args:
        kl_tok_max: delta = D_KL^tok,max (>= 0).
        budget: the largest acceptable |Error| bound (>= 0).
        kl_seq: D_KL^seq (>= 0), or None to skip ``"mixed"``.

    Returns:
        ``{"trpo", "pinsker_marginal", ["mixed",] "best"}`` -> T* (int), or ``math.inf`` when the bound is 0 for
        every T (no divergence). ``"best"`` is the largest T* (the minimum of the bounds is <= budget there).
        TRPO is 0 at T = 1, so its T* is at least 1.

    Raises:
        ValueError: naming the argument, when it is negative or NaN (or when ``budget`` is infinite).
    """
    for name, value in (("kl_tok_max", kl_tok_max), ("budget", budget), ("kl_seq", kl_seq)):
        if value is not None and (math.isnan(value) or value < 0):
            raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
    if math.isinf(budget):
        raise ValueError(f"`budget` must be finite, got {budget!r}.")
    # coefficient c of each bound = c * f(T), and the inverse of f at budget / c
    coefficients = {"trpo": kl_tok_max, "pinsker_marginal": 4.0 / 3.0 * kl_tok_max}
    inverses = {
        "trpo": lambda r: (1.0 + math.sqrt(1.0 + 4.0 * r)) / 2.0,  # T (T - 1) = r
        "pinsker_marginal": lambda r: r ** (2.0 / 3.0),  # T^{3/2} = r
    }
    if kl_seq is not None:
        coefficients["mixed"] = 2.0 * math.sqrt(kl_tok_max * kl_seq) if kl_tok_max * kl_seq > 0 else 0.0
        inverses["mixed"] = lambda r: r  # T = r
    lengths: dict[str, int | float] = {}
    for name, coefficient in coefficients.items():
        if coefficient == 0:
            lengths[name] = math.inf
        elif math.isinf(coefficient):
            lengths[name] = 1 if name == "trpo" else 0  # only the zero-length factor keeps the bound finite
        else:
            lengths[name] = _largest_length(name, inverses[name](budget / coefficient), kl_tok_max, kl_seq, budget)
    lengths["best"] = max(lengths.values())
    return lengths


def format_bounds_table(length: int, kl_tok_max: float, kl_seq: float | None = None, budget: float = 1.0) -> str:
    """A markdown table of the bounds at one operating point, with the largest T that keeps each <= ``budget``.

    Example (the talk's numerical example, §2.5.7 and §4.5.2)::

        >>> print(format_bounds_table(4096, 1e-4, 0.01))  # doctest: +SKIP
        T = 4096, δ = D_KL^tok,max = 0.0001, D_seq = D_KL^seq = 0.01, budget = 1 (rewards in [0, 1])
        ...
        | TRPO (TV chain) | T(T−1)·δ | 1677 | 100 |

    Args:
        length: as in :func:`error_bounds` (a Python number).
        kl_tok_max: as in :func:`error_bounds` (a Python number).
        kl_seq: as in :func:`error_bounds` (a Python number).
        budget: vacuity threshold for the last column, as in :func:`max_nonvacuous_length`.

    Returns:
        A one-line header followed by a markdown table with columns bound, formula, value and largest non-vacuous T.
    """
    values = error_bounds(length, kl_tok_max, kl_seq)
    lengths = max_nonvacuous_length(kl_tok_max, budget, kl_seq)
    header = f"T = {length}, δ = D_KL^tok,max = {kl_tok_max:g}"
    if kl_seq is not None:
        header += f", D_seq = D_KL^seq = {kl_seq:g}"
    header += f", budget = {budget:g} (rewards in [0, 1])"
    rows = [
        "| bound | formula | value | largest non-vacuous T |",
        "|---|---|---:|---:|",
    ]
    for name in BOUND_NAMES:
        if name in values:
            rows.append(f"| {BOUND_LABELS[name]} | {BOUND_FORMULAS[name]} | {values[name]:.4g} | {lengths[name]} |")
    rows.append(f"| best | min of the above | {values['best']:.4g} | {lengths['best']} |")
    return "\n".join([header, "", *rows])
