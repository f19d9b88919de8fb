"""Offline demo: `trl-trm demo` = `trl-trm train` with the packaged recipe `trl_trm/recipes/demo.yaml`
(identical to `recipes/demo.yaml`), plus a compact progress line per log and a closing summary.

The task is string reversal ("reverse: abc" -> "cba") with an exact, graded reward in [0, 1], on a tiny model and
tokenizer built locally (`builtin:tiny`, `builtin:reversal`): no download, CPU only. Training runs under bf16
autocast while the sampling log-probs are captured in fp32 at generation time: a real rollout/training mismatch
(|log rho| ~ 1e-3 per token), so the trust-region mask has something to reject at the demo's tight threshold.
"""

from __future__ import annotations

import os
import time
from importlib import resources
from typing import Any

# The demo task (dataset and reward) lives in `trl_trm.tasks`; re-exported here for existing imports.
from .tasks import reversal as reversal_reward  # noqa: F401
from .tasks import reversal_dataset  # noqa: F401

DEMO_RECIPE = "demo.yaml"


def demo_recipe_path() -> str:
    return str(resources.files("trl_trm").joinpath("recipes", DEMO_RECIPE))


def _progress_callback(max_steps: int):
    from transformers import TrainerCallback

    class DemoProgress(TrainerCallback):
        """One short line per log instead of the full metrics dict."""

        def __init__(self):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs or not state.is_world_process_zero:
                return
            accept = logs.get("trm/accept_rate")
            ratio = logs.get("trm/log_ratio_abs_max/mean")
            parts = [f"step {state.global_step:>3}/{max_steps}", f"reward {logs['reward']:.3f}"]
            if accept is not None:
                parts.append(f"accept {accept:.2f}")
            if ratio is not None:
                parts.append(f"max|log rho| {ratio:.1e}")
            parts.append(f"{time.perf_counter() - self.start:5.1f} s")
            print("  ".join(parts), flush=True)

    return DemoProgress()


def summarize(log_history: list[dict[str, Any]], window: int = 3) -> dict[str, Any]:
    """Reward at the start and end of training (mean of the first / last `window` logs), mean accept rate, and
    the criterion with the highest mean rejection rate."""
    logs = [h for h in log_history if "reward" in h]
    accept = [h["trm/accept_rate"] for h in logs if h.get("trm/accept_rate") is not None]
    rejects: dict[str, list[float]] = {}
    for h in logs:
        for k, v in h.items():
            if k.startswith("trm/reject_rate/") and v is not None:
                rejects.setdefault(k.rsplit("/", 1)[-1], []).append(v)
    mean_rejects = {k: sum(v) / len(v) for k, v in rejects.items()}
    n = min(window, max(1, len(logs) // 2))
    return {
        "reward_start": sum(h["reward"] for h in logs[:n]) / n if logs else float("nan"),
        "reward_end": sum(h["reward"] for h in logs[-n:]) / n if logs else float("nan"),
        "accept_rate_mean": sum(accept) / len(accept) if accept else float("nan"),
        "reject_rate_mean": mean_rejects,
        "top_rejecting_criterion": max(mean_rejects, key=mean_rejects.get) if mean_rejects else None,
        "logs": len(logs),
    }


def run_demo(script_args, config, model_args) -> dict[str, Any]:
    """Train on the demo recipe, save, print the summary; returns it (with `train_seconds`, `plot`)."""
    from transformers import PrinterCallback, ProgressCallback

    from .plotting import PLOT_FILE
    from .train import build_trainer, check_trained

    print(f"trl-trm demo: tiny model, string reversal, {config.max_steps} steps on CPU -> {config.output_dir}")
    trainer = build_trainer(script_args, config, model_args)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(config.max_steps))
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    check_trained(trainer)
    trainer.save_model(config.output_dir)
    trainer.create_model_card(model_name="trl-trm-demo")
    summary = summarize(trainer.state.log_history)
    summary["train_seconds"] = elapsed
    plot = os.path.join(config.output_dir, PLOT_FILE)
    summary["plot"] = plot if os.path.exists(plot) else None
    print("\n=== trl-trm demo summary ===")
    print(f"trained {config.max_steps} steps in {elapsed:.1f} s (output: {config.output_dir})")
    print(f"reward: start {summary['reward_start']:.3f} -> end {summary['reward_end']:.3f} (mean of first/last logs)")
    print(f"trm/accept_rate (mean over logs): {summary['accept_rate_mean']:.3f}")
    top = summary["top_rejecting_criterion"]
    if top is not None:
        print(f"criterion rejecting most: {top} (mean reject rate {summary['reject_rate_mean'][top]:.3f})")
    print(f"plot: {summary['plot'] or 'not written (trm_plot=False or matplotlib missing)'}")
    return summary
