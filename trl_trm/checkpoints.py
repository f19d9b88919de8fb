"""The checkpoints and the output directory of a run: which checkpoint `resume_from_checkpoint` means, and what
happens to an earlier run in `output_dir` (refused, or cleared with `overwrite_output_dir`), and what a resume may
do (:func:`check_resume`: a checkpoint that reached `max_steps` ends the command with exit 0; other TRM settings than
the checkpoint's are refused, or recorded as a new segment in `trm_segments.json` with `allow_trm_change`). All are
preflight checks (`trl_trm.preflight.check_recipe` / `check_data` call them), each raising one `ValueError` line.
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


class RunAlreadyComplete(Exception):
    """The checkpoint being resumed already reached `max_steps`: `trl-trm train` says so and exits 0."""


def safetensors_problem(file: str) -> str | None:
    """Why a `.safetensors` file cannot load (None when its header and the data it announces are all there): a file
    cut short by a crash or a full disk fails here, without reading the tensors."""
    import struct

    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        return f"its {os.path.basename(file)} is cut short or not a safetensors file ({size} bytes)"
    if 8 + header_len + end > size:
        return f"its {os.path.basename(file)} is cut short ({size} of {8 + header_len + end} bytes)"
    return None


def checkpoint_problem(path: str, need_adaptive: bool = False) -> str | None:
    """Why the checkpoint folder `path` is incomplete (None when complete). transformers writes `trainer_state.json`
    last; TRMTrainer writes `trm_adaptive_state.json` after it. Each `*.safetensors` file (the model or adapter
    weights) must hold all the data its header announces."""
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
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors") and os.path.isfile(os.path.join(path, name)):
            problem = safetensors_problem(os.path.join(path, name))
            if problem:
                return problem
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
    skipped = []
    for _, path in checkpoints:
        problem = checkpoint_problem(path, need_adaptive)
        if problem is None:
            if skipped:
                warnings.warn(f"Resuming from {path}, the newest complete checkpoint.", RuntimeWarning, stacklevel=3)
            return path
        skipped.append(path)
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
        earlier = [
            p
            for _, p in _checkpoints(os.path.dirname(os.path.normpath(value)))
            if os.path.normpath(p) != os.path.normpath(value) and checkpoint_problem(p, need_adaptive) is None
        ]
        hint = f"resume from {earlier[0]}" if earlier else "resume from an earlier checkpoint-* folder"
        raise ValueError(
            f"`resume_from_checkpoint` {value!r} is incomplete ({problem}): {hint} "
            "(`resume_from_checkpoint: true` picks the newest complete one)."
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
        for name in (STATS_FILE, PLOT_FILE, SEGMENTS_FILE):
            if os.path.exists(os.path.join(config.output_dir, name)):
                os.remove(os.path.join(config.output_dir, name))
    PartialState().wait_for_everyone()


# ------------------------------------------------------------------------------------------------ resuming a run
# The TRM settings a resume may not change silently (the adaptive controller: `trm_target_accept_rate`).
TRM_RESUME_FIELDS = (
    "trm_mode",
    "trm_delta_max",
    "trm_delta_avg",
    "trm_delta_kl",
    "trm_geo_low",
    "trm_geo_high",
    "trm_ratio_min",
    "trm_ratio_max",
    "trm_target_accept_rate",
    "trm_calibrate_accept",
    "trm_calibrate_batches",
)
SEGMENTS_FILE = "trm_segments.json"  # the TRM settings of each segment of a resumed run whose settings changed


def checkpoint_trm_settings(checkpoint: str) -> dict | None:
    """The TRM settings a checkpoint was trained with, from its `training_args.bin` (the pickled `TRMConfig` the
    Trainer saves), or None when it has none (or cannot be read)."""
    path = os.path.join(checkpoint, "training_args.bin")
    if not os.path.isfile(path):
        return None
    import torch

    try:
        args = torch.load(path, weights_only=False)
    except Exception:  # another package's class, a file cut short: nothing to compare
        return None
    if not hasattr(args, "trm_mode"):
        return None
    return {name: getattr(args, name, None) for name in TRM_RESUME_FIELDS}


def _checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return int(json.load(f).get("global_step", 0))


def check_resume(script_args, config) -> None:
    """Resuming `config.resume_from_checkpoint` (already resolved to a folder): a checkpoint that reached `max_steps`
    raises RunAlreadyComplete (nothing to train); other TRM settings than the checkpoint's are refused with one line
    naming them, unless `allow_trm_change` (then both segments are written to output_dir/trm_segments.json)."""
    from .adaptive import STATE_FILE_NAME

    checkpoint = config.resume_from_checkpoint
    if checkpoint is None:
        return
    step = _checkpoint_step(checkpoint)
    if config.max_steps > 0 and step >= config.max_steps:
        raise RunAlreadyComplete(
            f"{checkpoint} already reached max_steps {config.max_steps} (step {step}): nothing to train, the run is "
            "unchanged. Raise `max_steps` to train further."
        )
    saved = checkpoint_trm_settings(checkpoint)
    if saved is None:
        return
    now = {name: getattr(config, name, None) for name in TRM_RESUME_FIELDS}
    changed = [f"{name} {saved[name]!r} -> {now[name]!r}" for name in TRM_RESUME_FIELDS if saved[name] != now[name]]
    if config.trm_target_accept_rate is None and os.path.exists(os.path.join(checkpoint, STATE_FILE_NAME)):
        if not any(c.startswith("trm_target_accept_rate") for c in changed):
            changed.append("the adaptive controller off (the checkpoint holds its state)")
    if not changed:
        return
    if not getattr(script_args, "allow_trm_change", False):
        raise ValueError(
            f"Resuming {checkpoint} with other TRM settings: {'; '.join(changed)}. The run would silently change "
            "its correction mid-way: resume with the checkpoint's settings, or pass `--allow_trm_change true` to "
            "record both segments (trm_segments.json and the model card)."
        )
    from accelerate import PartialState

    if PartialState().is_main_process:
        record_segments(config.output_dir, saved, now, step)


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def record_segments(output_dir: str, before: dict, after: dict, step: int) -> str:
    """Append the segment that starts at `step` with the settings `after` to output_dir/trm_segments.json (the first
    segment, from step 0 with `before`, is written when the file is new). Written atomically; returns its path."""
    path = os.path.join(output_dir, SEGMENTS_FILE)
    segments = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            segments = json.load(f)
    if not segments:
        segments = [{"from_step": 0, "settings": {k: _jsonable(v) for k, v in before.items()}}]
    segments = [s for s in segments if s["from_step"] < step]  # a segment resumed again from an earlier step
    segments.append({"from_step": step, "settings": {k: _jsonable(v) for k, v in after.items()}})
    os.makedirs(output_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(segments, f, indent=2)
    os.replace(tmp, path)
    return path


def read_segments(output_dir: str) -> list[dict]:
    """The segments written by :func:`record_segments` (empty when the run never changed its TRM settings)."""
    path = os.path.join(output_dir, SEGMENTS_FILE)
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            segments = json.load(f)
    except (OSError, json.JSONDecodeError):
        return []
    return segments if isinstance(segments, list) else []
