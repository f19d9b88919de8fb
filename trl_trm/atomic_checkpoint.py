"""Checkpoints that are never half-written: each is staged in a hidden sibling folder and renamed into place whole.

`Trainer._save_checkpoint` writes `OUTPUT_DIR/checkpoint-N` file by file (model, optimizer, scheduler, RNG states,
trainer state). A full disk or a kill in the middle left a `checkpoint-N` that `resume_from_checkpoint=True` then
picked as the latest, and failed on. `TRMTrainer._save_checkpoint` has every process write into
`OUTPUT_DIR/.trm-staging/checkpoint-N` instead (through `_get_output_dir`), waits for all of them, and the saving
process renames the folder to `OUTPUT_DIR/checkpoint-N` (one rename on the same file system: either the old set of
checkpoints or the new one is on disk, never a half one). Only then are old checkpoints rotated (`save_total_limit`).
A failed write removes the staged folder and raises :class:`CheckpointWriteError`, one line naming the checkpoint
that is still complete. `transformers.trainer_utils.get_last_checkpoint` matches `checkpoint-N` only, so a staged
folder left by a kill is never resumed from; the next save replaces it.

With `push_to_hub=True` the checkpoint is written in place as before: TRL uploads the folder in the background, so it
must stay where it was written.
"""

from __future__ import annotations

import os
import shutil

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from .run_health import TrainingError

STAGING_DIR = ".trm-staging"


class CheckpointWriteError(TrainingError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the earlier checkpoints are intact."""


def staging_root(run_dir: str) -> str:
    """The hidden folder beside the checkpoints where one is staged."""
    return os.path.join(run_dir, STAGING_DIR)


def clear_staged(run_dir: str, folder: str) -> None:
    """Remove a staged `folder` (left by a kill, or by a failed write)."""
    shutil.rmtree(os.path.join(staging_root(run_dir), folder), ignore_errors=True)


def publish(run_dir: str, folder: str) -> str:
    """Rename the staged `folder` to `run_dir/folder` and return that path. An existing `run_dir/folder` (the same
    step saved again) is moved aside first and deleted once the new one is in place."""
    staged, final = os.path.join(staging_root(run_dir), folder), os.path.join(run_dir, folder)
    old = None
    if os.path.exists(final):
        old = os.path.join(staging_root(run_dir), f"{folder}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rmdir(staging_root(run_dir))  # only when empty
    except OSError:
        pass
    return final


def write_error(run_dir: str, folder: str, err: OSError) -> CheckpointWriteError:
    """The one-line error of a failed checkpoint write, naming the last complete checkpoint in `run_dir`."""
    reason = err.strerror or str(err) or type(err).__name__
    last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    still = (
        f"the last complete checkpoint is {last}; free space and resume from it (resume_from_checkpoint=True)"
        if last
        else "no earlier checkpoint exists"
    )
    return CheckpointWriteError(
        f"could not write {os.path.join(run_dir, folder)} ({reason}): nothing of it was kept and {still}."
    )


def save_staged(trainer, run_dir: str, folder: str, model, trial) -> None:
    """`TRMTrainer._save_checkpoint` without `push_to_hub`: every process writes `folder` into the staging folder
    (`trainer._trm_staging`, which `_get_output_dir` returns meanwhile), then the saving process publishes it whole
    and rotates the real checkpoints. A failed write removes the staged folder and raises :func:`write_error`'s line."""
    args, wait = trainer.args, trainer.accelerator.wait_for_everyone
    if args.should_save:
        clear_staged(run_dir, folder)  # left by a kill
    wait()  # cleared before any process writes its files into it
    trainer._trm_staging = staging_root(run_dir)
    try:
        trainer._trm_save_checkpoint(model, trial, folder)
    except OSError as err:
        if args.should_save:
            clear_staged(run_dir, folder)
        raise write_error(run_dir, folder, err) from err
    finally:
        trainer._trm_staging = None
    wait()  # every process has written its files (RNG state, shards)
    if args.should_save:
        state = trainer.state
        best = state.best_model_checkpoint
        if best is not None and best.startswith(staging_root(run_dir)):
            state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            state.save_to_json(os.path.join(staging_root(run_dir), folder, TRAINER_STATE_NAME))
        publish(run_dir, folder)
        # The rotation TRL ran inside the staging folder saw one checkpoint: rotate the real ones now.
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=state.best_model_checkpoint,
            use_mtime=True,
        )
    wait()
