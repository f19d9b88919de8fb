"""Plots of a run's reward and `trm/` metrics, from `trm_stats.jsonl` (written by `TRMStatsCallback`) or from the
`log_history` of a `trainer_state.json`. matplotlib is needed (`pip install trl-trm[plot]`); it is imported lazily."""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

STATS_FILE = "trm_stats.jsonl"
PLOT_FILE = "trm_stats.png"

# (panel title, [(metric key, label)])
PANELS = (
    ("reward", [("reward", "reward (mean)")]),
    ("accept / reject rates", [("trm/accept_rate", "accept rate"), ("trm/reject_rate/*", "reject: {}")]),
    (
        "trust-region size",
        [("trm/log_ratio_abs_max/mean", "max_t |log ρ| (mean)"), ("trm/log_ratio_abs_max/max", "max_t |log ρ| (max)")],
    ),
    ("divergence", [("trm/kl_k3", "KL k3"), ("trm/k3_mean/max", "D_avg (max)"), ("trm/kl_tok_max/max", "KL_tok max")]),
)


def _last_checkpoint_state(run_dir: str) -> str | None:
    states = {}
    for path in glob.glob(os.path.join(run_dir, "checkpoint-*", "trainer_state.json")):
        suffix = os.path.basename(os.path.dirname(path))[len("checkpoint-") :]
        if suffix.isdigit():
            states[int(suffix)] = path
    return states[max(states)] if states else None


def load_history(run_dir: str) -> tuple[list[dict[str, Any]], str]:
    """Training log records (each with `step`) and the file they came from. Raises ValueError when none exists."""
    stats = os.path.join(run_dir, STATS_FILE)
    if os.path.exists(stats):
        records = []
        with open(stats, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{stats}, line {number}: a {type(record).__name__}, not a JSON object: every line of "
                        f"{STATS_FILE} is one record of a logging step; remove or fix that line."
                    )
                records.append(record)
        return records, stats
    state = os.path.join(run_dir, "trainer_state.json")
    if not os.path.exists(state):
        state = _last_checkpoint_state(run_dir)
    if state is None:
        raise ValueError(
            f"No {STATS_FILE} or trainer_state.json in {run_dir!r}: point `trl-trm plot` at a training output_dir "
            "(or a checkpoint folder)."
        )
    with open(state, encoding="utf-8") as f:
        history = json.load(f).get("log_history", [])
    return [h for h in history if "step" in h and ("reward" in h or any(k.startswith("trm/") for k in h))], state


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not math.isnan(float(v)):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_history(records: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Draw reward and `trm/` metrics over steps into a PNG at `path`; returns it."""
    if not records:
        raise ValueError("Nothing to plot: the run logged no reward or trm/ metric (check logging_steps).")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("Plotting needs matplotlib: `pip install 'trl-trm[plot]'`.") from err

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (panel, metrics) in zip(axes.flat, PANELS, strict=True):
        drawn = 0
        for key, label in metrics:
            keys = [key]
            if key.endswith("/*"):
                prefix = key[:-1]
                keys = sorted({k for r in records for k in r if k.startswith(prefix)})
            for k in keys:
                xs, ys = _series(records, k)
                if xs:
                    ax.plot(xs, ys, marker="o", markersize=3, label=label.format(k.rsplit("/", 1)[-1]))
                    drawn += 1
        if panel == "reward":
            xs, ys = _series(records, "reward")
            _, std = _series(records, "reward_std")
            if xs and len(std) == len(ys):
                ax.fill_between(
                    xs,
                    [y - s for y, s in zip(ys, std, strict=True)],
                    [y + s for y, s in zip(ys, std, strict=True)],
                    alpha=0.2,
                )
        if panel == "trust-region size" or panel == "divergence":
            positive = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
            if positive and max(positive) / min(positive) > 100:
                ax.set_yscale("log")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str, output: str | None = None) -> str:
    """Redraw a run's plot from its `trm_stats.jsonl` or `trainer_state.json`; returns the PNG path."""
    records, source = load_history(run_dir)
    return plot_history(records, output or os.path.join(run_dir, PLOT_FILE), title=os.path.basename(source))
