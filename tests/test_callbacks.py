"""TRMStatsCallback: JSONL records, the once-only low-accept warning, resume trimming, plot; `trl-trm plot`."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest

from trl_trm.callbacks import TRMStatsCallback
from trl_trm.cli import main
from trl_trm.plotting import load_history


def _state(step, zero=True):
    return SimpleNamespace(global_step=step, is_world_process_zero=zero)


def _args(tmp_path):
    return SimpleNamespace(output_dir=str(tmp_path), run_name="t")


def _log(cb, tmp_path, step, accept, zero=True):
    logs = {"reward": 0.1 * step, "loss": 1.0, "trm/accept_rate": accept, "trm/reject_rate/delta_max": 1 - accept}
    cb.on_log(_args(tmp_path), _state(step, zero), None, logs=logs)


def test_records_only_trm_logs_from_the_main_process(tmp_path):
    cb = TRMStatsCallback(accept_rate_floor=None)
    cb.on_train_begin(_args(tmp_path), _state(0), None)
    _log(cb, tmp_path, 1, 0.9)
    _log(cb, tmp_path, 2, 0.8, zero=False)  # another rank: nothing written
    cb.on_log(_args(tmp_path), _state(3), None, logs={"train_runtime": 1.0})  # no trm/ key: nothing written
    records = [json.loads(line) for line in (tmp_path / "trm_stats.jsonl").read_text().splitlines()]
    assert records == [
        {
            "step": 1,
            "reward": 0.1,
            "loss": 1.0,
            "trm/accept_rate": 0.9,
            "trm/reject_rate/delta_max": pytest.approx(0.1),
        }
    ]


def test_low_accept_rate_warns_once_after_patience_consecutive_logs(tmp_path):
    cb = TRMStatsCallback(accept_rate_floor=0.5, patience=3, plot=False)
    cb.on_train_begin(_args(tmp_path), _state(0), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, accept in enumerate([0.1, 0.2, 0.9, 0.1, 0.3], start=1):  # streak broken at step 3
            _log(cb, tmp_path, step, accept)
        assert not caught
        _log(cb, tmp_path, 6, 0.4)  # third low log in a row
        _log(cb, tmp_path, 7, 0.0)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "below 0.5 for 3 logs (last: 0.400)" in messages[0]


def test_resume_keeps_records_up_to_the_checkpoint(tmp_path):
    cb = TRMStatsCallback(plot=False)
    cb.on_train_begin(_args(tmp_path), _state(0), None)
    for step in range(1, 6):
        _log(cb, tmp_path, step, 0.9)
    resumed = TRMStatsCallback(plot=False)
    resumed.on_train_begin(_args(tmp_path), _state(3), None)  # resumed from checkpoint-3
    assert [r["step"] for r in load_history(str(tmp_path))[0]] == [1, 2, 3]
    fresh = TRMStatsCallback(plot=False)
    with pytest.warns(RuntimeWarning, match="moved to trm_stats.1.jsonl"):  # a new run in the same dir starts over
        fresh.on_train_begin(_args(tmp_path), _state(0), None)
    assert not (tmp_path / "trm_stats.jsonl").exists()  # the earlier run's records are kept, not truncated
    assert [json.loads(line)["step"] for line in (tmp_path / "trm_stats.1.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


def test_plot_at_train_end_and_redraw_from_jsonl_or_trainer_state(tmp_path, capsys):
    cb = TRMStatsCallback()
    cb.on_train_begin(_args(tmp_path), _state(0), None)
    for step in range(1, 5):
        _log(cb, tmp_path, step, 1.0 - 0.1 * step)
    cb.on_train_end(_args(tmp_path), _state(4), None)
    assert (tmp_path / "trm_stats.png").stat().st_size > 10_000

    state_dir = tmp_path / "from_state" / "checkpoint-4"
    state_dir.mkdir(parents=True)
    history = [{"step": s, "reward": 0.1 * s, "trm/accept_rate": 0.5} for s in (1, 2)] + [{"step": 2, "train_loss": 1}]
    (state_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert main(["plot", str(tmp_path / "from_state"), "--output", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert [r["step"] for r in load_history(str(tmp_path / "from_state"))[0]] == [1, 2]
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "No trm_stats.jsonl or trainer_state.json" in capsys.readouterr().err


def test_trainer_registers_the_callback_and_it_is_removable(make_trainer):
    trainer = make_trainer()
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TRMStatsCallback)]
    assert len(found) == 1 and found[0].accept_rate_floor == 0.5 and found[0].patience == 3
    trainer.remove_callback(TRMStatsCallback)
    assert not any(isinstance(cb, TRMStatsCallback) for cb in trainer.callback_handler.callbacks)
