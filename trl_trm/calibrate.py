"""Calibration on a live trainer: run the recipe's own rollouts (vLLM colocate or server, a `rollout_func`, plain
transformers generation) and the training engine's forward on the same completions, without any optimiser step,
and set thresholds from the measured mismatch (the math: :mod:`trl_trm.calibration`).

Two users:

* :func:`calibrate_trainer`: `trl-trm calibrate` (:mod:`trl_trm.calibrate_cli`), or a script with its own
  `rollout_func`: N generation batches of the training data, a report (docs/calibrate.md).
* :class:`StartupCalibration`: `TRMConfig.trm_calibrate_accept`: before the first optimiser step the trainer samples the
  first generation batch's prompts `trm_calibrate_batches` times, sets its mode's thresholds so that they accept the
  target, and keeps them for the whole run (saved in every checkpoint, `trm_calibration.json`, so a resumed run
  continues with them; recorded in the model card).

Statistics are gathered over every process (O(B) per batch), so every process computes the same thresholds, and one
or several processes on the same global batch give the same result.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any

import torch

from .calibration import THRESHOLD_KEYS, batch_statistics, calibration_report
from .modes import DEFAULT_RATIO_MAX
from .topk import BATCH_KEYS, topk_kl_terms
from .window import pack_sequence_stats

STATE_FILE = "trm_calibration.json"
"""Written into every checkpoint (and read back on resume) when `trm_calibrate_accept` is set."""

PURPOSE = "calibration (`trl-trm calibrate` / `trm_calibrate_accept`)"


class CalibrationError(ValueError):
    """Calibration cannot give thresholds (no finite log-probs, no valid token, a target no threshold reaches)."""


def recipe_settings(args) -> dict[str, Any]:
    """The recipe's thresholds as :func:`~trl_trm.calibration.batch_statistics` reads them (`trm_ratio_max="auto"`,
    Seq-TIS's per-batch clip, is evaluated for `seq_mis` / `token_mis` at the default C = 2)."""
    settings = {key: getattr(args, f"trm_{key}") for key in THRESHOLD_KEYS}
    if settings["ratio_max"] == "auto":
        settings["ratio_max"] = DEFAULT_RATIO_MAX
    return settings


@contextlib.contextmanager
def calibrating(trainer, restore_logs: bool):
    """The trainer in calibration: training mode (the batch sizes and groups of training), rollout log-probs required
    whatever `trm_mode` is; with ``restore_logs`` TRL's metrics and the `trm/` window are put back afterwards, so the
    calibration batches do not enter the first logged step."""
    checks, model = trainer._trm_checks, trainer.model
    was_training, saved = model.training, None
    if restore_logs:
        saved = (
            copy.deepcopy(trainer._metrics),
            copy.deepcopy(trainer._trm_window),
            trainer.state.num_input_tokens_seen,
        )
    checks.purpose = PURPOSE
    model.train()
    try:
        yield
    finally:
        checks.purpose = None
        model.train(was_training)
        if saved is not None:
            trainer._metrics, trainer._trm_window, trainer.state.num_input_tokens_seen = saved


def observe(trainer, output: dict[str, Any]) -> tuple[dict[str, torch.Tensor], tuple]:
    """One generated batch: its gathered (N,) statistics (every process's rows) and this process's (B, T) tensors
    (log π_θ, log π_roll, mask, per-token KL or None), kept to evaluate the real mask at the chosen thresholds."""
    sampling = output.get("sampling_per_token_logps")  # (B, T)
    if sampling is None:
        raise CalibrationError(
            "calibration needs the rollout engine's per-token log-probs, and this batch has none: use a rollout path "
            "that reports them (plain transformers generation, vLLM, or a `rollout_func` returning `logprobs`)."
        )
    logps, theta_topk = trainer._trm_policy_logps(output)  # (B, T), (B, T, k + 1) or None
    mask = output["completion_mask"] * output["tool_mask"] if "tool_mask" in output else output["completion_mask"]
    kl_tok = topk_kl_terms(output, theta_topk, "none")[0] if BATCH_KEYS[1] in output else None  # (B, T) or None
    local = batch_statistics(logps, sampling, mask, recipe_settings(trainer.args), kl_tok)
    names, packed = pack_sequence_stats(local)  # (B, K)
    gathered = trainer.accelerator.gather(packed)  # (N, K)
    return {n: gathered[:, j].cpu() for j, n in enumerate(names)}, (logps, sampling, mask, kl_tok)


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    names = [n for n in parts[0] if all(n in p for p in parts)]
    return {n: torch.cat([p[n] for p in parts]) for n in names}


def mask_accept(trainer, kept: list[tuple], mode: str, thresholds: dict[str, Any]) -> float:
    """The accept rate of the real mask (`compute_trust_region_mask`) at ``thresholds`` over every process's
    calibration batches (the report's ``accept``)."""
    from .masks import compute_trust_region_mask

    settings = {**recipe_settings(trainer.args), **thresholds}
    counts = torch.zeros(2, dtype=torch.float64)  # kept, counted
    for logps, sampling, mask, kl_tok in kept:
        result = compute_trust_region_mask(logps, sampling, mask, mode=mode, kl_tok=kl_tok, **settings)
        counted = result.length > 0
        counts += torch.tensor([float(result.keep[counted].sum()), float(counted.sum())], dtype=torch.float64)
    total = trainer.accelerator.gather(counts.to(trainer.accelerator.device)).view(-1, 2).sum(dim=0).cpu()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _kl_exact(trainer) -> bool:
    vocab = trainer._trm_window.head_vocab
    return vocab is not None and trainer._trm_topk >= vocab


def run_batches(trainer, batches, progress: bool, restore_logs: bool, total: int | None = None):
    """Generate and score every batch of ``batches`` (an iterable of TRL generation batches) under :func:`calibrating`;
    returns the gathered statistics and the kept local tensors."""
    from tqdm.auto import tqdm

    parts, kept = [], []
    disable = not progress or not trainer.accelerator.is_main_process
    with calibrating(trainer, restore_logs), torch.no_grad():
        for batch in tqdm(batches, desc="calibrate", total=total, disable=disable):
            gathered, local = observe(trainer, trainer._generate_and_score_completions(batch))
            parts.append(gathered)
            kept.append(local)
    if not parts:
        raise CalibrationError("calibration ran no batch: the training data gave none (use more rows).")
    return _concat(parts), kept


def _cycle(dataloader, n: int):
    done = 0
    while done < n:
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
            done += 1
            if done == n:
                return
        if empty:
            return


def calibrate_trainer(trainer, batches: int = 4, targets=(0.9, 0.95, 0.99), progress: bool = True) -> dict[str, Any]:
    """The report of :func:`~trl_trm.calibration.calibration_report` over ``batches`` generation batches of the
    trainer's training data (every process), with each target's ``accept`` measured by the real mask. Nothing is
    trained. Works on every rollout path the trainer has (vLLM, `rollout_func`, transformers generation)."""
    if batches < 1:
        raise ValueError(f"`batches` must be >= 1, got {batches}.")
    stats, kept = run_batches(
        trainer, _cycle(trainer.get_train_dataloader(), batches), progress, restore_logs=False, total=batches
    )
    report = calibration_report(stats, recipe_settings(trainer.args), trainer.args.trm_mode, tuple(targets),
                                _kl_exact(trainer))  # fmt: skip
    for row in report["targets"].values():
        for mode, entry in row.items():
            if "thresholds" in entry:
                entry["accept"] = mask_accept(trainer, kept, mode, entry["thresholds"])
    settings = {f"trm_{key}": value for key, value in recipe_settings(trainer.args).items()}
    report["settings"] = {"trm_mode": trainer.args.trm_mode, **settings}
    report["batches"] = batches
    return report


class StartupCalibration:
    """`trm_calibrate_accept`: the thresholds of the trainer's mode, calibrated once before the first optimiser step."""

    def __init__(self, target: float, batches: int, mode: str):
        self.target, self.batches, self.mode = target, batches, mode
        self.thresholds: dict[str, Any] | None = None
        self.accept: float | None = None  # the real mask's accept rate on the calibration batches
        self.summary: dict[str, Any] | None = None
        self._running = False

    @property
    def pending(self) -> bool:
        return self.thresholds is None and not self._running

    def run(self, trainer, inputs) -> dict[str, Any]:
        """Sample the generation batch ``inputs`` `batches` times and set the thresholds (gathered over every process);
        :class:`CalibrationError` with one line when no threshold reaches the target."""
        self._running = True
        try:
            stats, kept = run_batches(trainer, [inputs] * self.batches, progress=False, restore_logs=True)
        finally:
            self._running = False
        report = calibration_report(
            stats, recipe_settings(trainer.args), self.mode, (self.target,), _kl_exact(trainer)
        )
        entry = report["targets"][f"{self.target:g}"][self.mode]
        if "thresholds" not in entry:
            raise CalibrationError(f"`trm_calibrate_accept={self.target:g}` cannot be reached: {entry['reason']}.")
        self.thresholds, self.summary = entry["thresholds"], report["mismatch"]
        self.accept = mask_accept(trainer, kept, self.mode, self.thresholds)
        return self.thresholds

    def apply(self, trainer, inputs) -> None:
        """:meth:`run`, then seed the adaptive controller (`trm_target_accept_rate`) with the thresholds and put them in
        the first step's logs (`trm/calibrated/<threshold>`, `trm/calibrated/accept_rate`)."""
        thresholds = self.run(trainer, inputs)
        self.seed(trainer._trm_adaptive)
        metrics = trainer._metrics["train"]
        for key, value in thresholds.items():
            metrics[f"trm/calibrated/{key}"] = [float("nan") if value is None else value]
        metrics["trm/calibrated/accept_rate"] = [self.accept]

    def seed(self, adaptive) -> None:
        """Start the adaptive controller (`trm_target_accept_rate`, `trm` only; None: no controller) from the calibrated
        thresholds, here and on resume alike."""
        if adaptive is not None:
            adaptive.initial_delta_max = self.thresholds["delta_max"]
            adaptive.initial_delta_avg = self.thresholds["delta_avg"]

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target, "batches": self.batches, "mode": self.mode, "thresholds": self.thresholds,
                "accept": self.accept}  # fmt: skip

    def save(self, directory: str) -> None:
        if self.thresholds is not None:
            with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(self.state_dict(), f, indent=2)

    def load(self, directory: str) -> bool:
        """Resume: the thresholds a checkpoint was calibrated to (True), or False when it holds none (then the
        calibration runs again). A checkpoint calibrated for another mode or target is refused by name."""
        path = os.path.join(directory, STATE_FILE)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if (state.get("mode"), state.get("target")) != (self.mode, self.target):
            raise ValueError(
                f"{path} was calibrated for trm_mode={state.get('mode')!r}, trm_calibrate_accept={state.get('target')}"
                f"; this run has {self.mode!r}, {self.target}: resume with the checkpoint's settings."
            )
        self.thresholds, self.accept = state["thresholds"], state.get("accept")
        return True
