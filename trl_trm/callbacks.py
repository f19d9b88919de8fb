"""`TRMStatsCallback`: writes the `trm/` metrics of every log to `OUTPUT_DIR/trm_stats.jsonl`, warns once when the
accept rate stays low, and saves `OUTPUT_DIR/trm_stats.png` when training ends.

`TRMTrainer` registers it by default (settings from `TRMConfig.trm_accept_rate_floor`, `trm_accept_rate_patience`,
`trm_plot`); remove it with `trainer.remove_callback(TRMStatsCallback)`. Only the main process writes.

No write leaves a half line: each record is appended with one `write` of the whole line and flushed, and a write that
fails (full disk) is cut back to the last whole line with one warning (training goes on; the record stays in memory for
the plot). A resumed run drops a trailing partial line (left by a kill) with a warning and rewrites the kept records
into a temporary file that replaces the old one whole.
"""

from __future__ import annotations

import errno
import json
import math
import os
import warnings
from typing import Any

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
        self.write_warned = False
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
        kept, partial = [], 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    partial += 1
                    continue
                if record.get("step", 0) <= state.global_step:
                    kept.append(record)
        if partial:
            warnings.warn(
                f"{path}: dropped {partial} partial line(s), cut short by an interrupted write; the {len(kept)} whole "
                f"records up to step {state.global_step} are kept.",
                RuntimeWarning,
                stacklevel=2,
            )
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)  # the old file or the new one, never half of it
        self.records = kept

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        trm = {k: v for k, v in logs.items() if k.startswith(("trm/", "eval_trm/"))}
        if not trm:
            return
        record = {"step": state.global_step, **{k: logs[k] for k in CONTEXT_KEYS if k in logs}, **trm}
        os.makedirs(args.output_dir, exist_ok=True)
        self._append(self.stats_path(args.output_dir), json.dumps(record) + "\n", state.global_step)
        self.records.append(record)
        self._check_accept_rate(logs.get("trm/accept_rate"))

    def _append(self, path: str, line: str, step: int) -> None:
        """Append ``line`` whole or not at all: one unbuffered write; on failure (or a short write) the file is cut
        back to its old size, with one warning per run."""
        data = line.encode("utf-8")
        with open(path, "ab", buffering=0) as f:
            size = f.seek(0, os.SEEK_END)
            try:
                if f.write(data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as err:
                f.truncate(size)
                if not self.write_warned:
                    self.write_warned = True
                    warnings.warn(
                        f"could not append the step-{step} record to {path} ({err.strerror or err}): it is left out "
                        "and the file keeps whole lines only (warned once per run).",
                        RuntimeWarning,
                        stacklevel=3,
                    )

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


class RouteDisarmCallback(TrainerCallback):
    """Disarms MoE routing replay's forcer (`trl_trm.routing.RouteForcer`) at the end of every optimiser step, of an
    evaluation and of training. The forcer stays armed after a loss forward on purpose (the backward's recomputation
    under gradient checkpointing must see the same routes); without this, a later forward of the model outside the
    trainer (``model.generate``, an evaluation harness) would be forced onto the last training batch's experts."""

    def __init__(self, forcer: Any):
        self.forcer = forcer

    def _disarm(self, args, state, control, **kwargs):
        self.forcer.disarm()

    on_step_end = on_evaluate = on_train_end = _disarm
