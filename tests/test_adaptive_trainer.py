"""Adaptive thresholds inside TRMTrainer: the controller moves the thresholds, and survives checkpoint resume."""

from __future__ import annotations

import math

import pytest


def _logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_thresholds_follow_the_controller(make_trainer):
    # Everything is rejected at 1e-9, the target is 1: each optimizer step scales delta_max by exp(0.1 * (1 - 0)).
    trainer = make_trainer(trm_delta_max=1e-9, trm_delta_avg=None, trm_target_accept_rate=1.0, max_steps=3)
    trainer.train()
    assert _logs(trainer, "trm/accept_rate") == [0.0, 0.0, 0.0]
    used = _logs(trainer, "trm/delta_max")
    expected = [1e-9 * math.exp(0.1 * k) for k in range(3)]
    assert used == pytest.approx(expected, rel=1e-9)
    assert trainer._trm_adaptive.scale == pytest.approx(math.exp(0.3), rel=1e-12)


def test_adaptive_needs_trm_mode(make_trainer):
    with pytest.raises(ValueError, match="trm_target_accept_rate"):
        make_trainer(trm_mode="seq_mis", trm_target_accept_rate=0.9)
    with pytest.raises(ValueError, match="trm_adapt_rate"):
        make_trainer(trm_target_accept_rate=0.9, trm_adapt_rate=-1.0)


def test_resume_continues_with_the_same_thresholds(make_trainer, tmp_path):
    settings = dict(
        trm_delta_max=1.5e-3,
        trm_delta_avg=None,
        trm_target_accept_rate=0.9,
        trm_adapt_rate=2.0,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        bf16=True,
    )
    full = make_trainer(output_dir=str(tmp_path / "full"), **settings)
    full.train()
    resumed = make_trainer(output_dir=str(tmp_path / "resumed"), **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    def by_step(trainer, key):
        return {h["step"]: h[key] for h in trainer.state.log_history if key in h}

    full_delta, resumed_delta = by_step(full, "trm/delta_max"), by_step(resumed, "trm/delta_max")
    assert {3, 4} <= set(resumed_delta)  # steps 1-2 come back with the checkpoint's trainer_state.json
    assert full_delta[3] != settings["trm_delta_max"]  # the controller had moved: restoring it is what is tested
    for step in (3, 4):
        assert resumed_delta[step] == pytest.approx(full_delta[step], rel=1e-12)
        for key in ("trm/accept_rate", "trm/log_ratio_abs_max/max", "reward"):
            assert by_step(resumed, key)[step] == pytest.approx(by_step(full, key)[step], rel=1e-6), (key, step)
