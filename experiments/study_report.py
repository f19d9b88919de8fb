"""The mismatch study's outputs (`experiments/mismatch_study.py`): per-run summaries, the paired aggregate, the markdown
tables, the plots and the files under experiments/results/. See docs/mismatch-study.md."""

from __future__ import annotations

import csv
import json
import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experiments.mismatch_study import StudyConfig


# ------------------------------------------------------------------------------------------------ aggregation
def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0 if xs else math.nan


def summarize_run(run: dict[str, Any], spike_threshold: float, last: int = 5) -> dict[str, Any]:
    c = run["curves"]
    grad = [g for g in c.get("grad_norm", []) if not math.isnan(g)]
    reward = [x for x in c["reward"] if not math.isnan(x)]  # the generating steps only
    tail = reward[-last:]
    return {
        "kind": run["kind"],
        "method": run["method"],
        "seed": run["seed"],
        "eval_reward_init": run["eval_reward_init"],
        "eval_reward_final": run["eval_reward_final"],
        "train_reward_first": _mean(reward[:last]),
        "train_reward_last": _mean(tail),
        "accept_rate": _mean(c.get("trm/accept_rate", [])),
        "token_weight": _mean(c.get("trm/token_weight/mean", [])),
        "kl_k3": _mean(c.get("trm/kl_k3", [])),
        "log_ratio_abs_max": _mean(c.get("trm/log_ratio_abs_max/mean", [])),
        **{f"accept_q{q}": _mean(c.get(f"trm/accept_rate/length_q{q}", [])) for q in range(1, 5)},
        "grad_norm_median": statistics.median(grad) if grad else math.nan,
        "grad_norm_max": max(grad) if grad else math.nan,
        "grad_spikes": sum(g > spike_threshold for g in grad),
        "mean_length": _mean(c.get("completions/mean_length", [])),
        "flip_rate": run.get("flip_rate", 0.0),
        "batch": run.get("batch", math.nan),
        "fragile_visits_per_sequence": run.get("fragile_visits_per_sequence", math.nan),
        "collapse_p_token_median": run.get("collapse_p_token_median", math.nan),
        "steps_no_accept": sum(a == 0 for a in c.get("trm/accept_rate", [])),
        "wall_s": run["wall_s"],
    }


SUMMARY_FIELDS = (
    "eval_reward_final",
    "train_reward_last",
    "accept_rate",
    "accept_q1",
    "accept_q4",
    "grad_norm_max",
    "grad_spikes",
    "kl_k3",
)


def aggregate(rows: list[dict[str, Any]], baseline: str = "none") -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["method"]), []).append(r)
    out = []
    for (kind, method), rs in groups.items():
        agg: dict[str, Any] = {"kind": kind, "method": method, "seeds": len(rs)}
        for f in SUMMARY_FIELDS + ("eval_reward_init", "token_weight", "accept_q2", "accept_q3", "mean_length"):
            vals = [float(r[f]) for r in rs]
            agg[f"{f}_mean"], agg[f"{f}_std"] = _mean(vals), _std(vals)
        # Paired by seed against the baseline (same warm start, same held-out prompts and sampling seed): the
        # difference of final eval rewards, mean and standard error over seeds.
        base = {r["seed"]: r["eval_reward_final"] for r in groups.get((kind, baseline), [])}
        deltas = [r["eval_reward_final"] - base[r["seed"]] for r in rs if r["seed"] in base]
        agg["delta_eval_mean"] = _mean(deltas) if deltas else math.nan
        agg["delta_eval_se"] = _std(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else math.nan
        out.append(agg)
    return out


def markdown_table(agg: list[dict[str, Any]], kinds: tuple[str, ...], methods: tuple[str, ...]) -> str:
    head = (
        "| kind | method | eval reward (final) | Δ vs none (paired) | train reward (last 5) | accept rate | "
        "accept q1 (short) | accept q4 (long) | max grad-norm | grad spikes | k3 KL | mean length |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    index = {(a["kind"], a["method"]): a for a in agg}
    lines = []
    for kind in kinds:
        for method in methods:
            a = index.get((kind, method))
            if a is None:
                continue

            def pm(f: str, fmt: str = ".3f", a: dict[str, Any] = a) -> str:
                m, s = a[f"{f}_mean"], a[f"{f}_std"]
                return "n/a" if math.isnan(m) else f"{m:{fmt}} ± {s:{fmt}}"

            d, se = a.get("delta_eval_mean", math.nan), a.get("delta_eval_se", math.nan)
            delta = "—" if method == "none" or math.isnan(d) else f"{d:+.3f} ± {se:.3f}"
            lines.append(
                f"| {kind} | {method} | {pm('eval_reward_final')} | {delta} | {pm('train_reward_last')} "
                f"| {pm('accept_rate')} | {pm('accept_q1')} | {pm('accept_q4')} | {pm('grad_norm_max', '.2f')} | "
                f"{pm('grad_spikes', '.1f')} | {pm('kl_k3', '.2e')} | {pm('mean_length', '.1f')} |"
            )
    return head + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def plot(runs: list[dict[str, Any]], agg: list[dict[str, Any]], cfg: StudyConfig, spike: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg.plots_dir.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in cfg.kinds if any(r["kind"] == k for r in runs)]
    methods = [m for m in cfg.methods if any(r["method"] == m for r in runs)]
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    files = []

    def curve_mean(kind: str, method: str, key: str) -> list[float]:
        cs = [r["curves"].get(key, []) for r in runs if r["kind"] == kind and r["method"] == method]
        n = min((len(c) for c in cs), default=0)
        return [_mean([c[i] for c in cs]) for i in range(n)]

    for key, name, ylabel in (
        ("reward", "reward_curves.png", "training reward (rollouts, mean over seeds)"),
        ("grad_norm", "grad_norm_curves.png", "grad norm before clipping (mean over seeds)"),
        ("trm/accept_rate", "accept_rate_curves.png", "accept rate (mean over seeds)"),
    ):
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            for method in methods:
                ys = curve_mean(kind, method, key)
                ax.plot(range(1, len(ys) + 1), ys, label=method, color=colors[method], lw=1.3)
            if key == "grad_norm":
                ax.axhline(spike, color="grey", ls=":", lw=1)
                ax.set_yscale("log")
            ax.set_title(kind)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel, fontsize=8)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = cfg.plots_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    index = {(a["kind"], a["method"]): a for a in agg}
    for field, name, ylabel in (
        ("eval_reward_final", "final_eval_reward.png", "held-out reward after training (clean sampling)"),
        ("accept_rate", "accept_rate.png", "mean accept rate"),
    ):
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds) * len(methods) / 3, 3.6))
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            xs = [i + j * width for i in range(len(kinds))]
            ys = [index[(k, method)][f"{field}_mean"] if (k, method) in index else math.nan for k in kinds]
            es = [index[(k, method)][f"{field}_std"] if (k, method) in index else 0.0 for k in kinds]
            ax.bar(xs, ys, width, yerr=es, label=method, color=colors[method], capsize=2)
        if field == "eval_reward_final":
            init = _mean([a["eval_reward_init_mean"] for a in agg])
            ax.axhline(init, color="grey", ls=":", lw=1, label="before training")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = cfg.plots_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    files.append(_plot_accept_by_length(plt, index, kinds, methods, colors, cfg.plots_dir))
    return files


def _plot_accept_by_length(plt, index, kinds, methods, colors, plots_dir) -> str:
    """accept_rate_by_length.png: each method's accept rate by completion-length quartile, one panel per kind."""
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for method in methods:
            a = index.get((kind, method))
            if a is None:
                continue
            ys = [a[f"accept_q{q}_mean"] for q in range(1, 5)]
            ax.plot([1, 2, 3, 4], ys, marker="o", label=method, color=colors[method])
        ax.set_xticks([1, 2, 3, 4], ["q1\nshortest", "q2", "q3", "q4\nlongest"])
        ax.set_title(kind)
        ax.set_ylabel("accept rate by completion-length quartile", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = plots_dir / "accept_rate_by_length.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_report(runs: list[dict[str, Any]], cfg: StudyConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Summaries, aggregate, JSON/CSV/markdown and plots from the runs' curves (also used by ``--reaggregate``)."""
    # Gradient-norm spike threshold: 3x the median per-step grad norm of the uncorrected runs of the mildest kind
    # present (precision if run), i.e. of near on-policy training.
    ref_kind = "precision" if "precision" in cfg.kinds else cfg.kinds[0]
    ref = [
        g for r in runs if r["kind"] == ref_kind and r["method"] == cfg.methods[0] for g in r["curves"]["grad_norm"]
    ]
    ref = [g for g in ref if not math.isnan(g)]
    spike = 3.0 * statistics.median(ref) if ref else math.inf
    rows = [summarize_run(r, spike) for r in runs]
    agg = aggregate(rows)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        **meta,
        "grad_spike_threshold": spike,
        "grad_spike_reference": f"3 x median grad_norm of ({ref_kind}, {cfg.methods[0]}) runs",
    }
    report = {"meta": meta, "summary": agg, "runs": rows, "curves": runs}
    json_path = cfg.out_dir / f"{cfg.tag}.json"
    json_path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    with open(cfg.out_dir / f"{cfg.tag}_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(cfg.out_dir / f"{cfg.tag}_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(agg[0]))
        writer.writeheader()
        writer.writerows(agg)
    table = markdown_table(agg, cfg.kinds, cfg.methods)
    if cfg.reference_kind is not None and cfg.reference_kind in cfg.kinds:  # the harmful preset: the rule's verdicts
        families = [k for k in cfg.kinds if k != cfg.reference_kind]
        table += "\n" + rule_report(rows, cfg.reference_kind, families, cfg.methods)
    (cfg.out_dir / f"{cfg.tag}_table.md").write_text(table)
    plots = plot(runs, agg, cfg, spike) if cfg.plots_dir is not None else []
    print(table)
    print(f"{len(runs)} runs in {meta['wall_s']:.0f} s; results in {cfg.out_dir}; plots: {', '.join(plots) or 'none'}")
    return report


# ------------------------------------------------------------------------------------------------ the rule
TRM_ARMS = ("trm", "trm_cal", "trm_equal")
COMPARATORS = ("token_tis", "token_mis", "bypass")  # the rule's (b): token-level arms and PPO-clip against pi_roll


def paired(rows: list[dict[str, Any]], a: tuple[str, str], b: tuple[str, str]) -> dict[str, float]:
    """Δ = final reward of arm ``a`` − arm ``b`` ((kind, method) each), paired by seed: mean, paired standard error,
    number of seeds and the power (2 × SE, the smallest difference the rule calls)."""
    ra = {r["seed"]: r["eval_reward_final"] for r in rows if (r["kind"], r["method"]) == a}
    rb = {r["seed"]: r["eval_reward_final"] for r in rows if (r["kind"], r["method"]) == b}
    d = [ra[s] - rb[s] for s in sorted(ra) if s in rb]
    se = _std(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"mean": _mean(d), "se": se, "n": len(d), "power": 2 * se, "wins": sum(x > 0 for x in d)}


def _fmt(p: dict[str, float]) -> str:
    return "n/a" if not p["n"] else f"{p['mean']:+.3f} ± {p['se']:.3f}"


def _above(p: dict[str, float], k: float) -> bool:
    return p["n"] > 1 and p["mean"] > k * p["se"]


def positive_controls(rows: list[dict[str, Any]], reference: str, families: list[str]) -> dict[str, dict]:
    """Per family: Δ(none@reference − none@family), and whether it exceeds 3 paired SE (the rule's step 1)."""
    out = {}
    for fam in families:
        p = paired(rows, (reference, "none"), (fam, "none"))
        out[fam] = {**p, "passed": _above(p, 3.0)}
    return out


def trm_verdict(rows: list[dict[str, Any]], fam: str, arm: str, best: str | None) -> str:
    """The rule's steps 2-4 for one TRM arm of a family whose positive control passed."""
    vs_none = paired(rows, (fam, arm), (fam, "none"))
    vs_best = paired(rows, (fam, arm), (fam, best)) if best else {"n": 0, "mean": math.nan, "se": math.nan}
    vs_rand = paired(rows, (fam, arm), (fam, "trm_random"))
    if all(p["n"] and _above(p, 2.0) for p in (vs_none, vs_best, vs_rand)):
        return "helps"
    below = [p for p in (vs_none, vs_best) if p["n"] > 1 and -p["mean"] > 2 * p["se"]]
    if below:
        if arm == "trm" and vs_best["n"] and -vs_best["mean"] > 2 * vs_best["se"]:
            eq = paired(rows, (fam, "trm_equal"), (fam, best))
            if eq["n"] > 1 and -eq["mean"] <= 2 * eq["se"]:
                return "hurts (sample-count effect: trm_equal is not below)"
        return "hurts"
    return f"no difference at power {max(vs_none['power'], vs_best.get('power', 0.0)):.3f}"


def rule_report(rows: list[dict[str, Any]], reference: str, families: list[str], methods: tuple[str, ...]) -> str:
    """Markdown: the positive controls, then per family every arm's paired differences and the rule's verdict."""
    pcs = positive_controls(rows, reference, families)
    lines = [
        "| family | `none` without mismatch | `none` in the family | Δ (clean − family) | power (2 SE) | seeds | "
        "positive control |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for fam, p in pcs.items():
        ref = _mean([r["eval_reward_final"] for r in rows if (r["kind"], r["method"]) == (reference, "none")])
        got = _mean([r["eval_reward_final"] for r in rows if (r["kind"], r["method"]) == (fam, "none")])
        verdict = "passed" if p["passed"] else "failed"
        lines.append(f"| {fam} | {ref:.3f} | {got:.3f} | {_fmt(p)} | {p['power']:.3f} | {p['n']} | {verdict} |")
    for fam in families:
        have = [m for m in methods if any((r["kind"], r["method"]) == (fam, m) for r in rows)]
        means = {
            m: _mean([r["eval_reward_final"] for r in rows if (r["kind"], r["method"]) == (fam, m)]) for m in have
        }
        comps = [m for m in COMPARATORS if m in means]
        best = max(comps, key=lambda m: means[m]) if comps else None
        lines += [
            "",
            f"**{fam}** (positive control {'passed' if pcs[fam]['passed'] else 'failed'}; best of (b): `{best}`)",
            "",
            "| arm | final reward | Δ vs none | power | Δ vs best of (b) | Δ vs trm_random | accept | verdict |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for m in have:
            vs_none, vs_best = paired(rows, (fam, m), (fam, "none")), paired(rows, (fam, m), (fam, best or m))
            vs_rand = paired(rows, (fam, m), (fam, "trm_random"))
            acc = _mean([r["accept_rate"] for r in rows if (r["kind"], r["method"]) == (fam, m)])
            if m in TRM_ARMS:
                verdict = trm_verdict(rows, fam, m, best) if pcs[fam]["passed"] else "not ranked (control failed)"
            else:
                verdict = "—"
            lines.append(
                f"| {m} | {means[m]:.3f} | {'—' if m == 'none' else _fmt(vs_none)} | {vs_none['power']:.3f} | "
                f"{'—' if m == best else _fmt(vs_best)} | {'—' if m == 'trm_random' else _fmt(vs_rand)} | "
                f"{acc:.3f} | {verdict} |"
            )
    return "\n".join(lines) + "\n"
