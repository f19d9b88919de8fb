"""Tests for `trl_trm.bounds`: hand-computed values, the talk's numerical example, vectorisation, validation and the
integer boundary of `max_nonvacuous_length`."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_trm.bounds import BOUND_NAMES, error_bounds, format_bounds_table, max_nonvacuous_length, minorizer

lengths = st.integers(min_value=0, max_value=100_000)
kls = st.floats(min_value=1e-12, max_value=10.0)


def test_hand_computed_values():
    # T = 4, delta = 1/4, D_seq = 1: 4*3/4 = 3, (4/3) * 8 / 4 = 8/3, 2*4*sqrt(1/4) = 4.
    bounds = error_bounds(4, 0.25, 1.0)
    assert bounds == pytest.approx({"trpo": 3.0, "pinsker_marginal": 8 / 3, "mixed": 4.0, "best": 8 / 3}, rel=1e-15)
    # T = 10, delta = 0.01, D_seq = 0.04: 90 * 0.01, (4/3) * 10 sqrt(10) * 0.01, 20 * sqrt(0.0004).
    bounds = error_bounds(10, 0.01, 0.04)
    assert bounds["trpo"] == pytest.approx(0.9)
    assert bounds["pinsker_marginal"] == pytest.approx(4 / 3 * 10 * math.sqrt(10) * 0.01)
    assert bounds["mixed"] == pytest.approx(0.4)
    assert bounds["best"] == pytest.approx(0.4)
    # Without D_seq there is no mixed bound; TRPO is the tightest for T <= 3 (T=2: 2 delta vs (4/3) 2^{3/2} delta).
    bounds = error_bounds(2, 0.1)
    assert set(bounds) == {"trpo", "pinsker_marginal", "best"}
    assert bounds["best"] == bounds["trpo"] == pytest.approx(0.2)
    assert all(isinstance(v, float) for v in bounds.values())


def test_talk_numerical_example():
    # Talk §2.5.7 / §4.5.2: T = 4096, delta = 1e-4: 1677 (TRPO), 35.0 (PM), 8.2 (Mixed, D_seq = 0.01) and, in the
    # uniform scenario D_seq = T delta = 0.41, 52.4 (Mixed).
    bounds = error_bounds(4096, 1e-4, 0.01)
    assert round(bounds["trpo"]) == 1677
    assert round(bounds["pinsker_marginal"], 1) == 35.0
    assert round(bounds["mixed"], 1) == 8.2
    assert round(error_bounds(4096, 1e-4, 4096 * 1e-4)["mixed"], 1) == 52.4


def test_format_bounds_table_talk_example():
    table = format_bounds_table(4096, 1e-4, 0.01)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"bound", "TRPO (TV chain)", "Pinsker-Marginal", "Mixed", "best"}
    values = {name: float(cells[1]) for name, cells in rows.items() if name != "bound"}
    assert values["TRPO (TV chain)"] == pytest.approx(1677.3, abs=0.5)
    assert values["Pinsker-Marginal"] == pytest.approx(35.0, abs=0.05)
    assert values["Mixed"] == pytest.approx(8.2, abs=0.01)
    # By hand, budget 1: T(T-1) <= 1e4 -> 100 (9900 vs 10100); T^1.5 <= 7500 -> 383 (7495 vs 7525); 2T*1e-3 <= 1 -> 500.
    largest = {name: int(cells[2]) for name, cells in rows.items() if name != "bound"}
    assert largest == {"TRPO (TV chain)": 100, "Pinsker-Marginal": 383, "Mixed": 500, "best": 500}
    assert "Mixed" not in format_bounds_table(4096, 1e-4)


def test_minorizer_hand_computed():
    # min(PM, Mixed) = min(8/3, 4) = 8/3 at T = 4, delta = 1/4, D_seq = 1; TRPO (3) is not used.
    assert minorizer(1.0, 4, 0.25, 1.0) == pytest.approx(1 - 8 / 3)
    # D_seq = 1/16 makes Mixed = 8 * sqrt(1/64) = 1 the smaller one.
    assert minorizer(1.0, 4, 0.25, 1 / 16) == pytest.approx(0.0)
    assert minorizer(1.0, 4, 0.25) == pytest.approx(1 - 8 / 3)
    surrogate = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = minorizer(surrogate, torch.tensor([4.0, 4.0], dtype=torch.float64), 0.25, torch.tensor([1.0, 1 / 16]))
    torch.testing.assert_close(out, torch.tensor([1 - 8 / 3, 1.0], dtype=torch.float64))


def test_zero_times_inf_convention():
    # One-token responses have no context shift, and no divergence means no error, even next to an infinite KL.
    assert error_bounds(1, math.inf)["trpo"] == 0.0
    assert error_bounds(0, math.inf, 1.0) == {"trpo": 0.0, "pinsker_marginal": 0.0, "mixed": 0.0, "best": 0.0}
    assert error_bounds(5, math.inf, 0.0)["mixed"] == 0.0
    assert error_bounds(5, math.inf)["pinsker_marginal"] == math.inf


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"length": -1, "kl_tok_max": 0.1}, "length"),
        ({"length": math.nan, "kl_tok_max": 0.1}, "length"),
        ({"length": math.inf, "kl_tok_max": 0.1}, "length"),
        ({"length": 4, "kl_tok_max": -1e-9}, "kl_tok_max"),
        ({"length": 4, "kl_tok_max": math.nan}, "kl_tok_max"),
        ({"length": 4, "kl_tok_max": 0.1, "kl_seq": -0.5}, "kl_seq"),
        ({"length": 4, "kl_tok_max": 0.1, "kl_seq": math.nan}, "kl_seq"),
        ({"length": torch.tensor([3.0, -2.0]), "kl_tok_max": 0.1}, "length"),
        ({"length": 4, "kl_tok_max": torch.tensor([0.1, math.nan])}, "kl_tok_max"),
    ],
)
def test_validation_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        error_bounds(**kwargs)
    with pytest.raises(ValueError, match=f"`{name}`"):
        minorizer(0.0, **kwargs)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-0.1, 1.0), "kl_tok_max"),
        ((0.1, math.nan), "budget"),
        ((0.1, math.inf), "budget"),
        ((0.1, 1.0, -1.0), "kl_seq"),
    ],
)
def test_max_nonvacuous_length_validation(args, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        max_nonvacuous_length(*args)


@settings(max_examples=60, deadline=None)
@given(
    length=st.lists(lengths, min_size=1, max_size=6),
    kl_tok_max=st.lists(kls, min_size=1, max_size=6),
    kl_seq=kls,
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_vectorised_equals_scalar(length, kl_tok_max, kl_seq, dtype):
    T = torch.tensor(length, dtype=dtype).unsqueeze(-1)  # (n, 1)
    delta = torch.tensor(kl_tok_max, dtype=dtype)  # (m,)
    bounds = error_bounds(T, delta, torch.tensor(kl_seq, dtype=dtype))
    assert set(bounds) == {*BOUND_NAMES, "best"}
    for name, value in bounds.items():
        assert value.shape == (len(length), len(kl_tok_max)) and value.dtype == dtype
        expected = torch.tensor(
            [
                [error_bounds(float(t), float(d), float(torch.tensor(kl_seq, dtype=dtype)))[name] for d in delta]
                for t in T[:, 0]
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(value.double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    torch.testing.assert_close(bounds["best"], torch.stack([bounds[n] for n in BOUND_NAMES]).amin(0))


@settings(max_examples=300, deadline=None)
@given(
    kl_tok_max=st.floats(min_value=1e-9, max_value=10.0),
    budget=st.floats(min_value=0.0, max_value=10.0),
    kl_seq=st.one_of(st.none(), st.floats(min_value=1e-9, max_value=10.0)),
)
def test_max_nonvacuous_length_is_exact_at_the_integer_boundary(kl_tok_max, budget, kl_seq):
    lengths_ = max_nonvacuous_length(kl_tok_max, budget, kl_seq)
    names = [n for n in BOUND_NAMES if n != "mixed" or kl_seq is not None]
    assert set(lengths_) == {*names, "best"}
    for name in names:
        t_star = lengths_[name]
        assert isinstance(t_star, int) and t_star >= (1 if name == "trpo" else 0)
        assert (
            error_bounds(t_star, kl_tok_max, kl_seq)[name]
            <= budget
            < error_bounds(t_star + 1, kl_tok_max, kl_seq)[name]
        )
    assert lengths_["best"] == max(lengths_[n] for n in names)
    best = lengths_["best"]
    assert (
        error_bounds(best, kl_tok_max, kl_seq)["best"] <= budget < error_bounds(best + 1, kl_tok_max, kl_seq)["best"]
    )


def test_max_nonvacuous_length_degenerate():
    assert max_nonvacuous_length(0.0, 1.0, 0.5) == dict.fromkeys(
        ["trpo", "pinsker_marginal", "mixed", "best"], math.inf
    )
    assert max_nonvacuous_length(math.inf, 1.0) == {"trpo": 1, "pinsker_marginal": 0, "best": 1}
    # Budget 0: only the zero-length factor keeps a bound at 0.
    assert max_nonvacuous_length(0.1, 0.0, 0.1) == {"trpo": 1, "pinsker_marginal": 0, "mixed": 0, "best": 1}


def test_bounds_module_imports_no_trl():
    code = "import sys, trl_trm.bounds, trl_trm.tabular; print(sorted(m for m in ('trl', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
