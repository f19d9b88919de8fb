"""The simulator sweep (`experiments/simulator_sweep.py`): the environment's mechanics (fast) and the `--quick` run
(slow), checked for real properties of its output."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `experiments` is a top-level directory of the repository, not part of the package
    sys.path.insert(0, str(ROOT))

from experiments import simulator_sweep as sweep  # noqa: E402
from trl_trm import longhorizon as lh  # noqa: E402
from trl_trm.masking import TRM_MODES  # noqa: E402


def test_environment_mechanics():
    machine = sweep.build_machine(8)
    dead = machine.num_states - 1
    # The forbidden token kills, every other token moves to (y, q + y mod 3), dead is absorbing.
    for p in range(sweep.VOCAB):
        for q in range(sweep.COUNTER):
            s = sweep.VOCAB * q + p
            for y in range(sweep.VOCAB):
                expected = dead if y == sweep.FORBIDDEN[p] else sweep.VOCAB * ((q + y) % sweep.COUNTER) + y
                assert int(machine.transition[s, y]) == expected
    assert bool((machine.transition[dead] == dead).all()) and float(machine.reward[dead]) == 0.0
    # The initialisation has Pr(survive) = (1 - 0.5 / T)^T at every T, and the optimum (always token 0) gives J = 1.
    for T in (16, 4096):
        machine = sweep.build_machine(T)
        probs = torch.softmax(sweep.initial_logits(T, 1), -1).unsqueeze(1)
        alive = 1.0 - float(lh.state_distributions(machine, probs)[0, -1, dead])
        assert alive == pytest.approx((1 - 0.5 / T) ** T, rel=1e-9)
        # Always token 0: q stays 0 (reward 1), but after the prompt token p = 3 token 0 is forbidden: J = 3/4.
        greedy = torch.zeros_like(probs)
        greedy[..., 0] = 1.0
        assert float(lh.expected_reward(machine, greedy)) == pytest.approx(0.75, abs=1e-12)


def test_mismatch_models():
    T, K, M, S = 64, 2, 3, 13
    logits = sweep.initial_logits(T, K * M)
    for name, spec in sweep.MISMATCHES.items():
        model = sweep.Mismatch(spec, T, K, M, S)
        roll = model.roll_probs(logits)
        theta = torch.softmax(logits, -1).unsqueeze(1)
        kl = lh.kl_per_context(roll, theta)  # (B, 1|T, S)
        if spec["kind"] in ("none", "stale"):  # stale at step 0 is the current policy
            assert float(kl.max()) < 1e-15, name
        elif spec["kind"] == "precision":
            assert 0 < float(kl.mean()) < (2e-3 if spec["sigma"] > 0.01 else 1e-6), name
        else:  # flips: zero KL off the fragile set, large on it; the set is shared by the runs of a seed
            fragile = model.fragile  # (B, T, S)
            assert float(kl[~fragile].max()) < 1e-15 and float(kl[fragile].mean()) > 0.05, name
            assert torch.equal(fragile[0], fragile[M - 1]) and not torch.equal(fragile[0], fragile[M])
            assert abs(float(fragile.double().mean()) - spec["p"]) < 5 * math.sqrt(spec["p"] / fragile.numel()) + 1e-3
    stale = sweep.Mismatch({"kind": "stale", "k": 2}, T, K, M, S)
    history = [logits + i for i in range(4)]
    rolls = [stale.roll_probs(h) for h in history]
    torch.testing.assert_close(rolls[3], torch.softmax(history[1], -1).unsqueeze(1))  # two steps behind


@pytest.mark.slow
def test_quick_sweep_output(tmp_path):
    payload = sweep.main(["--quick", "--results-dir", str(tmp_path), "--plots-dir", str(tmp_path / "plots")])
    config = payload["config"]
    assert payload["cpu_s"] > 0  # the run's cost is reported (speed is measured by `make sweep`, not by a test)
    data = json.loads((tmp_path / "simulator_quick_sweep.json").read_text())
    cells = {(c["mismatch"], c["length"]): c for c in data["cells"]}
    assert set(cells) == {(m, T) for m in sweep.MISMATCHES for T in config["lengths"]}  # every cell
    for (mismatch, T), cell in cells.items():
        assert set(cell["modes"]) == set(TRM_MODES)
        for mode, s in cell["modes"].items():
            assert 0.0 <= s["accept_rate"] <= 1.0 and 0.0 <= s["token_keep_rate"] <= 1.0
            assert 0.0 <= s["violation_rate"] <= 1.0 and s["largest_fall"] >= 0.0
            assert len(s["j_curve_mean"]) == config["steps"] + 1
            assert all(math.isfinite(j) and 0.0 <= j <= 1.0 for j in s["j_curve_mean"])
            assert math.isfinite(s["error_over_bound_max"]) and 0.0 <= s["error_over_bound_max"] <= 1.0  # theory
            if mismatch == "on_policy" or mode == "none":  # nothing to reject
                assert s["accept_rate"] == 1.0, (mismatch, T, mode)
        if mismatch == "on_policy":
            assert cell["measured"]["kl_tok"] == 0.0
            j0 = {s["j_initial"] for s in cell["modes"].values()}
            assert max(j0) - min(j0) < 1e-12  # every mode starts from the same policy
    # Length dependence the sweep is about: under per-position flips `trm_exact` accepts fewer long sequences.
    flips = [cells[("flips_strong", T)]["modes"]["trm_exact"]["accept_rate"] for T in config["lengths"]]
    assert flips[-1] < flips[0]
    rows = list(csv.DictReader(open(tmp_path / "simulator_quick_summary.csv")))
    assert len(rows) == len(cells) * len(TRM_MODES)
    table = (tmp_path / "simulator_quick_table.md").read_text()
    assert all(f"### {m}" in table for m in sweep.MISMATCHES)
    for name in ("j_vs_T.png", "violation_vs_T.png", "accept_vs_T.png"):
        assert (tmp_path / "plots" / "quick" / name).stat().st_size > 1000


def test_estimator_gradient_is_the_talks():
    # grad of (1/(N T)) sum w A log pi_theta(y_t | s_t) w.r.t. softmax logits = (1/(N T)) sum w A (e_y - pi(.|s)).
    generator = torch.Generator().manual_seed(0)
    B, N, T, S, V = 2, 3, 5, 13, 4
    logits = torch.randn(B, S, V, generator=generator, dtype=torch.float64).requires_grad_(True)
    states = torch.randint(0, S, (B, N, T), generator=generator)
    tokens = torch.randint(0, V, (B, N, T), generator=generator)
    weights = torch.rand(B, N, T, generator=generator, dtype=torch.float64)
    advantage = torch.randn(B, N, generator=generator, dtype=torch.float64)
    logp = sweep._path_log_softmax(logits, states, tokens)  # (B, N, T)
    expected_logp = torch.log_softmax(logits, -1)[torch.arange(B)[:, None, None], states, tokens]
    torch.testing.assert_close(logp, expected_logp)
    ((weights * advantage.unsqueeze(-1) * logp).sum() / (N * T)).backward()
    probs = torch.softmax(logits.detach(), -1)
    expected = torch.zeros(B, S, V, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            for t in range(T):
                s, y = int(states[b, i, t]), int(tokens[b, i, t])
                coef = float(weights[b, i, t] * advantage[b, i]) / (N * T)
                expected[b, s] -= coef * probs[b, s]
                expected[b, s, y] += coef
    torch.testing.assert_close(logits.grad, expected)
