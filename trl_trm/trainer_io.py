"""The trainer's seams at the I/O edge: checkpoints (written whole, with the adaptive and calibrated thresholds), the model card and
the Hub, and the end of a run. A mixin of :class:`~trl_trm.trainer.TRMTrainer` (whose class docstring lists these
overrides with the others), kept apart so that `trainer.py` holds the RL seams only. It expects the trainer's
`_trm_adaptive`, `_trm_calibration` and `_trm_staging` attributes (set in `TRMTrainer._trm_setup`).
"""

from __future__ import annotations

import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import atomic_checkpoint
from .distributed import shutdown_distributed
from .hub import append_trm_section, hub_errors


class TrainerIOSeams:
    """`Trainer` overrides for checkpoints, the model card, the Hub and the end of a run (each calls `super()`)."""

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint (plus the adaptive thresholds), staged and renamed into place whole
        (`trl_trm.atomic_checkpoint`); a failed write is one line naming the checkpoint that is still complete."""
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.push_to_hub:  # TRL uploads the folder in the background: it stays where it is written
            self._trm_save_checkpoint(model, trial, folder)
            return
        atomic_checkpoint.save_staged(self, self._get_output_dir(trial=trial), folder, model, trial)

    def _trm_save_checkpoint(self, model, trial, folder: str) -> None:
        super()._save_checkpoint(model, trial)
        directory = os.path.join(self._get_output_dir(trial=trial), folder)
        if self._trm_adaptive is not None and self.args.should_save:
            self._trm_adaptive.save(directory)
        if self._trm_calibration is not None and self.args.should_save:
            self._trm_calibration.save(directory)

    def _get_output_dir(self, trial):
        staging = getattr(self, "_trm_staging", None)
        if staging is not None:  # inside `_save_checkpoint`: the checkpoint is staged
            return staging
        return super()._get_output_dir(trial=trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        calibration = self._trm_calibration
        if calibration is not None and checkpoint is not None and calibration.load(checkpoint):
            calibration.seed(self._trm_adaptive)  # as when the thresholds were set, before the controller's state
        if self._trm_adaptive is not None and checkpoint is not None:
            self._trm_adaptive.load(checkpoint)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card plus a TRM section: settings, final accept-rate figures, citation (`trl_trm.hub`)."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            calibration = None if self._trm_calibration is None else self._trm_calibration.state_dict()
            readme = os.path.join(self.args.output_dir, "README.md")
            append_trm_section(readme, self.args, self.state.log_history, calibration)

    def init_hf_repo(self, token=None, private=None):
        # Called from `Trainer.__init__` when push_to_hub=True: an unreachable Hub gets a clear error here.
        with hub_errors("create the repository", self.args.hub_model_id):
            return super().init_hf_repo(token=token, private=private)

    def push_to_hub(self, *args, **kwargs):
        with hub_errors("push to", self.hub_model_id or self.args.hub_model_id):
            return super().push_to_hub(*args, **kwargs)

    def end(self):
        """`Trainer.end` (finish trackers, destroy the process group), after flushing pending collectives: tearing
        down gloo while its worker thread still frees a gathered tensor deadlocks (see `trl_trm.distributed`)."""
        shutdown_distributed()
        super().end()
