"""The `trl-trm` command line: bounds table, demo, and clear errors."""

from __future__ import annotations

import math

import pytest

from trl_trm.cli import main
from trl_trm.demo import summarize


def test_bounds_prints_the_talk_example(capsys):
    assert main(["bounds", "--length", "4096", "--kl-tok-max", "1e-4", "--kl-seq", "0.01"]) == 0
    out = capsys.readouterr().out
    trpo, pm, mixed = 4096 * 4095 * 1e-4, 4 / 3 * 4096**1.5 * 1e-4, 2 * 4096 * math.sqrt(1e-4 * 0.01)
    assert f"{trpo:.4g}" in out and f"{pm:.4g}" in out and f"{mixed:.4g}" in out  # 1677, 34.95, 8.192
    assert "Mixed" in out and "Pinsker-Marginal" in out


def test_bounds_without_kl_seq_has_no_mixed_row(capsys):
    assert main(["bounds", "--length", "100", "--kl_tok_max", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "Mixed" not in out and f"{100 * 99 * 1e-3:.4g}" in out


def test_bad_values_give_one_clear_line(capsys):
    assert main(["bounds", "--length", "10", "--kl-tok-max", "-1"]) == 2
    err = capsys.readouterr().err
    assert "kl_tok_max" in err and "Traceback" not in err


def test_unknown_command_prints_usage(capsys):
    assert main(["trian"]) == 2
    assert "usage: trl-trm" in capsys.readouterr().err


def test_demo_rejects_everything_with_a_tight_threshold(tmp_path, capsys):
    argv = ["demo", "--output_dir", str(tmp_path), "--max_steps", "4", "--logging_steps", "2"]
    with pytest.warns(RuntimeWarning, match="accept_rate has stayed below"):
        assert main([*argv, "--trm_delta_max", "1e-9", "--trm_accept_rate_patience", "1"]) == 0
    out = capsys.readouterr().out
    # A sequence whose every token is computed bit-identically by both engines has log rho = 0 exactly and passes any
    # threshold (transformers 5.24 on CPU: most tokens agree to float32 rounding): "everything" is nearly everything.
    accept = float(out.split("trm/accept_rate (mean over logs): ")[1].split()[0])
    assert accept < 0.25
    assert "criterion rejecting most: delta_max (mean reject rate" in out
    assert out.count("step ") == 2 and "reward" in out  # one progress line per log
    assert (tmp_path / "trm_stats.png").exists() and (tmp_path / "model.safetensors").exists()


def test_demo_summary_from_log_history():
    history = [
        {"step": 1, "reward": 0.1, "trm/accept_rate": 1.0, "trm/reject_rate/delta_max": 0.0},
        {
            "step": 2,
            "reward": 0.2,
            "trm/accept_rate": 0.5,
            "trm/reject_rate/delta_max": 0.25,
            "trm/reject_rate/delta_avg": 0.5,
        },
        {"step": 3, "loss": 1.0},
        {"step": 4, "reward": 0.5, "trm/accept_rate": 0.9, "trm/reject_rate/delta_max": 0.1},
        {"step": 5, "reward": 0.7, "trm/accept_rate": 0.8, "trm/reject_rate/delta_max": 0.2},
    ]
    summary = summarize(history, window=2)
    assert summary["reward_start"] == pytest.approx(0.15) and summary["reward_end"] == pytest.approx(0.6)
    assert summary["accept_rate_mean"] == pytest.approx(0.8)
    assert summary["top_rejecting_criterion"] == "delta_avg"  # mean 0.5 over the logs that report it
    assert summary["reject_rate_mean"]["delta_max"] == pytest.approx(0.1375)
