"""Simulator sweep (issue 17): where rollout/training mismatch does harm in an exact long-horizon environment, and
whether TRM prevents it, against every correction mode of the library, PPO-clip against pi_roll and two controls.

One command, offline, CPU (``make sweep``)::

    .venv/bin/python -m experiments.simulator_sweep            # full sweep (a few minutes on 2 cores)
    .venv/bin/python -m experiments.simulator_sweep --quick    # < 60 s smoke version (tests/test_simulator_sweep.py)

Stages: (1) tune the learning rate of Adam and of SGD on `none` without mismatch (grid below, best mean final J, on
seeds the cells do not use) and calibrate `trm_90`'s thresholds on those runs' sequences; (2) run every cell
(family, lambda or staleness, optimiser) for every method, paired by seed; (3) apply the pre-registered rule of
``docs/simulator.md`` (:mod:`experiments.sim_report`). The environment and the families are in
:mod:`experiments.sim_families`, the training loop in :mod:`experiments.sim_training`.

Results: ``experiments/results/simulator_{sweep.json, summary.csv, table.md}`` and ``docs/simulator/*.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import sim_families as fam
from . import sim_report as rep
from . import sim_training as tr

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "experiments" / "results"
PLOTS_DIR = ROOT / "docs" / "simulator"

# Grid (explicit constants: the budget of the full sweep is set here).
HORIZON = 64
SEEDS = 16
STEPS = 20
NUM_SAMPLES = 32
EPOCHS = 4
LAMBDAS = (0.1, 0.5, 2.0)
STALE = (4, 8, 16)  # drift under reuse: pi_roll is pi_theta of k updates ago (at lambda = STALE_LAMBDA)
STALE_LAMBDA = 0.5
LR_GRID = {"adam": (0.1, 0.3, 1.0), "sgd": (3.0, 10.0, 30.0)}
TUNING_SEEDS = tuple(range(1000, 1008))
WORKERS = 2
QUICK = {
    "seeds": 3,
    "steps": 3,
    "num_samples": 8,
    "lambdas": (0.5,),
    "stale": (1,),
    "lr_grid": {"adam": (0.1,), "sgd": (100.0,)},
}


@dataclass
class SweepConfig:
    horizon: int = HORIZON
    seeds: int = SEEDS
    steps: int = STEPS
    num_samples: int = NUM_SAMPLES
    epochs: int = EPOCHS
    lambdas: tuple[float, ...] = LAMBDAS
    stale: tuple[int, ...] = STALE
    lr_grid: dict[str, tuple[float, ...]] | None = None

    def __post_init__(self):
        self.lr_grid = dict(LR_GRID) if self.lr_grid is None else self.lr_grid


def _spec(config: SweepConfig, optimiser: str, lr: float, lam: float, family: str, seeds, stale_k: int = 0):
    return tr.RunSpec(
        horizon=config.horizon,
        family=family,
        kappa=fam.kappa_for(lam, config.horizon),
        seeds=list(seeds),
        optimiser=optimiser,
        lr=lr,
        steps=config.steps,
        num_samples=config.num_samples,
        epochs=config.epochs,
        stale_k=stale_k,
    )


def tune(config: SweepConfig) -> dict[str, Any]:
    """Per optimiser: the learning rate of the grid with the best mean final J of `none` without mismatch (lambda =
    0.5, ``TUNING_SEEDS``), and trm_90's thresholds from that run's per-sequence (D_max, D_avg) at every epoch."""
    machine = fam.build_machine(config.horizon)
    seeds = TUNING_SEEDS[: max(2, min(len(TUNING_SEEDS), config.seeds))]
    result = {}
    for optimiser, grid in config.lr_grid.items():
        scores, stats = {}, {}
        for lr in grid:
            out = tr.run_method(machine, "none", _spec(config, optimiser, lr, 0.5, "exact", seeds))
            scores[lr] = float(out["j_new"][:, -1].mean())
            stats[lr] = torch.cat(out["stats"])
        chosen = max(grid, key=lambda lr: scores[lr])
        result[optimiser] = {
            "grid": list(grid),
            "final_j": scores,
            "chosen": chosen,
            "trm90": tr.calibrate_trm90(stats[chosen]),
        }
    return result


def cells_of(config: SweepConfig) -> list[dict[str, Any]]:
    """Every cell: (name, family, lambda, stale k, optimiser)."""
    cells = []
    for optimiser in config.lr_grid:
        for lam in config.lambdas:
            for family in ("collapse", "noise"):
                cells.append({"family": family, "lambda": lam, "stale_k": 0, "optimiser": optimiser})
        for k in config.stale:
            cells.append({"family": "stale", "lambda": STALE_LAMBDA, "stale_k": k, "optimiser": optimiser})
    for c in cells:
        tag = f"k={c['stale_k']}" if c["family"] == "stale" else f"λ={c['lambda']}"
        c["name"] = f"{c['family']} {tag} {c['optimiser']}"
    return cells


def run_cell(cell: dict[str, Any], config: SweepConfig, tuning: dict[str, Any]) -> dict[str, Any]:
    """Every method of one cell plus the no-mismatch `none` reference, on the same seeds."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    machine = fam.build_machine(config.horizon)
    t = tuning[cell["optimiser"]]
    spec = _spec(
        config, cell["optimiser"], t["chosen"], cell["lambda"], cell["family"], range(config.seeds), cell["stale_k"]
    )
    spec.trm90 = t["trm90"]
    raw = {"trm": tr.run_method(machine, "trm", spec)}
    for method in tr.METHODS:
        if method != "trm":
            raw[method] = tr.run_method(machine, method, spec, trm_counts=raw["trm"]["counts"])
    reference = tr.run_method(machine, "none", replace(spec, family="exact"))
    out = dict(cell, methods={m: rep.per_seed(raw[m]) for m in tr.METHODS})
    out["reference"] = {"methods": {"none": rep.per_seed(reference)}}
    out["control"] = rep.positive_control(out, out["reference"])
    out["verdicts"] = [rep.verdict(out, "trm"), rep.verdict(out, "trm_90")]
    out["seconds"] = time.perf_counter() - start
    return out


def summary_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per (cell, method): means over seeds and the paired difference with `none`."""
    rows = []
    for cell in cells:
        for name, s in cell["methods"].items():
            diff, se = rep.paired(s["j_final"], cell["methods"]["none"]["j_final"])
            rows.append(
                {
                    "cell": cell["name"],
                    "family": cell["family"],
                    "lambda": cell["lambda"],
                    "stale_k": cell["stale_k"],
                    "optimiser": cell["optimiser"],
                    "method": name,
                    "control_passed": cell["control"]["passed"],
                    **{k: float(np.mean(s[k])) for k in rep.PER_SEED},
                    "j_final_std": float(np.std(s["j_final"], ddof=1)),
                    "j_diff_vs_none": diff,
                    "j_diff_se": se,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Exact simulator sweep of every correction (issue 17).")
    parser.add_argument("--quick", action="store_true", help="< 60 s smoke version (3 seeds, 3 updates, λ = 0.5)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="processes (one thread each)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--plots-dir", type=Path, default=PLOTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = SweepConfig(**QUICK) if args.quick else SweepConfig()
    start, load_start = time.perf_counter(), os.getloadavg()
    tuning = tune(config)
    print(f"tuned: { {o: t['chosen'] for o, t in tuning.items()} } ({time.perf_counter() - start:.0f}s)", flush=True)
    jobs = cells_of(config)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            cells = list(pool.map(run_cell, jobs, [config] * len(jobs), [tuning] * len(jobs)))
    else:
        cells = [run_cell(job, config, tuning) for job in jobs]
    for cell in cells:
        print(
            f"{cell['name']:24s} {cell['seconds']:6.1f}s  control {'passed' if cell['control']['passed'] else 'failed'}"
            f"  trm: {cell['verdicts'][0]['verdict']}",
            flush=True,
        )
    payload = {
        "config": asdict(config),
        "tuning": tuning,
        "cells": cells,
        "elapsed_s": time.perf_counter() - start,
        "workers": args.workers,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    prefix = "simulator_quick_" if args.quick else "simulator_"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{prefix}sweep.json").write_text(json.dumps(payload, indent=1, default=float))
    rows = summary_rows(cells)
    with open(args.results_dir / f"{prefix}summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.results_dir / f"{prefix}table.md").write_text(rep.markdown(payload))
    rep.plot(payload, args.plots_dir / ("quick" if args.quick else ""))
    print(
        f"done in {payload['elapsed_s']:.0f}s (load {load_start[0]:.1f} -> {payload['loadavg_end'][0]:.1f}) -> "
        f"{args.results_dir}/{prefix}*",
        flush=True,
    )
    return payload


if __name__ == "__main__":
    main()
