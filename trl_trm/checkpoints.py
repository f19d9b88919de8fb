"""The checkpoints and the output directory of a run: which checkpoint `resume_from_checkpoint` means, and what
happens to an earlier run in `output_dir` (refused, or cleared with `overwrite_output_dir`). Both are preflight
checks (`trl_trm.preflight.check_recipe` / `check_data` call them), each raising one `ValueError` line.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

# `resume_from_checkpoint` values (a string from YAML or the CLI): start fresh / the newest complete checkpoint.
RESUME_NONE = ("false", "no", "none", "")
RESUME_LAST = ("true", "yes", "last")
# Files of an earlier run in output_dir that a new run must not silently mix with (checkpoints are `checkpoint-*`).
RUN_FILES = ("trm_stats.jsonl", "trainer_state.json", "model.safetensors", "adapter_model.safetensors")


def checkpoint_problem(path: str, need_adaptive: bool = False) -> str | None:
    """Why the checkpoint folder `path` is incomplete (None when complete). transformers writes `trainer_state.json`
    last; TRMTrainer writes `trm_adaptive_state.json` after it."""
    from .adaptive import STATE_FILE_NAME

    files = ["trainer_state.json"]
    if need_adaptive or os.path.exists(os.path.join(path, STATE_FILE_NAME)):
        files.append(STATE_FILE_NAME)
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"it has no {name}"
        try:
            with open(file, encoding="utf-8") as f:
                json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"its {name} is cut short"
    return None


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """The `checkpoint-<step>` folders in output_dir as (step, path), newest first."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    checkpoints = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            step = name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
            if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit():
                if os.path.isdir(os.path.join(output_dir, name)):
                    checkpoints.append((int(step), os.path.join(output_dir, name)))
    return sorted(checkpoints, reverse=True)


def _last_complete_checkpoint(value, output_dir: str, need_adaptive: bool) -> str:
    checkpoints = _checkpoints(output_dir)
    if not checkpoints:
        raise ValueError(
            f"`resume_from_checkpoint: {value}` but {output_dir!r} holds no checkpoint-* folder: remove the key "
            "to start fresh, or give a checkpoint path."
        )
    for _, path in checkpoints:
        problem = checkpoint_problem(path, need_adaptive)
        if problem is None:
            return path
        warnings.warn(
            f"Skipping the incomplete checkpoint {path} ({problem}: a crash or a full disk while saving); "
            "resuming from the newest complete one.",
            RuntimeWarning,
            stacklevel=3,  # the caller of resolve_checkpoint
        )
    raise ValueError(
        f"`resume_from_checkpoint: {value}` but every checkpoint-* folder in {output_dir!r} is incomplete: start "
        "fresh (`--overwrite_output_dir true`) or give a checkpoint path."
    )


def resolve_checkpoint(value, output_dir: str, need_adaptive: bool = False):
    """`resume_from_checkpoint: true` / `last` -> the last complete checkpoint in output_dir (the YAML/CLI value is a
    string); incomplete ones (a crash or a full disk while saving) are skipped with a warning."""
    if value is None or str(value).lower() in RESUME_NONE:
        return None
    if str(value).lower() in RESUME_LAST:
        return _last_complete_checkpoint(value, output_dir, need_adaptive)
    if not os.path.isdir(value):
        raise ValueError(f"`resume_from_checkpoint` {value!r} is not a directory: give a checkpoint-* folder.")
    problem = checkpoint_problem(value, need_adaptive)
    if problem is not None:
        raise ValueError(
            f"`resume_from_checkpoint` {value!r} is incomplete ({problem}): resume from an earlier checkpoint-* "
            "folder (`resume_from_checkpoint: true` picks the newest complete one)."
        )
    return value


def earlier_run_files(output_dir: str) -> list[str]:
    """The files and `checkpoint-*` folders of an earlier run in output_dir."""
    if not os.path.isdir(output_dir):
        return []
    found = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-"))
    return found + [n for n in RUN_FILES if os.path.exists(os.path.join(output_dir, n))]


def check_output_dir(script_args, config) -> None:
    """A fresh run in an output_dir that holds an earlier one is refused, unless `overwrite_output_dir` is set: then
    the old checkpoints (which a later `resume_from_checkpoint: true` would pick up) and trm_stats.* go first."""
    if config.resume_from_checkpoint is not None:
        return
    found = earlier_run_files(config.output_dir)
    if not found:
        return
    if not script_args.overwrite_output_dir:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"output_dir {config.output_dir!r} already holds a run ({shown}). To continue it: "
            "`--resume_from_checkpoint true`; to start over there: `--overwrite_output_dir true` (deletes its "
            "checkpoint-* folders and trm_stats.*); or choose another output_dir."
        )
    from accelerate import PartialState

    if PartialState().is_main_process:
        from .plotting import PLOT_FILE, STATS_FILE

        for name in found:
            path = os.path.join(config.output_dir, name)
            if name.startswith("checkpoint-"):
                shutil.rmtree(path)
        for name in (STATS_FILE, PLOT_FILE):
            if os.path.exists(os.path.join(config.output_dir, name)):
                os.remove(os.path.join(config.output_dir, name))
    PartialState().wait_for_everyone()
