"""Issue 21, the runner side: one run per output_dir (a lock), resuming a finished run or with other TRM settings,
and the quiet or confusing failures of `trl-trm train` / `trl-trm plot`, each one clear line (or a warning).

Each test runs `main([...])` in-process and checks the exit code and the one line, as tests/test_cli_errors.py does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_kwargs import MISSING_MODEL, one_error_line, torchrun, write_recipe

from trl_trm.cli import main


def _recipe(tmp_path: Path, **overrides) -> Path:
    return write_recipe(tmp_path / "r.yaml", **overrides)


def _error(capsys) -> str:
    return one_error_line(capsys)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(out: Path, pid: int) -> Path:
    from trl_trm.runlock import LOCK_FILE

    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}))
    return lock


# ------------------------------------------------------------------------------------------------ one run per output_dir
def test_second_live_run_in_one_output_dir_is_refused(tmp_path, capsys):
    lock = _write_lock(tmp_path / "out", os.getppid())  # a live process holds it
    assert main(["train", "--config", str(_recipe(tmp_path))]) == 2
    line = _error(capsys)
    assert f"output_dir {str(tmp_path / 'out')!r} is in use by another run (PID {os.getppid()} on" in line
    assert json.loads(lock.read_text())["pid"] == os.getppid()  # not taken over, not removed


def test_stale_lock_is_taken_over_with_a_warning_and_released_after_a_crash(tmp_path, capsys, monkeypatch):
    import trl_trm.train as train
    from trl_trm.runlock import LOCK_FILE

    dead = _dead_pid()
    lock = _write_lock(tmp_path / "out", dead)
    held = []

    def crash(*args, **kwargs):
        held.append(json.loads(lock.read_text())["pid"])
        raise RuntimeError("crash mid-run")

    monkeypatch.setattr(train, "run_train", crash)
    with pytest.warns(RuntimeWarning, match=rf"stale lock .*the run that held it \(PID {dead} on .*\) is gone"):
        with pytest.raises(RuntimeError, match="crash mid-run"):
            main(["train", "--config", str(_recipe(tmp_path))])
    assert held == [os.getpid()]  # taken over while training
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # released on the crash


def test_lock_is_released_when_the_run_ends(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import trl_trm.train as train
    from trl_trm.runlock import LOCK_FILE

    seen = []

    def finished(script_args, config, model_args):
        seen.append((Path(config.output_dir) / LOCK_FILE).exists())
        return SimpleNamespace(accelerator=SimpleNamespace(print=print), end=lambda: None)

    monkeypatch.setattr(train, "run_train", finished)
    assert main(["train", "--config", str(_recipe(tmp_path))]) == 0
    assert seen == [True] and not (tmp_path / "out" / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_stops_when_the_lock_is_refused(tmp_path):
    """torchrun, 2 processes: the main process finds the live lock, and both ranks exit 2 before training."""
    _write_lock(tmp_path / "out", os.getppid())
    env = {**os.environ, "TRL_TRM_LAUNCHED": "", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = torchrun(2)
    cmd += ["--tee", "3", "-m", "trl_trm.cli", "train", "--config", str(_recipe(tmp_path))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("is in use by another run") == 2, out[-3000:]  # both ranks refused
    assert "exitcode  : 2" in out and MISSING_MODEL not in out


# ------------------------------------------------------------------------------------------------ resume
def _checkpoint(root: Path, step: int, args=None, model: bytes | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(64)}, str(path / "model.safetensors"))
    if model is not None:
        (path / "model.safetensors").write_bytes(model)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": step}))
    if args is not None:
        torch.save(args, path / "training_args.bin")
    return path


def _config(tmp_path: Path, *flags: str):
    from trl_trm.recipe import parse_recipe

    return parse_recipe(["--config", str(_recipe(tmp_path)), *flags])[1]


def test_resuming_a_run_that_reached_max_steps_exits_0_without_training(tmp_path, capsys):
    out = tmp_path / "out"
    _checkpoint(out, 6)
    recipe = _recipe(tmp_path, max_steps=6, resume_from_checkpoint="true")
    assert main(["train", "--config", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert f"{out / 'checkpoint-6'} already reached max_steps 6 (step 6): nothing to train" in text
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6"]  # no checkpoint-7, no model written


@pytest.mark.parametrize(
    ("saved_flags", "message"),
    [
        (["--trm_delta_max", "0.5"], "trm_delta_max 0.5 -> 0.6931"),
        (["--trm_mode", "seq_mis", "--trm_delta_max", "null"], "trm_mode 'seq_mis' -> 'trm'"),
        (["--trm_target_accept_rate", "0.9"], "trm_target_accept_rate 0.9 -> None"),
    ],
)
def test_resume_with_other_trm_settings_is_refused_naming_them(tmp_path, capsys, saved_flags, message):
    out = tmp_path / "out"
    _checkpoint(out, 3, args=_config(tmp_path, *saved_flags))
    if "--trm_target_accept_rate" in saved_flags:
        (out / "checkpoint-3" / "trm_adaptive_state.json").write_text('{"scale": 1.0, "num_updates": 3}')
    recipe = _recipe(tmp_path, max_steps=6, resume_from_checkpoint="true")
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert "with other TRM settings:" in line and message in line and "--allow_trm_change true" in line
    assert MISSING_MODEL not in line


def test_allow_trm_change_records_both_segments_in_a_file_and_the_card(tmp_path, capsys):
    from trl_trm.checkpoints import SEGMENTS_FILE
    from trl_trm.hub import trm_card_section

    out = tmp_path / "out"
    _checkpoint(out, 3, args=_config(tmp_path, "--trm_delta_max", "0.5"))
    recipe = _recipe(tmp_path, max_steps=6, resume_from_checkpoint="true")
    assert main(["train", "--config", str(recipe), "--allow_trm_change", "true"]) == 2
    assert MISSING_MODEL in _error(capsys)  # got past the resume check, to the (missing) model
    segments = json.loads((out / SEGMENTS_FILE).read_text())
    assert [(s["from_step"], s["settings"]["trm_delta_max"]) for s in segments] == [
        (0, 0.5),
        (3, pytest.approx(0.6931, abs=1e-4)),
    ]
    card = trm_card_section(_config(tmp_path), [])
    assert "### TRM settings changed during training" in card
    assert "| 0 |" in card and "| 3 |" in card and "0.5" in card and "0.6931" in card


# ------------------------------------------------------------------------------------------------ confusing or silent
def test_train_without_arguments_prints_the_usage(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bf16" not in err and "FutureWarning" not in err
    assert err.splitlines()[0].startswith("usage: trl-trm train [--config RECIPE.yaml]")
    assert err.splitlines()[1] == (
        "trl-trm train: error: give a recipe (`--config recipe.yaml`) and/or flags (`--model_name_or_path ...`)."
    )


REWARDS = """\
def no_kwargs(completions):
    return [0.0 for _ in completions]

def strings(completions, **kwargs):
    return ["good" for _ in completions]

def short(completions, **kwargs):
    return [1.0]
"""


@pytest.mark.parametrize(
    ("func", "message"),
    [
        ("no_kwargs", "Reward function 'no_kwargs' cannot be called (no_kwargs() got an unexpected keyword argument"),
        ("strings", "Reward function 'strings' returned 'good' (a str) among its rewards"),
        ("short", "Reward function 'short' returned 1 values for 4 completions"),
    ],
)
def test_a_misbehaving_reward_function_is_named_with_what_it_must_return(
    tmp_path, capsys, monkeypatch, tiny_model_dir, func, message
):
    (tmp_path / "bad_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _recipe(tmp_path, model_name_or_path=tiny_model_dir, reward_funcs=[f"bad_rewards:{func}"])
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert message in line and "must accept `**kwargs`" in line and "one float (or None) per completion" in line


def test_checked_reward_keeps_the_name_and_passes_good_rewards():
    import inspect

    from trl_trm.preflight import checked_reward
    from trl_trm.rewards import reversal

    wrapped = checked_reward(reversal)
    assert wrapped.__name__ == "reversal" and inspect.signature(wrapped) == inspect.signature(reversal)
    assert wrapped(completions=["ab"], target=["ba"]) == reversal(completions=["ab"], target=["ba"])
    assert checked_reward(lambda completions, **kw: [None, 1, 0.5])(completions=[1, 2, 3]) == [None, 1, 0.5]


def test_an_empty_prompt_is_refused_with_its_row(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in ["ab", "cd", "", "ef"] * 2))
    assert main(["train", "--config", str(_recipe(tmp_path, dataset_name=str(data)))]) == 2
    line = _error(capsys)
    assert "Row 2 of the training data has an empty prompt ('')" in line and MISSING_MODEL not in line


def test_a_prompt_longer_than_the_context_is_refused_with_its_row(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    prompts = ["ab", "x " * 600, "cd", "ef"] * 2
    data.write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in prompts))
    recipe = _recipe(tmp_path, dataset_name=str(data), model_name_or_path=tiny_model_dir)
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert "Row 1 of the training data has a prompt of" in line
    assert "with max_completion_length 6 that exceeds the model's context of 512 tokens" in line


def test_max_steps_0_says_so(tmp_path, capsys):
    assert main(["train", "--config", str(_recipe(tmp_path, max_steps=0))]) == 2
    line = _error(capsys)
    assert "`max_steps: 0` trains nothing" in line and "no complete batch" not in line and MISSING_MODEL not in line


def test_a_truncated_model_in_the_checkpoint_names_the_file_and_the_previous_checkpoint(tmp_path, capsys):
    from trl_trm.checkpoints import resolve_checkpoint

    out = tmp_path / "out"
    good = _checkpoint(out, 3)
    bad = _checkpoint(out, 6)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # a full disk while saving
    recipe = _recipe(tmp_path, max_steps=9, resume_from_checkpoint=str(bad))
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert f"`resume_from_checkpoint` {str(bad)!r} is incomplete (its model.safetensors is cut short" in line
    assert f"resume from {good}" in line
    # `true` skips it and says which checkpoint it resumes from.
    with pytest.warns(RuntimeWarning) as caught:
        assert resolve_checkpoint("true", str(out)) == str(good)
    messages = [str(w.message) for w in caught]
    assert any("Skipping the incomplete checkpoint" in m and "model.safetensors is cut short" in m for m in messages)
    assert f"Resuming from {good}, the newest complete checkpoint." in messages


def test_plot_of_a_jsonl_whose_lines_are_not_objects_names_the_line(tmp_path, capsys):
    (tmp_path / "trm_stats.jsonl").write_text('{"step": 1, "reward": 0.5}\n[1, 2]\n')
    assert main(["plot", str(tmp_path)]) == 2
    line = _error(capsys)
    assert "trm_stats.jsonl, line 2: a list, not a JSON object" in line


# ------------------------------------------------------------------------------------------------ stalled rank
def test_train_has_a_ddp_timeout_below_trls_30_minutes(tmp_path):
    from trl_trm import TRMConfig

    assert _config(tmp_path).ddp_timeout == 600
    assert _config(tmp_path, "--ddp_timeout", "20").ddp_timeout == 20
    assert TRMConfig(output_dir=str(tmp_path), use_cpu=True).ddp_timeout == 1800  # the Python API keeps HF's


# ------------------------------------------------------------------------------------------------ beyond the list
def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert main(["train", "--config", str(_recipe(tmp_path))]) == 2
    assert f"output_dir {str(tmp_path / 'out')!r} is a file, not a folder" in _error(capsys)


def test_output_dir_that_cannot_be_written_is_refused(tmp_path, capsys, monkeypatch):
    # Permissions do not stop root (CI runs as root), so the refusal of the file system is simulated for that one path.
    target = str(tmp_path / "ro" / "out")
    makedirs = os.makedirs

    def refusing(path, *args, **kwargs):
        if os.path.abspath(path) == target:
            raise PermissionError(13, "Permission denied", path)
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refusing)
    assert main(["train", "--config", str(_recipe(tmp_path, output_dir=target))]) == 2
    assert f"Cannot create output_dir {target!r} (Permission denied)" in _error(capsys)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _local_rank(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    rank = env.get(b"LOCAL_RANK")
    return rank.decode() if rank is not None else None


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stopped_rank_fails_the_run_within_ddp_timeout(tmp_path):
    """torchrun, 2 processes on CPU (gloo): rank 1 is stopped (SIGSTOP) mid-training; rank 0 fails at its next
    collective after `--ddp_timeout 20` with one line naming the timeout, instead of hanging for 30 minutes."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env.pop("TRL_TRM_LAUNCHED", None)
    out = tmp_path / "run"
    cmd = torchrun(2)
    cmd += ["-m", "trl_trm.cli", "train", "--config", str(Path(__file__).parent.parent / "recipes" / "demo.yaml")]
    cmd += ["--output_dir", str(out), "--max_steps", "100000", "--logging_steps", "1", "--ddp_timeout", "20"]
    cmd += ["--per_device_train_batch_size", "8"]
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    stopped = None
    try:
        deadline = time.time() + 150
        while time.time() < deadline and not (
            (out / "trm_stats.jsonl").exists() and (out / "trm_stats.jsonl").read_text().count("\n") >= 2
        ):
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.5)
        stopped = next(p for p in _children(proc.pid) if _local_rank(p) == "1")
        os.kill(stopped, signal.SIGSTOP)
        start = time.time()
        proc.wait(timeout=150)
        elapsed = time.time() - start
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode != 0
    lines = [line for line in text.splitlines() if "trl-trm train: error: a collective between the processes" in line]
    assert len(lines) == 1, text[-4000:]
    assert "`ddp_timeout` (20 s)" in lines[0] and "--ddp_timeout SECONDS" in lines[0]
    assert elapsed < 120, elapsed  # not transformers' 30 minutes


BAD_MODULES = {
    "bad_syntax_mod": ("def r(completions, **kw)\n    return 1\n", "fails to import: SyntaxError: expected ':' ("),
    "raising_mod": ("x = 1 / 0\n", "fails to import: ZeroDivisionError: division by zero"),
}


@pytest.mark.parametrize("module", sorted(BAD_MODULES))
def test_a_reward_module_that_fails_to_import_is_named(tmp_path, capsys, monkeypatch, module):
    text, message = BAD_MODULES[module]
    (tmp_path / f"{module}.py").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--config", str(_recipe(tmp_path, reward_funcs=[f"{module}:r"]))]) == 2
    line = _error(capsys)
    assert f"The module of reward function '{module}:r' {message}" in line and MISSING_MODEL not in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": -0.1}, "`learning_rate: -0.1` cannot train: it must be >= 0"),
        ({"temperature": 0.0}, "`temperature: 0.0` cannot train: it must be > 0"),
        ({"max_completion_length": 0}, "`max_completion_length: 0` cannot train: it must be >= 1 token"),
        ({"per_device_train_batch_size": 0}, "`per_device_train_batch_size: 0` cannot train: it must be >= 1"),
        ({"max_steps": -5}, "`max_steps: -5` trains nothing"),
    ],
)
def test_values_that_cannot_train_are_refused_before_the_model_loads(tmp_path, capsys, overrides, message):
    assert main(["train", "--config", str(_recipe(tmp_path, **overrides))]) == 2
    line = _error(capsys)
    assert message in line and MISSING_MODEL not in line


def test_a_typo_in_a_datasets_entry_is_named(tmp_path, capsys):
    recipe = _recipe(tmp_path, dataset_name=None, datasets=[{"path": "json", "data_fils": "d.jsonl"}])
    assert main(["train", "--config", str(recipe)]) == 2
    line = _error(capsys)
    assert "A `datasets` entry has a key that dataset entries do not take" in line and "'data_fils'" in line
    assert "data_files" in line


def test_a_non_utf8_jsonl_names_the_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "ab", "target": "ba"}\n' + b'{"prompt": "caf\xe9", "target": "x"}\n' * 7)
    assert main(["train", "--config", str(_recipe(tmp_path, dataset_name=str(data)))]) == 2
    line = _error(capsys)
    assert f"Cannot read dataset file {str(data)!r}: line 2: not UTF-8 (byte 0xe9" in line


def test_reward_funcs_given_as_one_name_is_one_function_not_its_letters(tmp_path, capsys):
    assert main(["train", "--config", str(_recipe(tmp_path, reward_funcs="reversal"))]) == 2
    assert MISSING_MODEL in _error(capsys)  # the reward resolved; the run went on to the (missing) model


@pytest.mark.slow
def test_resuming_a_finished_run_end_to_end_leaves_it_unchanged(tmp_path, capsys, tiny_model_dir):
    """The issue's case: max_steps 6, a checkpoint every 3 steps, then the same command with resume: exit 0, no
    checkpoint-7, the final model unchanged."""
    out = tmp_path / "out"
    recipe = _recipe(
        tmp_path,
        model_name_or_path=tiny_model_dir,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        lr_scheduler_type="constant",
        learning_rate=0.01,
    )
    assert main(["train", "--config", str(recipe)]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--resume_from_checkpoint", "true"]) == 0
    assert "already reached max_steps 6 (step 6): nothing to train" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ("Application timeout caused pair closure", True),  # gloo, in DDP's backward allreduce
        ("[../gloo/transport/tcp/pair.cc:534] Read error: Connection timed out", True),
        ("CUDA out of memory", False),
    ],
)
def test_collective_timeout_names_gloo_timeouts_in_a_multi_process_run(monkeypatch, message, named):
    """Every gloo wording of a collective timeout gets the one `ddp_timeout` line (only in a multi-process run)."""
    import torch.distributed as dist

    from trl_trm.cli import collective_timeout

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    line = collective_timeout(RuntimeError(message))
    assert (line is not None and "ddp_timeout" in line) == named
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    assert collective_timeout(RuntimeError(message)) is None
