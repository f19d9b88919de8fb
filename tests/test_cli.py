"""The `trl-trm` command line: bounds table, demo, and clear errors."""

from __future__ import annotations

import math

from trl_trm.cli import main


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


def test_demo_runs_offline_and_rejects_with_a_tight_threshold(tmp_path, capsys):
    assert main(["demo", "--output_dir", str(tmp_path), "--max_steps", "5", "--trm_delta_max", "1e-9"]) == 0
    out = capsys.readouterr().out
    assert "trm/accept_rate (mean over logs): 0.000" in out
    assert "criterion rejecting most (last log): delta_max (1.000)" in out
