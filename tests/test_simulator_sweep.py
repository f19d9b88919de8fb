"""The simulator sweep of issue 17 (`experiments/simulator_sweep.py`, `sim_families`, `sim_training`, `sim_report`):
each family's defining property, the common-random-number sampler, the training loop's controls and bypass, the
paired statistics and the rule, and the `--quick` run (slow)."""

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

from experiments import sim_families as fam  # noqa: E402
from experiments import sim_report as rep  # noqa: E402
from experiments import sim_training as tr  # noqa: E402
from experiments import simulator_sweep as sweep  # noqa: E402
from trl_trm import longhorizon as lh  # noqa: E402


def _init_probs(lam: float, T: int, batch: int = 1) -> torch.Tensor:
    return torch.softmax(fam.logits_for(fam.kappa_for(lam, T), batch), -1).unsqueeze(1)  # (batch, 1, S, V)


def test_environment_mechanics():
    machine = fam.build_machine(8)
    for q in range(3):
        for f in range(2):
            for y in range(3):
                assert int(machine.transition[fam.normal(q, f), y]) == fam.normal((q + y) % 3, f)
            assert int(machine.transition[fam.normal(q, f), fam.KEY]) == fam.gate(q, f)
            assert int(machine.transition[fam.gate(q, f), fam.FATAL]) == fam.DEAD
            for y in (1, 2, 3):
                assert int(machine.transition[fam.gate(q, f), y]) == fam.normal(q, 1)
            assert float(machine.reward[fam.normal(q, f)]) == pytest.approx(0.2 + 0.2 * (q == 0) + 0.6 * f)
    assert bool((machine.transition[fam.DEAD] == fam.DEAD).all()) and float(machine.reward[fam.DEAD]) == 0.0


@pytest.mark.parametrize("lam", [0.1, 0.5, 2.0])
def test_fragile_visit_rate_is_lambda(lam):
    T = 64
    machine = fam.build_machine(T)
    probs = _init_probs(lam, T)
    assert float(fam.gate_visits(machine, probs)[0]) == pytest.approx(lam, rel=1e-6)  # exact DP
    # The common-random-number sampler draws from the same distribution: sampled visits within 5 standard errors.
    u = torch.rand(1, 4000, T + 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    states, _, _ = fam.crn_sample(machine, probs, u)
    visits = sum((states == g).double() for g in fam.GATES).sum(-1).flatten()  # (n,)
    assert abs(float(visits.mean()) - lam) < 5 * float(visits.std()) / math.sqrt(visits.numel())


def test_support_collapse_probabilities():
    T = 64
    logits = fam.logits_for(fam.kappa_for(0.5, T), 2)
    theta = torch.softmax(logits, -1)
    roll = fam.Family("collapse", [0, 1]).roll_probs(logits)[:, 0]  # (2, S, V)
    gates = list(fam.GATES)
    assert bool((roll[:, gates, fam.FATAL] >= 0.9).all()) and bool((theta[:, gates, fam.FATAL] <= 1e-3).all())
    log_rho = (theta[:, gates, fam.FATAL] / roll[:, gates, fam.FATAL]).log()
    assert bool((log_rho.abs() > 7).all())  # |log rho| ~ 7 at the fatal token
    others = [s for s in range(fam.NUM_STATES) if s not in gates]
    torch.testing.assert_close(roll[:, others], theta[:, others], rtol=0, atol=0)
    torch.testing.assert_close(roll.sum(-1), torch.ones(2, fam.NUM_STATES, dtype=torch.float64))
    # The fatal token matters for reward: J of the rollout engine is lower than pi_theta's.
    machine = fam.build_machine(T)
    assert (
        float(lh.expected_reward(machine, roll[:1].unsqueeze(1)))
        < float(lh.expected_reward(machine, theta[:1].unsqueeze(1))) - 0.1
    )


def test_noise_and_stale_families():
    logits = fam.logits_for(0.01, 3)
    theta = torch.softmax(logits, -1)
    noise_a = fam.Family("noise", [4, 5, 4]).roll_probs(logits)[:, 0]
    noise_b = fam.Family("noise", [4, 5, 4]).roll_probs(logits)[:, 0]
    torch.testing.assert_close(noise_a, noise_b)  # fixed per seed: every method of a seed sees the same engine
    torch.testing.assert_close(noise_a[0], noise_a[2])
    assert not torch.allclose(noise_a[0], noise_a[1])
    others = [s for s in range(fam.NUM_STATES) if s not in fam.GATES]
    torch.testing.assert_close(noise_a[:, others], theta[:, others], rtol=0, atol=0)
    assert float((noise_a[:, list(fam.GATES)] - theta[:, list(fam.GATES)]).abs().max()) > 0.1
    stale = fam.Family("stale", [0], stale_k=2)
    history = [logits[:1] + i * torch.arange(4.0, dtype=torch.float64) for i in range(4)]
    rolls = [stale.roll_probs(h) for h in history]
    torch.testing.assert_close(rolls[3][:, 0], torch.softmax(history[1], -1))  # two updates behind
    with pytest.raises(ValueError, match="unknown family"):
        fam.Family("typo", [0])


def test_crn_sampler_is_common_and_exact():
    T = 16
    machine = fam.build_machine(T)
    probs = _init_probs(2.0, T, batch=2)
    u = fam.uniforms_for([3, 3], step=5, n=2000, horizon=T)
    states, tokens, final = fam.crn_sample(machine, probs, u)
    assert torch.equal(states[0], states[1]) and torch.equal(tokens[0], tokens[1])  # same seed, same policy
    assert not torch.equal(fam.uniforms_for([3], 5, 4, T), fam.uniforms_for([4], 5, 4, T))
    d_final = lh.state_distributions(machine, probs[:1])[0, -1]  # exact d_T
    freq = torch.bincount(final[0], minlength=fam.NUM_STATES).double() / final.shape[1]
    se = (d_final * (1 - d_final) / final.shape[1]).sqrt()
    assert bool(((freq - d_final).abs() <= 5 * se + 1e-3).all())


def _spec(family: str, **kw) -> tr.RunSpec:
    base = dict(
        horizon=16,
        family=family,
        kappa=fam.kappa_for(0.5, 16),
        seeds=[0, 1, 2],
        optimiser="adam",
        lr=0.1,
        steps=3,
        num_samples=8,
        epochs=2,
    )
    return tr.RunSpec(**{**base, **kw})


def test_bypass_equals_ppo_without_mismatch_and_differs_with_it():
    machine = fam.build_machine(16)
    none, bypass = (tr.run_method(machine, m, _spec("exact")) for m in ("none", "ppo_roll"))
    torch.testing.assert_close(none["j_new"], bypass["j_new"])  # pi_roll = pi_old: the same loss
    none, bypass = (tr.run_method(machine, m, _spec("stale", stale_k=1)) for m in ("none", "ppo_roll"))
    assert not torch.allclose(none["j_new"], bypass["j_new"])


def test_controls_keep_trms_count():
    machine = fam.build_machine(16)
    spec = _spec("collapse", kappa=fam.kappa_for(2.0, 16))
    trm = tr.run_method(machine, "trm", spec)
    assert float(trm["accept"].mean()) < 0.9  # something is rejected, so the controls have work to do
    random = tr.run_method(machine, "ctrl_random", spec, trm_counts=trm["counts"])
    torch.testing.assert_close(random["counts"], trm["counts"])  # the same accepted count per seed, update, epoch
    count = tr.run_method(machine, "ctrl_count", spec)
    first = count["counts"][..., 0]  # (R, steps) accepted at the first epoch: at most N, N when the pool holds N
    assert bool((first <= spec.num_samples).all()) and float(first.max()) == spec.num_samples
    # At the first update the pool starts with trm's own batch (common random numbers), so it accepts at least as many.
    assert bool((first[:, 0] >= trm["counts"][:, 0, 0]).all()) and float(first[:, 0].sum()) > float(
        trm["counts"][:, 0, 0].sum()
    )


def test_sgd_and_adam_steps():
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([0.5, -4.0], dtype=torch.float64)
    tr._Optimiser(p, "sgd", 0.1).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.95, -1.6], dtype=torch.float64))
    q = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    q.grad = torch.tensor([0.5, -4.0], dtype=torch.float64)
    tr._Optimiser(q, "adam", 0.1).step()  # the first Adam step moves by lr * sign(g)
    torch.testing.assert_close(q.detach(), torch.tensor([-0.1, 0.1], dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown optimiser"):
        tr._Optimiser(q, "rmsprop", 0.1)


def test_trm90_calibration_accepts_ninety_percent():
    stats = torch.rand(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    th = tr.calibrate_trm90(stats)
    accept = float(((stats[:, 0] <= th["delta_max"]) & (stats[:, 1] <= th["delta_avg"])).double().mean())
    assert 0.9 <= accept < 0.92


def test_paired_statistics_and_rule():
    diff, se = rep.paired([1.0, 2.0, 3.0], [0.0, 1.0, 2.5])
    assert diff == pytest.approx(0.8333333) and se == pytest.approx(0.1666667, rel=1e-5)
    assert rep.beats([1.0, 2.0, 3.0], [0.0, 1.0, 2.5], True) and not rep.beats([0.0] * 3, [0.0] * 3, False)
    methods = {m: {"j_final": [0.5, 0.52, 0.49, 0.51], "viol_roll": [0.2, 0.25, 0.2, 0.22]} for m in tr.METHODS}
    methods["trm"] = {"j_final": [0.8, 0.81, 0.79, 0.8], "viol_roll": [0.0, 0.0, 0.05, 0.0]}
    methods["ctrl_count"] = dict(methods["trm"])
    cell = {"methods": methods, "control": {"passed": True}, "lambda": 0.5}
    assert rep.verdict(cell)["verdict"] == "helps"
    assert rep.verdict(dict(cell, **{"lambda": 2.0}))["verdict"] == "no difference detected"  # lambda > 0.5
    assert rep.verdict(dict(cell, control={"passed": False}))["verdict"] == "no difference detected"
    methods["ctrl_random"] = dict(methods["trm"])  # a random subset does as well: selection is not what helps
    assert rep.verdict(cell)["verdict"] == "no difference detected"
    assert rep.verdict(cell, "trm_90")["verdict"] == "no difference detected"  # trm_90 = the others here


@pytest.mark.slow
def test_quick_sweep_output(tmp_path):
    payload = sweep.main(
        ["--quick", "--workers", "1", "--results-dir", str(tmp_path), "--plots-dir", str(tmp_path / "plots")]
    )
    data = json.loads((tmp_path / "simulator_quick_sweep.json").read_text())
    assert [c["name"] for c in data["cells"]] == [c["name"] for c in sweep.cells_of(sweep.SweepConfig(**sweep.QUICK))]
    for cell in data["cells"]:
        assert set(cell["methods"]) == set(tr.METHODS)
        for s in cell["methods"].values():
            assert all(0.0 <= x <= 1.0 for k in ("j_final", "viol_roll", "viol_old", "accept") for x in s[k])
            assert len(s["j_final"]) == payload["config"]["seeds"]
        assert min(cell["methods"]["none"]["accept"]) == 1.0
        assert {v["method"] for v in cell["verdicts"]} == {"trm", "trm_90"}
    collapse = next(c for c in data["cells"] if c["name"] == "collapse λ=0.5 adam")
    assert collapse["control"]["passed"]  # support collapse harms `none` even in 3 updates
    assert max(collapse["methods"]["trm"]["accept"]) < 1.0  # and TRM rejects the collapsed sequences
    rows = list(csv.DictReader(open(tmp_path / "simulator_quick_summary.csv")))
    assert len(rows) == len(data["cells"]) * len(tr.METHODS)
    assert "### collapse λ=0.5 adam" in (tmp_path / "simulator_quick_table.md").read_text()
    for name in ("final_j_adam.png", "violations_sgd.png"):
        assert (tmp_path / "plots" / "quick" / name).stat().st_size > 1000
