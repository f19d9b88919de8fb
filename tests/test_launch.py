"""`trl_trm.launch`: `accelerate launch` options rerun `trl-trm train` under `accelerate launch --module trl_trm.cli`
with the remaining arguments; what cannot work (an already launched process, several CPU processes, a bad option) is
one line; `python -m trl_trm.train` is `trl-trm train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trl_trm import launch


def test_strip_launch_tokens_removes_the_launch_flags_in_order():
    argv = ["--config", "r.yaml", "--num_processes", "2", "--max_steps", "2", "--cpu"]
    assert launch.strip_launch_tokens(argv, ["--num_processes", "2", "--cpu"]) == [
        "--config",
        "r.yaml",
        "--max_steps",
        "2",
    ]
    # A value equal to a launch value elsewhere stays: tokens are removed in order, once each.
    assert launch.strip_launch_tokens(["--max_steps", "2", "--num_processes", "2"], ["--num_processes", "2"]) == [
        "--max_steps",
        "2",
    ]


def test_launch_value_and_config_num_processes(tmp_path):
    assert launch._launch_value(["--num_processes=3"], "--num_processes") == "3"
    assert launch._launch_value(["--num-processes", "4"], "--num_processes", "--num-processes") == "4"
    assert launch._launch_value(["--cpu"], "--num_processes") is None
    (tmp_path / "a.yaml").write_text("num_processes: 8\n")
    (tmp_path / "b.yaml").write_text("num_processes: [\n")
    assert launch._config_num_processes(str(tmp_path / "a.yaml")) == 8
    assert launch._config_num_processes(str(tmp_path / "b.yaml")) is None  # accelerate reports it itself
    assert launch._config_num_processes(str(tmp_path / "none.yaml")) is None


def test_a_launched_process_does_not_launch_again(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="already launched .LOCAL_RANK/WORLD_SIZE is set"):
        launch.launch_with_accelerate(["--num_processes", "2"], [], SimpleNamespace(use_cpu=False))


def test_several_cpu_processes_are_refused_naming_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "_has_accelerator", lambda: False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N -m trl_trm.cli train"):
        launch.launch_with_accelerate(["--num_processes", "2"], [], SimpleNamespace(use_cpu=False))
    monkeypatch.setattr(launch, "_has_accelerator", lambda: True)
    with pytest.raises(ValueError, match="on CPU"):  # `use_cpu` or `--cpu` is CPU even with a GPU
        launch.launch_with_accelerate(["--num_processes", "2", "--cpu"], [], SimpleNamespace(use_cpu=False))


def test_the_launched_command_is_the_cli_module_and_sets_the_launched_env(monkeypatch):
    from accelerate.commands import launch as accelerate_launch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = []
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: seen.append((args, dict(os.environ))))
    assert (
        launch.launch_with_accelerate(["--num_processes", "1"], ["--max_steps", "2"], SimpleNamespace(use_cpu=True))
        == 0
    )
    ((args, env),) = seen
    assert args.module and args.training_script == "trl_trm.cli"
    assert args.training_script_args == ["train", "--max_steps", "2"]
    assert env[launch.LAUNCHED_ENV] == "1" and launch.LAUNCHED_ENV not in os.environ  # set for the launch only


def test_a_failed_launched_run_is_a_training_error(monkeypatch):
    from accelerate.commands import launch as accelerate_launch

    from trl_trm.train import TrainingError

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def fail(args):
        raise subprocess.CalledProcessError(3, "accelerate")

    monkeypatch.setattr(accelerate_launch, "launch_command", fail)
    with pytest.raises(TrainingError, match="exited with code 3"):
        launch.launch_with_accelerate(["--num_processes", "1"], [], SimpleNamespace(use_cpu=True))


def test_python_m_trl_trm_train_is_trl_trm_train(tmp_path):
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    missing = tmp_path / "none.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "trl_trm.train", "--config", str(missing)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert f"trl-trm train: error: recipe {str(missing)!r} does not exist" in run.stderr
