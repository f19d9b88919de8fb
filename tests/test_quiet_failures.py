"""Issue 21, trainer side: a run that cannot learn is a failed run, settings the mode ignores are named, the
`trm_nonfinite` message names its field, and checkpoints / `trm_stats.jsonl` are never left half-written."""

from __future__ import annotations

import errno
import json
import math
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from trainer_kwargs import write_recipe

from trl_trm import TRMConfig
from trl_trm.cli import main
from trl_trm.masking import DEFAULT_DELTA_MAX, compute_trust_region_mask


def always_nan(completions, **kwargs):
    return [float("nan")] * len(completions)


def half_nan(completions, **kwargs):
    return [float("nan") if i % 2 else min(len(c), 40) / 40 for i, c in enumerate(completions)]


def constant(completions, **kwargs):
    return [1.0] * len(completions)


def _ours(record, text):
    return [w for w in record if text in str(w.message)]


# ------------------------------------------------------------------------------ a run that cannot learn is a failure
def _cannot_learn(trainer):
    """Train; return the one "could not learn" warning's reason, checked against `trm_run_problem`."""
    with pytest.warns(RuntimeWarning) as record:
        trainer.train()
    ours = _ours(record, "This run could not learn: ")
    assert len(ours) == 1, [str(w.message) for w in record]
    reason = str(ours[0].message).removeprefix("This run could not learn: ")
    assert reason == trainer.trm_run_problem and "\n" not in reason
    return reason, record


def test_always_nan_reward_is_a_run_that_could_not_learn_naming_the_function(make_trainer):
    trainer = make_trainer(reward_funcs=always_nan, max_steps=2)
    reason, record = _cannot_learn(trainer)
    assert reason.startswith("every reward of the run was non-finite: the reward functions ['always_nan']")
    assert "of 2 steps" in reason
    assert len(_ours(record, "have a non-finite reward")) == 1  # warned once, at the first step


def test_partly_nan_rewards_are_counted_and_warned_once(make_trainer):
    trainer = make_trainer(reward_funcs=half_nan, max_steps=2)
    with pytest.warns(RuntimeWarning) as record:
        trainer.train()
    assert trainer.trm_run_problem is None and not _ours(record, "could not learn")
    ours = _ours(record, "have a non-finite reward")
    assert len(ours) == 1 and "2 of 4 completions at step 0" in str(ours[0].message)
    assert "half_nan: 2" in str(ours[0].message)
    logged = [h["trm/reward_nonfinite_frac"] for h in trainer.state.log_history if "trm/reward_nonfinite_frac" in h]
    assert logged == [0.5, 0.5]


def test_normal_run_logs_no_reward_metric_and_no_warning(make_trainer):
    trainer = make_trainer(max_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert not _ours(record, "non-finite reward") and not _ours(record, "could not learn")
    assert trainer.trm_run_problem is None
    assert not any("trm/reward_nonfinite_frac" in h for h in trainer.state.log_history)


def test_every_sequence_rejected_for_the_whole_run_is_a_run_that_could_not_learn(make_trainer, monkeypatch):
    import trl_trm.trainer as trainer_module

    real = trainer_module.mask_and_weights

    def engine_off_by_e(theta, sampling, *args, **kwargs):  # every token ratio is e: |log rho| = 1 > log 2
        return real(theta, sampling + 1.0, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "mask_and_weights", engine_off_by_e)
    reason, _ = _cannot_learn(make_trainer(max_steps=2, trm_accept_rate_floor=None))
    assert reason.startswith("every sequence was rejected at every one of the 2 steps (8 sequences")
    assert "trm_mode='trm'" in reason


def test_zero_gradient_at_every_step_is_a_run_that_could_not_learn(make_trainer):
    trainer = make_trainer(reward_funcs=constant, max_steps=2)  # constant rewards: every advantage is 0
    reason, _ = _cannot_learn(trainer)
    assert reason.startswith("the gradient was zero at every one of the 2 optimizer steps")


def test_run_health_counts_are_global_and_a_normal_run_passes():
    from trl_trm.run_health import RunHealth

    health = RunHealth()
    assert health.problem(["r"], "trm") is None  # 0 steps: reported by the runner, not here
    # (N, F) rewards gathered over 2 processes: rank 1's NaNs are counted like rank 0's.
    per_func, any_row = health.add_rewards(torch.tensor([[1.0, float("nan")], [0.5, 2.0], [float("inf"), 1.0]]))
    assert per_func.tolist() == [1, 1] and int(any_row) == 2
    health.add_sequences(torch.tensor(3.0), torch.tensor(4))
    health.add_grad_norm(torch.tensor(0.25))
    assert health.problem(["a", "b"], "trm") is None


@pytest.mark.slow
def test_cli_always_nan_reward_exits_1_with_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    (tmp_path / "mymod.py").write_text(
        "def always_nan(completions, **kw):\n    return [float('nan')] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write_recipe(
        tmp_path / "r.yaml", model_name_or_path=tiny_model_dir, reward_funcs=["mymod:always_nan"], max_steps=2
    )
    with pytest.warns(RuntimeWarning, match="non-finite reward"):
        assert main(["train", "--config", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "trl-trm train: error: every reward of the run was non-finite: the reward functions ['always_nan']"
    )
    assert err[-1].endswith("The final model was not saved.")
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- the trm_nonfinite message
def test_nonfinite_raise_message_names_the_config_field():
    theta = torch.zeros(2, 3)
    roll = theta.clone()
    roll[1, 1] = float("nan")
    with pytest.raises(ValueError) as err:
        compute_trust_region_mask(theta, roll, torch.ones(2, 3), nonfinite="raise")
    assert "trm_nonfinite='reject'" in str(err.value) and "sequences [1]" in str(err.value)
    assert math.isfinite(theta.sum().item())


# ------------------------------------------------------------------------------------ settings the mode ignores
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"trm_mode": "none", "trm_delta_max": 0.5}, "trm_delta_max=0.5 (used by trm_mode 'trm')"),
        ({"trm_mode": "seq_mis", "trm_delta_max": 0.5}, "trm_delta_max=0.5 (used by trm_mode 'trm')"),
        ({"trm_mode": "trm", "trm_geo_low": 0.9}, "trm_geo_low=0.9 (used by trm_mode 'geo_mask')"),
        ({"trm_mode": "trm", "trm_ratio_max": 3.0}, "trm_ratio_max=3.0 (used by trm_mode 'seq_mis' / 'seq_tis'"),
        ({"trm_mode": "geo_mask", "trm_delta_kl": 1e-3}, "trm_delta_kl=0.001 (used by trm_mode 'trm_exact')"),
        ({"trm_mode": "token_tis", "trm_ratio_factor": False}, "trm_ratio_factor=False (used by trm_mode 'trm'"),
        ({"trm_mode": "trm", "trm_adapt_rate": 0.5}, "trm_adapt_rate=0.5 (used only with trm_target_accept_rate"),
        ({"trm_accept_rate_floor": None, "trm_accept_rate_patience": 5}, "trm_accept_rate_patience=5 (used only"),
    ],
    ids=[
        "delta_max-none",
        "delta_max-seq_mis",
        "geo_low-trm",
        "ratio_max-trm",
        "delta_kl-geo",
        "factor-token_tis",
        "adapt_rate-fixed",
        "patience-no-floor",
    ],
)
def test_a_setting_the_mode_ignores_is_named_once(tmp_path, kwargs, named):
    with pytest.warns(UserWarning) as record:
        TRMConfig(str(tmp_path), use_cpu=True, **kwargs)
    ours = _ours(record, " ignores ")
    assert len(ours) == 1 and named in str(ours[0].message), [str(w.message) for w in record]
    assert ours[0].filename == __file__  # points at the caller's line


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trm_mode": "trm", "trm_delta_max": 0.5, "trm_delta_avg": None},
        {"trm_mode": "trm_exact", "trm_rollout_topk": 4, "trm_delta_kl": 1e-3, "trm_delta_avg": 0.02},
        {"trm_mode": "geo_mask", "trm_geo_low": 0.9, "trm_geo_high": 1.2, "trm_ratio_factor": False},
        {"trm_mode": "seq_tis", "trm_ratio_max": "auto", "trm_ratio_min": 0.5},
        {"trm_mode": "token_mis", "trm_ratio_min": 0.5, "trm_rollout_topk": 2, "trm_mask_policy": "generation"},
        {"trm_mode": "none", "trm_delta_max": DEFAULT_DELTA_MAX, "trm_nonfinite": "raise"},  # the default: not set
        {"trm_mode": "trm", "trm_target_accept_rate": 0.8, "trm_adapt_rate": 0.5},
    ],
    ids=["trm", "trm_exact", "geo_mask", "seq_tis", "token_mis", "none-default", "adaptive"],
)
def test_a_setting_the_mode_uses_is_not_warned_about(tmp_path, kwargs):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        TRMConfig(str(tmp_path), use_cpu=True, **kwargs)
    assert not _ours(record, " ignores ")


# ------------------------------------------------------------------------------- writes that cannot be half-done
def test_full_disk_mid_checkpoint_keeps_the_previous_one_whole_and_names_it(make_trainer, monkeypatch):
    trainer = make_trainer(max_steps=2, save_strategy="steps", save_steps=1)
    out = trainer.args.output_dir
    real = trainer._save_optimizer_and_scheduler

    def full_disk(output_dir):  # the model of checkpoint-2 is written, then the disk is full
        if trainer.state.global_step == 2:
            assert os.path.exists(os.path.join(output_dir, "model.safetensors"))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", full_disk)
    with pytest.raises(OSError) as err:
        trainer.train()
    good = os.path.join(out, "checkpoint-1")
    assert str(err.value) == (
        f"could not write {os.path.join(out, 'checkpoint-2')} (No space left on device): nothing of it was kept and "
        f"the last complete checkpoint is {good}; free space and resume from it (resume_from_checkpoint=True)."
    )
    assert type(err.value).__name__ == "CheckpointWriteError" and isinstance(err.value, RuntimeError)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1"]
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        assert os.path.exists(os.path.join(good, name)), name
    assert not os.listdir(os.path.join(out, ".trm-staging"))  # the half-written one is gone


def test_checkpoints_are_published_whole_and_rotated(make_trainer):
    trainer = make_trainer(max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer.train()
    out = trainer.args.output_dir
    assert sorted(n for n in os.listdir(out) if n.startswith(("checkpoint-", ".trm"))) == ["checkpoint-3"]
    with open(os.path.join(out, "checkpoint-3", "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 3


class _FullDiskFile:
    """A file whose writes stop half-way with ENOSPC."""

    def __init__(self, path, mode, **kwargs):
        self._f = open(path, mode, **kwargs)  # noqa: SIM115

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def seek(self, *a):
        return self._f.seek(*a)

    def truncate(self, size):
        return self._f.truncate(size)

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def _record(step):
    return {"step": step, "trm/accept_rate": 1.0}


def test_a_failed_stats_write_leaves_whole_lines_and_warns_once(tmp_path, monkeypatch):
    import trl_trm.callbacks as callbacks

    callback = callbacks.TRMStatsCallback(plot=False)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True, global_step=1)
    callback.on_log(args, state, None, logs=_record(1))
    monkeypatch.setattr(callbacks, "open", _FullDiskFile, raising=False)
    with pytest.warns(RuntimeWarning) as record:
        for step in (2, 3):
            state.global_step = step
            callback.on_log(args, state, None, logs=_record(step))
    assert len(_ours(record, "could not append the step-2 record")) == 1 and len(record) == 1
    lines = (tmp_path / "trm_stats.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]


def test_resume_drops_a_trailing_partial_stats_line_with_a_warning(tmp_path):
    from trl_trm.callbacks import TRMStatsCallback

    path = tmp_path / "trm_stats.jsonl"
    path.write_text(json.dumps(_record(1)) + "\n" + json.dumps(_record(2)) + "\n" + '{"step": 3, "trm/acc')
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True, global_step=2)
    with pytest.warns(RuntimeWarning, match="dropped 1 partial line"):
        TRMStatsCallback(plot=False).on_train_begin(args, state, None)
    assert path.read_text() == json.dumps(_record(1)) + "\n" + json.dumps(_record(2)) + "\n"
    assert not os.path.exists(f"{path}.tmp")
