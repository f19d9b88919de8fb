"""Paired statistics, the pre-registered verdict (docs/simulator.md) and the tables and plots of the simulator sweep.

Every comparison is paired by seed: for methods a, b and a per-seed metric x, ``paired(a, b)`` gives the mean of
x_a,s - x_b,s and its standard error std_s(x_a,s - x_b,s) / sqrt(n).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .sim_training import TOKEN_LEVEL

FALL_THRESHOLD = 1e-3  # pre-registered (docs/simulator.md): far above the DP's numerical noise (< 1e-12)
PER_SEED = ("j_final", "viol_roll", "viol_old", "largest_fall", "accept", "zero_steps")


def per_seed(out: dict[str, Any]) -> dict[str, list[float]]:
    """Per-seed metrics of one method's run group (the curves of :func:`~experiments.sim_training.run_method`)."""
    j_new, j_old, j_roll = (np.asarray(out[k], dtype=float) for k in ("j_new", "j_old", "j_roll"))  # (R, steps)
    return {
        "j_final": j_new[:, -1].tolist(),
        "viol_roll": (j_new < j_roll - FALL_THRESHOLD).mean(1).tolist(),
        "viol_old": (j_new < j_old - FALL_THRESHOLD).mean(1).tolist(),
        "largest_fall": np.clip(j_old - j_new, 0, None).max(1).tolist(),
        "accept": np.asarray(out["accept"], dtype=float).mean(1).tolist(),
        "zero_steps": np.asarray(out["zero"], dtype=float).sum(1).tolist(),
        "visits": np.asarray(out["visits"], dtype=float).mean(1).tolist(),
        "j_curve": j_new.mean(0).tolist(),
    }


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a - b, paired standard error)."""
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def beats(a: list[float], b: list[float], higher_is_better: bool) -> bool:
    """a beats b by more than 2 paired SE (a tie of two all-zero violation records is not a win)."""
    diff, se = paired(a, b) if higher_is_better else paired(b, a)
    if se == 0 and diff == 0:
        return False
    return diff > 2 * se


def positive_control(cell: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | bool]:
    """`none` of the cell against `none` without mismatch: passed iff the final J is > 3 paired SE lower."""
    diff, se = paired(cell["methods"]["none"]["j_final"], reference["methods"]["none"]["j_final"])
    return {"diff": diff, "se": se, "passed": bool(diff < -3 * se)}


def _best(methods: dict[str, Any], metric: str, higher_is_better: bool) -> str:
    names = [m for m in TOKEN_LEVEL if m in methods]
    key = (lambda m: np.mean(methods[m][metric])) if higher_is_better else (lambda m: -np.mean(methods[m][metric]))
    return max(names, key=key)


def verdict(cell: dict[str, Any], trm: str = "trm") -> dict[str, Any]:
    """The pre-registered rule for one TRM variant in one cell (needs ``cell['control']`` and ``cell['lambda']``)."""
    m = cell["methods"]
    best_j, best_v = _best(m, "j_final", True), _best(m, "viol_roll", False)
    wins = {
        "token_j": beats(m[trm]["j_final"], m[best_j]["j_final"], True),
        "token_viol": beats(m[trm]["viol_roll"], m[best_v]["viol_roll"], False),
        "random_j": beats(m[trm]["j_final"], m["ctrl_random"]["j_final"], True),
        "random_viol": beats(m[trm]["viol_roll"], m["ctrl_random"]["viol_roll"], False),
        "count_j": beats(m["ctrl_count"]["j_final"], m[best_j]["j_final"], True),
        "count_viol": beats(m["ctrl_count"]["viol_roll"], m[best_v]["viol_roll"], False),
    }
    eligible = bool(cell["control"]["passed"]) and cell["lambda"] <= 0.5
    diff, se = paired(m[trm]["j_final"], m[best_j]["j_final"])
    if eligible and all(wins.values()):
        word = "helps"
    elif beats(m[best_j]["j_final"], m[trm]["j_final"], True):
        word = "harms"
    else:
        word = "no difference detected"
    return {
        "method": trm,
        "verdict": word,
        "eligible": eligible,
        "best_token_j": best_j,
        "best_token_viol": best_v,
        "wins": wins,
        "j_diff_vs_best": diff,
        "j_se_vs_best": se,
    }


def cell_rows(cell: dict[str, Any]) -> list[str]:
    """Markdown rows: every method's metrics and its paired final-J difference with `none`."""
    m = cell["methods"]
    rows = []
    for name, s in m.items():
        diff, se = paired(s["j_final"], m["none"]["j_final"])
        vdiff, vse = paired(s["viol_roll"], m["none"]["viol_roll"])
        rows.append(
            f"| {name} | {np.mean(s['j_final']):.3f} ± {np.std(s['j_final'], ddof=1):.3f} | {diff:+.3f} ± {se:.3f} | "
            f"{np.mean(s['viol_roll']):.3f} ({vdiff:+.3f} ± {vse:.3f}) | {np.mean(s['viol_old']):.3f} | "
            f"{np.max(s['largest_fall']):.3f} | {np.mean(s['accept']):.2f} | {np.mean(s['zero_steps']):.1f} |"
        )
    return rows


def overview(payload: dict[str, Any]) -> list[str]:
    """One row per cell: the positive control, final J of the key methods, the violation share against pi_roll of
    `none` and `trm`, and the two verdicts."""
    keys = ("none", "ppo_roll", "token_mis", "seq_tis", "trm", "trm_90", "trm_exact", "ctrl_random", "ctrl_count")
    lines = [
        "| cell | positive control (Δ ± SE) | "
        + " | ".join(f"`{k}`" for k in keys)
        + " | viol. none / trm | verdict trm | verdict trm_90 |",
        "|---|---|" + "---|" * (len(keys) + 3),
    ]
    for cell in payload["cells"]:
        m, pc = cell["methods"], cell["control"]
        flag = "passed" if pc["passed"] else "failed"
        lines.append(
            f"| {cell['name']} | {pc['diff']:+.3f} ± {pc['se']:.3f} {flag} | "
            + " | ".join(f"{np.mean(m[k]['j_final']):.3f}" for k in keys)
            + f" | {np.mean(m['none']['viol_roll']):.2f} / {np.mean(m['trm']['viol_roll']):.2f} | "
            + " | ".join(v["verdict"] for v in cell["verdicts"])
            + " |"
        )
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """Tables of every cell: positive control, the methods, the verdicts."""
    cfg = payload["config"]
    lines = [
        f"Simulator sweep (issue 17): T = {cfg['horizon']}, {cfg['seeds']} seeds (paired), {cfg['steps']} updates of "
        f"N = {cfg['num_samples']}, K = {cfg['epochs']} epochs, PPO clip ε = 0.2; fall threshold {FALL_THRESHOLD}. "
        "Columns: final J (mean ± std over seeds) | paired difference with `none` ± SE | share of updates with "
        "J(π_new) < J(π_roll) − thr (paired difference with `none` ± SE) | share with J(π_new) < J(π_old) − thr | "
        "largest fall | accept rate | updates with no accepted sequence.",
        "",
        "Learning rates (tuned on `none` without mismatch): "
        + ", ".join(f"{o}: {t['chosen']} (grid {t['grid']})" for o, t in payload["tuning"].items())
        + "; trm_90 thresholds: "
        + ", ".join(
            f"{o}: δ_max {t['trm90']['delta_max']:.3g}, δ_avg {t['trm90']['delta_avg']:.3g}"
            for o, t in payload["tuning"].items()
        ),
        "",
        "### Overview (final J, mean over seeds)",
        "",
        *overview(payload),
        "",
    ]
    for cell in payload["cells"]:
        pc = cell["control"]
        lines += [
            f"### {cell['name']}",
            "",
            f"Positive control: `none` − no-mismatch `none` = {pc['diff']:+.3f} ± {pc['se']:.3f} (paired SE) → "
            f"{'passed' if pc['passed'] else 'failed'}. Fragile visits per sequence (sampled, `none`): "
            f"{np.mean(cell['methods']['none']['visits']):.2f}.",
            "",
            "| method | final J | Δ vs none | viol. vs π_roll | viol. vs π_old | largest fall | accept | no-accept updates |",
            "|---|---|---|---|---|---|---|---|",
            *cell_rows(cell),
            "",
        ]
        for v in cell["verdicts"]:
            lines.append(
                f"- `{v['method']}`: **{v['verdict']}** (eligible: {v['eligible']}; vs best token-level "
                f"`{v['best_token_j']}` on J: {v['j_diff_vs_best']:+.3f} ± {v['j_se_vs_best']:.3f}; wins: "
                + ", ".join(k for k, w in v["wins"].items() if w)
                + ")"
            )
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per optimiser: the paired final-J difference with `none` (± 2 SE) and the violation share, one panel per
    cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for opt in sorted({c["optimiser"] for c in payload["cells"]}):
        cells = [c for c in payload["cells"] if c["optimiser"] == opt]
        for key, label, name in (
            ("j_final", "final J − none's (± 2 paired SE)", "final_j"),
            ("viol_roll", "share J(π_new) < J(π_roll) − thr", "violations"),
        ):
            cols = min(4, len(cells))
            rows = math.ceil(len(cells) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
            for ax, cell in zip(axes.flat, cells, strict=False):
                names = list(cell["methods"])
                if key == "j_final":
                    stats = [paired(cell["methods"][n][key], cell["methods"]["none"][key]) for n in names]
                    ax.errorbar(range(len(names)), [s[0] for s in stats], yerr=[2 * s[1] for s in stats], fmt="o")
                    ax.axhline(0, color="gray", lw=0.5)
                else:
                    ax.bar(range(len(names)), [np.mean(cell["methods"][n][key]) for n in names])
                ax.set_xticks(range(len(names)), names, rotation=75, fontsize=6)
                ax.set_title(
                    f"{cell['name']} ({'PC passed' if cell['control']['passed'] else 'PC failed'})", fontsize=8
                )
                ax.set_ylabel(label, fontsize=7)
            for ax in list(axes.flat)[len(cells) :]:
                ax.axis("off")
            fig.tight_layout()
            path = out_dir / f"{name}_{opt}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths
