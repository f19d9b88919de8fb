"""Relaunching `trl-trm train` under `accelerate launch`, as `trl grpo` does.

`--accelerate_config NAME_OR_PATH` (a TRL config name such as `zero3`, or a file) and any `accelerate launch` option
(`--num_processes 2`, ...) given to `trl-trm train` rerun the same command, less those options, as
`accelerate launch ... --module trl_trm.cli train ...`. The launched processes see `LAUNCHED_ENV` set, so
`trl_trm.cli` trains there instead of launching again (launch keys left in the recipe are then ignored).
"""

from __future__ import annotations

import os

LAUNCHED_ENV = "TRL_TRM_LAUNCHED"  # set by `trl-trm train` for the processes it starts under `accelerate launch`


def launch_with_accelerate(launch_args: list[str], script_argv: list[str], config) -> int:
    """Rerun `trl-trm train SCRIPT_ARGV` under `accelerate launch LAUNCH_ARGS`, as `trl grpo` does
    (`--accelerate_config` resolved with TRL's helper: a file, or a config name shipped with TRL). Returns the exit
    code of the launched run."""
    import argparse
    import subprocess

    from accelerate.commands import launch as accelerate_launch
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    from .train import TrainingError  # the run's error type (exit code 1); imported here: train re-exports us

    if os.environ.get("LOCAL_RANK") is not None or os.environ.get("WORLD_SIZE") is not None:
        raise ValueError(
            f"`accelerate launch` options {launch_args} were given to a process that is already launched (LOCAL_RANK/"
            "WORLD_SIZE is set): pass them to your launcher, not to `trl-trm train`."
        )
    launch_args = resolve_accelerate_config_argument(launch_args)
    num = _launch_value(launch_args, "--num_processes", "--num-processes")
    if num is None and "--config_file" in launch_args:
        num = _config_num_processes(launch_args[launch_args.index("--config_file") + 1])
    if num is not None and int(num) > 1 and (config.use_cpu or "--cpu" in launch_args or not _has_accelerator()):
        raise ValueError(
            f"`--num_processes {num}` on CPU: accelerate's multi-CPU launcher needs `mpirun` and otherwise starts one "
            "process. Start several CPU processes with `torchrun --nproc_per_node N -m trl_trm.cli train ...` "
            "instead (gloo backend), or run on GPUs."
        )
    parser = accelerate_launch.launch_command_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args([*launch_args, "--module", "trl_trm.cli", "train", *script_argv])
    except argparse.ArgumentError as err:
        raise ValueError(f"Bad `accelerate launch` option: {err}.") from None
    os.environ[LAUNCHED_ENV] = "1"  # the launched processes ignore launch keys that the recipe holds
    try:
        accelerate_launch.launch_command(args)
    except subprocess.CalledProcessError as err:
        raise TrainingError(
            f"the run launched with `accelerate launch {' '.join(launch_args)}` exited with code {err.returncode} "
            "(its output is above)."
        ) from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return 0


def _launch_value(args: list[str], *names: str) -> str | None:
    for i, token in enumerate(args):
        flag, has_value, value = token.partition("=")
        if flag in names:
            return value if has_value else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _config_num_processes(path: str) -> int | None:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            value = (yaml.safe_load(f) or {}).get("num_processes")
    except (OSError, yaml.YAMLError):
        return None  # accelerate reports a bad config file itself
    return int(value) if isinstance(value, int) else None


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def strip_launch_tokens(argv: list[str], launch_cli: list[str]) -> list[str]:
    """`argv` less the `accelerate launch` tokens given on the command line (`launch_cli`, an ordered subsequence of
    it, removed in order): what the launched processes run. Launch keys of the recipe stay; they are ignored there."""
    script_argv, pending = [], list(launch_cli)
    for token in argv:
        if pending and token == pending[0]:
            pending.pop(0)
        else:
            script_argv.append(token)
    return script_argv
