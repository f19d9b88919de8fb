"""Simulator sweep: policy-gradient training in an exact long-horizon environment, with the library's own masks.

One command, offline, CPU (``make sweep``)::

    .venv/bin/python -m experiments.simulator_sweep            # full sweep (a few minutes on 2 cores)
    .venv/bin/python -m experiments.simulator_sweep --quick    # < 60 s smoke version (tests/test_simulator_sweep.py)

The environment is a :class:`trl_trm.longhorizon.StateMachine` ("avoid and reach"): V = 4 tokens, the state is the
previous token and a counter q = (sum of tokens) mod 3, one forbidden next token per previous token sends the
sequence to an absorbing dead state, and the terminal reward is 1 for an alive sequence ending at q = 0, 0.2 alive
elsewhere, 0 dead. Sequences have exactly T tokens. The policy pi_theta is a time-homogeneous softmax table over the
13 states (what an LLM is: the same weights at every position), initialised so that Pr(survive) ~ e^-0.5 at every T.

Each step samples N sequences per run from a mismatched pi_roll, computes the per-token log-probs of both engines and
the exact per-token KL along the samples, and takes one Adam step along the estimator of the talk (§4.5.1)::

    grad = (1 / (N T)) sum_i sum_t w_it A_i grad log pi_theta(y_t | s_t),   A_i = R_i - mean_j R_j

with ``w = trl_trm.masking.estimator_weights(compute_trust_region_mask(...), ...)``: the same code the trainer uses
(pi_old = pi_theta at the step, one optimiser step per batch). The 1/T is the token-mean normaliser of the loss;
Adam is invariant to a constant rescaling of the gradient, so neither it nor a persistently low accept rate ("divide
by N") shrinks the steps (see ``docs/simulator.md``). After every step J(pi_theta) is computed exactly; at
``ERROR_STEPS`` evenly spaced steps also the talk's Error(pi_theta_new; pi_roll) and its three bounds.

Results: ``experiments/results/simulator_{sweep.json, summary.csv, table.md}`` and plots in ``docs/simulator/``;
``docs/simulator.md`` explains them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trl_trm import longhorizon as lh
from trl_trm.bounds import minorizer
from trl_trm.masking import TRM_MODES, compute_trust_region_mask, estimator_weights

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "experiments" / "results"
PLOTS_DIR = ROOT / "docs" / "simulator"

# ------------------------------------------------------------------------------------------------------------------
# Grid (explicit constants: the budget of the full sweep is set here)
# ------------------------------------------------------------------------------------------------------------------
LENGTHS = (16, 128, 1024, 4096)
SEEDS = 5
STEPS = 20
NUM_SAMPLES = 16  # N sequences per run and step
LEARNING_RATE = 0.1  # Adam on the logits (elementwise, so the batched runs stay independent)
ERROR_STEPS = 3  # exact Error / bounds at this many evenly spaced steps (first and last included)
WORKERS = 2  # cells run in this many processes (one thread each)
QUICK = {"lengths": (16, 64), "seeds": 2, "steps": 3, "num_samples": 8}

# Correction modes: `compute_trust_region_mask` arguments. Library defaults unless stated.
MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "token_tis": {},  # min(rho_t, 2)
    "token_mis": {"ratio_min": 0.5},  # keep tokens with rho_t in [0.5, 2]
    "seq_tis": {},  # min(prod rho, 2)
    "seq_mis": {},  # keep sequences with prod rho <= 2
    "geo_mask": {},  # geometric-mean ratio in [0.99, 1.01]
    "trm": {},  # max |log rho| <= log 2 and mean k3 <= 0.01
    "trm_exact": {"delta_avg": None},  # max_t exact KL_t <= 1e-4 (the rigorous variant, no sample criterion)
}
assert set(MODES) == set(TRM_MODES), "every correction mode of the library is in the sweep"

# Mismatch kinds with a realistic and a strong setting each, plus the on-policy control.
MISMATCHES: dict[str, dict[str, Any]] = {
    "on_policy": {"kind": "none"},
    # bf16-like logit noise, fresh per context (t, s) and step: sigma = 7e-4 gives mean |dlogp| ~ 5e-4 (the measured
    # bf16 vLLM vs fp32 trainer level); sigma = 0.05 gives a per-token KL ~ 1e-3 (the top of the 1e-5...1e-3 range).
    "precision_realistic": {"kind": "precision", "sigma": 7e-4},
    "precision_strong": {"kind": "precision", "sigma": 0.05},
    # Routing flips: a fixed random set of "fragile" contexts (t, s), a fraction p of all, where the rollout adds a
    # fixed N(0, 3^2) perturbation to the logits (a different expert: a very different distribution).
    "flips_realistic": {"kind": "flips", "p": 1e-3, "sigma": 3.0},
    "flips_strong": {"kind": "flips", "p": 1e-2, "sigma": 3.0},
    # Stale weights: the rollout uses pi_theta of k steps ago.
    "stale_1": {"kind": "stale", "k": 1},
    "stale_4": {"kind": "stale", "k": 4},
}

VOCAB = 4
COUNTER = 3
FORBIDDEN = (1, 2, 3, 0)  # forbidden[p]: the token that kills a sequence after token p
SURVIVAL_AT_INIT = 0.5  # -log Pr(survive) at initialisation, the same at every T


@dataclass
class SweepConfig:
    lengths: tuple[int, ...] = LENGTHS
    seeds: int = SEEDS
    steps: int = STEPS
    num_samples: int = NUM_SAMPLES
    learning_rate: float = LEARNING_RATE
    error_steps: int = ERROR_STEPS
    mismatches: tuple[str, ...] = tuple(MISMATCHES)
    modes: tuple[str, ...] = tuple(MODES)


def build_machine(horizon: int) -> lh.StateMachine:
    """The "avoid and reach" environment: states (p, q) -> 4 * q + p for p in 0..3, q in 0..2, and 12 = dead."""
    dead = VOCAB * COUNTER
    S = dead + 1
    transition = torch.full((S, VOCAB), dead, dtype=torch.long)
    reward = torch.zeros(S, dtype=torch.float64)
    for q in range(COUNTER):
        for p in range(VOCAB):
            s = VOCAB * q + p
            for y in range(VOCAB):
                if y != FORBIDDEN[p]:
                    transition[s, y] = VOCAB * ((q + y) % COUNTER) + y
            reward[s] = 1.0 if q == 0 else 0.2
    initial = torch.zeros(S, dtype=torch.float64)
    initial[:VOCAB] = 1.0 / VOCAB  # q = 0, previous token uniform (the prompt)
    return lh.StateMachine(transition, reward, initial, horizon)


def initial_logits(horizon: int, batch: int) -> torch.Tensor:
    """(batch, S, V) logits: uniform over allowed tokens, the forbidden one at probability SURVIVAL_AT_INIT / T."""
    eps = SURVIVAL_AT_INIT / horizon
    logits = torch.zeros(batch, VOCAB * COUNTER + 1, VOCAB, dtype=torch.float64)
    for q in range(COUNTER):
        for p in range(VOCAB):
            logits[:, VOCAB * q + p, FORBIDDEN[p]] = math.log(eps * (VOCAB - 1) / (1 - eps))
    return logits


class Mismatch:
    """Builds pi_roll from the current logits for one (mismatch, T) cell; fixed parts are drawn once per seed."""

    def __init__(self, spec: dict[str, Any], horizon: int, seeds: int, runs_per_seed: int, num_states: int):
        self.spec, self.horizon, self.seeds, self.runs_per_seed = spec, horizon, seeds, runs_per_seed
        self.history: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(1234 + horizon)
        self.fragile = None
        if spec["kind"] == "flips":
            # One fragile set and one perturbation per seed, shared by every correction mode of that seed.
            g = torch.Generator().manual_seed(99 + horizon)
            fragile = torch.rand(seeds, horizon, num_states, generator=g) < spec["p"]  # (K, T, S)
            delta = spec["sigma"] * torch.randn(seeds, horizon, num_states, VOCAB, generator=g, dtype=torch.float64)
            self.fragile = fragile.repeat_interleave(runs_per_seed, 0)  # (B, T, S), run b = seed b // runs_per_seed
            self.delta = delta.repeat_interleave(runs_per_seed, 0) * self.fragile.unsqueeze(-1)  # (B, T, S, V)

    def roll_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 1 or T, S, V) pi_roll for (B, S, V) detached logits of pi_theta."""
        kind = self.spec["kind"]
        self.history.append(logits.clone())
        if kind == "none":
            return torch.softmax(logits, -1).unsqueeze(1)
        if kind == "stale":
            old = self.history[max(0, len(self.history) - 1 - self.spec["k"])]
            return torch.softmax(old, -1).unsqueeze(1)
        if kind == "precision":
            shape = (logits.shape[0], self.horizon, *logits.shape[1:])  # (B, T, S, V)
            noise = torch.randn(shape, generator=self.generator, dtype=torch.float64)
            return torch.softmax(logits.unsqueeze(1) + self.spec["sigma"] * noise, -1)
        if kind == "flips":
            return torch.softmax(logits.unsqueeze(1) + self.delta, -1)
        raise ValueError(f"unknown mismatch kind {kind!r}")


def run_cell(mismatch: str, horizon: int, config: SweepConfig) -> dict[str, Any]:
    """Train every mode x seed of one (mismatch, T) cell in lockstep (batched); return per-mode curves and stats."""
    machine = build_machine(horizon)
    modes, K, N, T = config.modes, config.seeds, config.num_samples, horizon
    M = len(modes)
    B = M * K  # run b: mode b // K, seed b % K ... arranged seed-major below for the shared fixed parts
    # Seed-major layout: run b = seed * M + mode, so runs of one seed are contiguous (fixed mismatch parts repeat).
    mode_of = torch.arange(B) % M
    mismatch_model = Mismatch(MISMATCHES[mismatch], T, K, M, machine.num_states)
    logits = initial_logits(T, B)  # (B, S, V)
    param = logits.clone().requires_grad_(True)
    adam = _Adam(param, config.learning_rate)
    sampler = torch.Generator().manual_seed(7 + T)
    j_curve = [lh.expected_reward(machine, torch.softmax(logits, -1).unsqueeze(1))]  # [(B,)]
    accept, token_keep, weight_mean = [], [], []
    errors: list[dict[str, torch.Tensor]] = []
    mismatch_stats = {k: [] for k in ("abs_dlogp", "kl_tok", "k3", "chi2_tok", "d_max", "ess", "fragile_frac")}
    zero_grad_steps = torch.zeros(B)
    error_at = {round(i * (config.steps - 1) / max(1, config.error_steps - 1)) for i in range(config.error_steps)}
    for step in range(config.steps):
        logits = param.detach()
        probs_roll = mismatch_model.roll_probs(logits)  # (B, 1|T, S, V)
        states, tokens, final = lh.sample(machine, probs_roll, N, sampler)  # (B, N, T), (B, N, T), (B, N)
        param.grad = None
        logp_theta = _path_log_softmax(param, states, tokens)  # (B, N, T), differentiable
        logp_roll = lh.path_logprobs(probs_roll, states, tokens)  # (B, N, T)
        probs_theta = torch.softmax(logits, -1).unsqueeze(1)  # (B, 1, S, V) detached
        kl_tok = lh.path_kl(probs_roll, probs_theta, states)  # (B, N, T) exact
        reward = machine.reward[final]  # (B, N)
        advantage = reward - reward.mean(-1, keepdim=True)  # (B, N)
        with torch.no_grad():
            lp_theta = logp_theta.detach()
            weights = torch.zeros(B, N, T, dtype=torch.float64)
            keep = torch.zeros(B, N, dtype=torch.float64)
            for m, mode in enumerate(modes):
                rows = (mode_of == m).nonzero().flatten()  # the K runs of this mode; masks are per sequence
                theta_m, roll_m = lp_theta[rows].reshape(-1, T), logp_roll[rows].reshape(-1, T)  # (K N, T)
                mask = torch.ones_like(theta_m)
                kwargs = MODES[mode]
                result = compute_trust_region_mask(
                    theta_m, roll_m, mask, mode=mode, kl_tok=kl_tok[rows].reshape(-1, T), **kwargs
                )
                w = estimator_weights(
                    result,
                    theta_m,  # pi_old = pi_theta at the step (one gradient step per batch)
                    roll_m,
                    mask,
                    mode=mode,
                    ratio_min=kwargs.get("ratio_min"),
                    ratio_max=kwargs.get("ratio_max", 2.0),
                    ratio_factor=True,
                )
                weights[rows] = w.reshape(len(rows), N, T)
                keep[rows] = result.keep.double().reshape(len(rows), N)
            log_ratio = lp_theta - logp_roll  # (B, N, T)
            mismatch_stats["abs_dlogp"].append(float(log_ratio.abs().mean()))
            mismatch_stats["k3"].append(float((torch.expm1(log_ratio) - log_ratio).mean()))
            mismatch_stats["chi2_tok"].append(float(torch.expm1(log_ratio).square().mean()))
            mismatch_stats["d_max"].append(float(log_ratio.abs().amax(-1).mean()))
            seq = log_ratio.sum(-1)  # (B, N) product ratios in log space
            log_ess = 2 * torch.logsumexp(seq, -1) - torch.logsumexp(2 * seq, -1) - math.log(N)  # (B,)
            mismatch_stats["ess"].append(float(log_ess.exp().mean()))
            mismatch_stats["kl_tok"].append(float(kl_tok.mean()))
            if mismatch_model.fragile is not None:
                hit = lh.gather_context(mismatch_model.fragile.double(), states)  # (B, N, T) 1 at fragile (t, s)
                mismatch_stats["fragile_frac"].append(float(hit.mean()))
        accept.append(keep.mean(-1))  # (B,)
        token_keep.append((weights > 0).double().mean((-2, -1)))  # (B,)
        weight_mean.append(weights.mean((-2, -1)))
        # The talk's estimator: maximise (1 / (N T)) sum_i sum_t w_it A_i log pi_theta(y_t | s_t).
        objective = (weights * advantage.unsqueeze(-1) * logp_theta).sum((-2, -1)) / (N * T)  # (B,)
        (-objective.sum()).backward()
        zero_grad_steps += (param.grad.abs().amax((-2, -1)) == 0).double()  # (B,) all-rejected batches
        adam.step()
        probs_new = torch.softmax(param.detach(), -1).unsqueeze(1)
        j_curve.append(lh.expected_reward(machine, probs_new))
        if step in error_at:
            q = lh.exact_quantities(machine, probs_new, probs_roll)
            bounds = q.bounds()
            errors.append(
                {
                    "error": q.error,
                    "ratio_best": q.error.abs() / bounds["best"],
                    "ratio_trpo": q.error.abs() / bounds["trpo"],
                    "ratio_pm": q.error.abs() / bounds["pinsker_marginal"],
                    "ratio_mixed": q.error.abs() / bounds["mixed"],
                    "kl_tok_max": q.kl_tok_max,
                    "kl_seq": q.kl_seq,
                    "best_bound": bounds["best"],
                    "certified": (minorizer(q.surrogate_gain, T, q.kl_tok_max, q.kl_seq) > 0).double(),
                    "gain": q.j_theta - q.j_roll,
                }
            )
    j = torch.stack(j_curve, 1)  # (B, steps + 1)
    falls = (j[:, :-1] - j[:, 1:]).clamp(min=0)  # (B, steps)
    out: dict[str, Any] = {
        "mismatch": mismatch,
        "length": T,
        "measured": {k: (float(np.mean(v)) if v else None) for k, v in mismatch_stats.items()},
        "modes": {},
    }
    acc = torch.stack(accept, 1)  # (B, steps)
    tok = torch.stack(token_keep, 1)
    wmean = torch.stack(weight_mean, 1)
    err = {k: torch.stack([e[k] for e in errors], 1) for k in errors[0]}  # (B, evals)
    for m, mode in enumerate(modes):
        rows = (mode_of == m).nonzero().flatten()
        jm = j[rows]
        finite_ratio = err["ratio_best"][rows]
        out["modes"][mode] = {
            "j_curve_mean": jm.mean(0).tolist(),
            "j_initial": float(jm[:, 0].mean()),
            "j_final_mean": float(jm[:, -1].mean()),
            "j_final_std": float(jm[:, -1].std()) if len(rows) > 1 else 0.0,
            "j_final_per_seed": jm[:, -1].tolist(),
            "violation_rate": float((falls[rows] > 1e-12).double().mean()),
            "largest_fall": float(falls[rows].max()),
            "accept_rate": float(acc[rows].mean()),
            "token_keep_rate": float(tok[rows].mean()),
            "weight_mean": float(wmean[rows].mean()),
            "zero_gradient_steps": float(zero_grad_steps[rows].mean()),
            "error_abs_max": float(err["error"][rows].abs().max()),
            "error_over_bound_max": float(finite_ratio.max()),
            "error_over_trpo_max": float(err["ratio_trpo"][rows].max()),
            "error_over_pinsker_marginal_max": float(err["ratio_pm"][rows].max()),
            "error_over_mixed_max": float(err["ratio_mixed"][rows].max()),
            "kl_tok_max_mean": float(err["kl_tok_max"][rows].mean()),
            "kl_seq_mean": float(err["kl_seq"][rows].mean()),
            "best_bound_median": float(err["best_bound"][rows].median()),
            "certified_rate": float(err["certified"][rows].mean()),
        }
    return out


class _Adam:
    """Adam (default betas, eps 1e-8) on one tensor, elementwise, so the batched runs stay independent. Written out
    to keep the sweep free of ``torch.optim`` (whose import pulls in the compiler stack: seconds on a busy core)."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        g = self.param.grad
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        self.param.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def _path_log_softmax(logits: torch.Tensor, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi_theta(y_t | s_t) along (B, N, T) paths for (B, S, V) logits, differentiable: (B, N, T)."""
    log_probs = torch.log_softmax(logits, -1)  # (B, S, V)
    B, N, T = states.shape
    flat = (states * logits.shape[-1] + tokens).reshape(B, N * T)  # index into the flattened (S * V) table
    return log_probs.reshape(B, -1).gather(1, flat).reshape(B, N, T)


def _children_cpu() -> tuple[float, float]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def _timed_cell(job: tuple[str, int], config: SweepConfig) -> tuple[dict[str, Any], float]:
    torch.set_num_threads(1)
    start = time.perf_counter()
    cell = run_cell(job[0], job[1], config)
    return cell, time.perf_counter() - start


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per (mismatch, T, mode)."""
    rows = []
    for cell in cells:
        for mode, s in cell["modes"].items():
            rows.append(
                {
                    "mismatch": cell["mismatch"],
                    "length": cell["length"],
                    "mode": mode,
                    **{k: v for k, v in s.items() if not isinstance(v, list)},
                    "measured_abs_dlogp": cell["measured"]["abs_dlogp"],
                    "measured_kl_tok": cell["measured"]["kl_tok"],
                    "measured_fragile_frac": cell["measured"]["fragile_frac"],
                    "measured_k3": cell["measured"]["k3"],
                    "measured_chi2_tok": cell["measured"]["chi2_tok"],
                    "measured_d_max": cell["measured"]["d_max"],
                    "measured_ess": cell["measured"]["ess"],
                }
            )
    return rows


def markdown_tables(cells: list[dict[str, Any]], config: SweepConfig) -> str:
    """Per mismatch: final J (mean ± std over seeds) and accept rate per T and mode; then violations and Error."""
    by = {(c["mismatch"], c["length"]): c for c in cells}
    lengths = sorted({c["length"] for c in cells})
    lines = [
        f"Simulator sweep: {config.seeds} seeds, {config.steps} steps, N = {config.num_samples}, lr = "
        f"{config.learning_rate}. Cells: final J (mean ± std over seeds) / accept rate / violation rate "
        "(fraction of steps where the exact J fell).",
        "",
    ]
    for mismatch in config.mismatches:
        measured = by[(mismatch, lengths[-1])]["measured"]
        extra = f"; fragile positions {measured['fragile_frac']:.2g}" if measured["fragile_frac"] is not None else ""
        lines += [
            f"### {mismatch}",
            "",
            f"Measured at T = {lengths[-1]} (mean over steps and runs): |Δlogp| {measured['abs_dlogp']:.2g}, exact "
            f"KL_t {measured['kl_tok']:.2g}, k3 {measured['k3']:.2g}, χ²_tok {measured['chi2_tok']:.2g}, D_max "
            f"{measured['d_max']:.2g}, ESS {measured['ess']:.2g}{extra}.",
            "",
            "| mode | " + " | ".join(f"T={T}" for T in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for mode in config.modes:
            cells_row = []
            for T in lengths:
                s = by[(mismatch, T)]["modes"][mode]
                cells_row.append(
                    f"{s['j_final_mean']:.3f} ± {s['j_final_std']:.3f} / {s['accept_rate']:.2f} / "
                    f"{s['violation_rate']:.2f}"
                )
            lines.append(f"| {mode} | " + " | ".join(cells_row) + " |")
        lines.append("")
    lines += [
        "### Exact |Error| / best bound (max over evaluated steps and seeds), and certified-improvement rate",
        "",
        "| mismatch | T | " + " | ".join(config.modes) + " |",
        "|---|---|" + "---|" * len(config.modes),
    ]
    for mismatch in config.mismatches:
        for T in lengths:
            s = by[(mismatch, T)]["modes"]
            lines.append(
                f"| {mismatch} | {T} | "
                + " | ".join(
                    f"{s[m]['error_over_bound_max']:.2g} ({s[m]['certified_rate']:.2f})" for m in config.modes
                )
                + " |"
            )
    lines.append("")
    return "\n".join(lines)


def plot(cells: list[dict[str, Any]], config: SweepConfig, out_dir: Path) -> list[Path]:
    """J vs T per method, violation rate vs T, accept rate vs T: one panel per mismatch setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(c["mismatch"], c["length"]): c for c in cells}
    lengths = sorted({c["length"] for c in cells})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label, name in [
        ("j_final_mean", "final J", "j_vs_T.png"),
        ("violation_rate", "fraction of steps where J fell", "violation_vs_T.png"),
        ("accept_rate", "accept rate (sequences)", "accept_vs_T.png"),
    ]:
        n = len(config.mismatches)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax, mismatch in zip(axes.flat, config.mismatches, strict=False):
            for mode in config.modes:
                ys = [by[(mismatch, T)]["modes"][mode][key] for T in lengths]
                style = (
                    "-" if mode.startswith("trm") else "--" if mode.startswith("seq") or mode == "geo_mask" else ":"
                )
                ax.plot(lengths, ys, style, marker="o", ms=3, label=mode)
            ax.set_xscale("log", base=2)
            ax.set_title(mismatch, fontsize=9)
            ax.set_xlabel("T")
            ax.set_ylabel(label, fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Exact long-horizon simulator sweep of every correction mode.")
    parser.add_argument("--quick", action="store_true", help="< 60 s smoke version (2 lengths, 2 seeds, 3 steps)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="processes (one thread each)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--plots-dir", type=Path, default=PLOTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = SweepConfig(**QUICK) if args.quick else SweepConfig()
    start = time.perf_counter()
    jobs = [(mismatch, T) for T in config.lengths for mismatch in config.mismatches]
    jobs.sort(key=lambda job: -job[1])  # longest first: better packing over the workers
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {pool.submit(_timed_cell, job, config): job for job in jobs}
            for future in as_completed(futures):
                cell, seconds = future.result()
                cells[futures[future]] = cell
                print(f"T={cell['length']:5d} {cell['mismatch']:20s} {seconds:6.1f}s", flush=True)
    else:
        for job in jobs:
            cell, seconds = _timed_cell(job, config)
            cells[job] = cell
            print(f"T={cell['length']:5d} {cell['mismatch']:20s} {seconds:6.1f}s", flush=True)
    cells = [cells[(m, T)] for T in config.lengths for m in config.mismatches]
    elapsed = time.perf_counter() - start
    payload = {
        "config": asdict(config),
        "elapsed_s": elapsed,
        "workers": args.workers,
        "cpu_s": time.process_time() + sum(_children_cpu()),
        "cells": cells,
    }
    prefix = "simulator_quick_" if args.quick else "simulator_"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{prefix}sweep.json").write_text(json.dumps(payload, indent=1))
    rows = summarize(cells)
    with open(args.results_dir / f"{prefix}summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.results_dir / f"{prefix}table.md").write_text(markdown_tables(cells, config))
    plot(cells, config, args.plots_dir / ("quick" if args.quick else ""))
    print(f"done in {elapsed:.0f}s -> {args.results_dir}/{prefix}*", flush=True)
    return payload


if __name__ == "__main__":
    main()
