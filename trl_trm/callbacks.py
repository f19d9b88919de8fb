"""`TRMStatsCallback`: writes the `trm/` metrics of every log to `OUTPUT_DIR/trm_stats.jsonl`, warns once when the
accept rate stays low, and saves `OUTPUT_DIR/trm_stats.png` when training ends.

`TRMTrainer` registers it by default (settings from `TRMConfig.trm_accept_rate_floor`, `trm_accept_rate_patience`,
`trm_plot`); remove it with `trainer.remove_callback(TRMStatsCallback)`. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import warnings

from transformers import TrainerCallback
from transformers.utils import logging

from .plotting import PLOT_FILE, STATS_FILE, plot_history

logger = logging.get_logger(__name__)

# Non-trm keys copied into each JSONL record beside the trm/ metrics.
CONTEXT_KEYS = ("reward", "reward_std", "loss", "grad_norm", "learning_rate", "epoch")


def _free_name(path: str) -> str:
    """`trm_stats.jsonl` -> the first free `trm_stats.N.jsonl` beside it."""
    stem, ext = os.path.splitext(path)
    number = 1
    while os.path.exists(f"{stem}.{number}{ext}"):
        number += 1
    return f"{stem}.{number}{ext}"


class TRMStatsCallback(TrainerCallback):
    """Records, checks and plots the masking statistics of a run.

    Args:
        accept_rate_floor: warn once when `trm/accept_rate` is below this for `patience` consecutive logs
            (`None`: never warn). A persistently low accept rate means thresholds too tight for the rollout
            engine, or engines that have drifted apart (dtype, weight sync, staleness).
        patience: number of consecutive low logs before the warning.
        plot: save `trm_stats.png` at the end of training (needs matplotlib; skipped with a warning if missing).
    """

    def __init__(self, accept_rate_floor: float | None = 0.5, patience: int = 3, plot: bool = True):
        self.accept_rate_floor = accept_rate_floor
        self.patience = patience
        self.plot = plot
        self.low_streak = 0
        self.warned = False
        self.records: list[dict] = []

    @staticmethod
    def stats_path(output_dir: str) -> str:
        return os.path.join(output_dir, STATS_FILE)

    def on_train_begin(self, args, state, control, **kwargs):
        self.low_streak, self.warned = 0, False
        self.records = []
        path = self.stats_path(args.output_dir)
        if not state.is_world_process_zero or not os.path.exists(path):
            return
        if not state.global_step:
            # A fresh run starts a fresh file; an earlier run's records are moved aside, never truncated.
            if os.path.getsize(path) > 0:
                kept_as = _free_name(path)
                os.replace(path, kept_as)
                checkpoints = sorted(n for n in os.listdir(args.output_dir) if n.startswith("checkpoint-"))
                old = (
                    f"; it also holds the checkpoints {checkpoints} of that run, which a later "
                    "`resume_from_checkpoint=True` would pick up"
                    if checkpoints
                    else ""
                )
                warnings.warn(
                    f"output_dir {args.output_dir!r} holds an earlier run: its {STATS_FILE} was moved to "
                    f"{os.path.basename(kept_as)}{old}. Use a new output_dir per run.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        # A resumed run keeps the records up to its checkpoint and drops the ones logged after it (logged again).
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if record.get("step", 0) <= state.global_step:
                    kept.append(record)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.records = kept

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        trm = {k: v for k, v in logs.items() if k.startswith(("trm/", "eval_trm/"))}
        if not trm:
            return
        record = {"step": state.global_step, **{k: logs[k] for k in CONTEXT_KEYS if k in logs}, **trm}
        os.makedirs(args.output_dir, exist_ok=True)
        with open(self.stats_path(args.output_dir), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.records.append(record)
        self._check_accept_rate(logs.get("trm/accept_rate"))

    def _check_accept_rate(self, accept) -> None:
        if self.accept_rate_floor is None or accept is None or math.isnan(accept):
            return
        self.low_streak = self.low_streak + 1 if accept < self.accept_rate_floor else 0
        if self.low_streak >= self.patience and not self.warned:
            self.warned = True
            message = (
                f"trm/accept_rate has stayed below {self.accept_rate_floor} for {self.low_streak} logs (last: "
                f"{accept:.3f}): most sequences are rejected and contribute no gradient. Either the thresholds are "
                "too tight for this rollout engine (raise trm_delta_max / trm_delta_avg, or set "
                "trm_target_accept_rate), or the engines have drifted apart (vLLM dtype, weight sync, staleness). "
                "trm/reject_rate/* says which criterion rejects. Set trm_accept_rate_floor=None to silence this."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)  # shown once per run (`self.warned`)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.plot or not state.is_world_process_zero or not self.records:
            return
        try:
            path = plot_history(self.records, os.path.join(args.output_dir, PLOT_FILE), title=args.run_name or "")
        except ImportError as err:
            logger.warning(f"trm_stats.png not saved: {err}")
            return
        logger.info(f"TRM statistics plot saved to {path}")
