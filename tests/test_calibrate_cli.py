"""`trl-trm calibrate` on the demo recipe: the report, `--json`, `--write` and their round trip, one-line errors, and the
same thresholds from 1 and 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from trainer_kwargs import one_error_line, torchrun

from trl_trm import cli
from trl_trm.calibrate_cli import split_flags
from trl_trm.recipe import parse_recipe

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One `trl-trm calibrate` run on the demo recipe: (stdout, report, written recipe path, output_dir)."""
    tmp = tmp_path_factory.mktemp("calibrate")
    out, report, written = tmp / "out", tmp / "report.json", tmp / "demo_calibrated.yaml"
    argv = ["calibrate", "--config", str(DEMO), "--output_dir", str(out), "--batches", "2"]
    argv += ["--target-accept", "0.9,0.5", "--json", str(report), "--write", str(written)]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.main(argv) == 0
    return buffer.getvalue(), json.loads(report.read_text()), written, out


def test_report_is_printed_and_saved(calibrated):
    stdout, report, _, out = calibrated
    assert report["mismatch"]["sequences"] == 2 * 16  # 2 generation batches of the demo's 16 completions
    assert report["batches"] == 2 and list(report["targets"]) == ["0.9", "0.5"]
    assert report["settings"]["trm_delta_max"] == 0.002  # the demo recipe's
    assert 0.0 < report["mismatch"]["k3"] < 1e-4  # bf16 autocast against the fp32 capture: a small mismatch
    for needle in ("Mismatch over 32 sequences", "| D_max |", "Accept rate at the recipe's thresholds", "Seq-TIS C*",
                   "Recommendation: trm_mode=", "| best | min of the above |", "Paste into the recipe:"):  # fmt: skip
        assert needle in stdout, needle
    assert not out.exists()  # the recipe's output_dir is not touched (the trainer ran in a scratch folder)


def test_written_recipe_keeps_the_recipe_and_sets_the_thresholds(calibrated):
    _, report, written, _ = calibrated
    update = report["recipe_update"]
    original = yaml.safe_load(DEMO.read_text())
    new = yaml.safe_load(written.read_text())
    assert new == {**original, **update}
    assert "# The offline demo" in written.read_text()  # comments kept
    _, config, _ = parse_recipe(["--config", str(written)])
    assert config.trm_mode == update["trm_mode"]
    for key, value in update.items():
        assert getattr(config, key) == value, key


def test_json_round_trips_into_write(calibrated, tmp_path):
    _, _, written, _ = calibrated
    report_path = written.parent / "report.json"
    again = tmp_path / "again.yaml"
    argv = ["calibrate", "--from_json", str(report_path), "--config", str(DEMO), "--write", str(again)]
    assert cli.main(argv) == 0
    assert again.read_text() == written.read_text()


def test_flag_spellings_and_defaults():
    opts, rest = split_flags(["--config", "r.yaml", "--target_accept", "0.8", "--batches", "3", "--seed", "1"])
    assert (opts.targets, opts.batches, rest) == ((0.8,), 3, ["--config", "r.yaml", "--seed", "1"])
    opts, _ = split_flags(["--target-accept", "0.5,0.99"])
    assert opts.targets == (0.5, 0.99) and opts.batches == 4


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--config", str(DEMO), "--target_accept", "0,5"], "`--target_accept` takes comma-separated numbers"),
        (["--config", str(DEMO), "--batches", "0"], "`--batches` must be >= 1"),
        (["--from_json", "x.json", "--config", str(DEMO)], "give `--write RECIPE_OUT.yaml` too"),
        (["--write", "x.yaml"], "`--write` copies the recipe given with `--config`"),
        (["--config", str(DEMO), "--trm_mod", "trm"], "Unknown command-line flags"),
        (["--config", str(DEMO), "--num_processes", "2"], "does not launch processes"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, match):
    assert cli.main(["calibrate", *argv]) == 2
    assert match in one_error_line(capsys)


def _calibrate_processes(nproc: int, out: Path) -> dict:
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    cmd = torchrun(nproc) + [str(Path(__file__).parent / "scripts" / "dist_calibrate.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.distributed
def test_one_and_two_processes_give_the_same_thresholds(tmp_path):
    """The demo recipe (model, task, settings) with a deterministic bf16 engine against the fp32 trainer
    (tests/scripts/dist_calibrate.py): the same global batch on 1 and 2 processes gives the same thresholds."""
    one = _calibrate_processes(1, tmp_path / "one.json")
    two = _calibrate_processes(2, tmp_path / "two.json")
    assert (one["world"], two["world"]) == (1, 2)
    assert one["mismatch"]["sequences"] == two["mismatch"]["sequences"] == 32
    assert one["mismatch"]["k3"] > 0
    for target, row in one["targets"].items():
        for mode, entry in row.items():
            if mode == "trm_exact":  # no rollout top-k here
                assert "trm_rollout_topk" in entry["reason"]
                continue
            for key, value in entry["thresholds"].items():
                other = two["targets"][target][mode]["thresholds"][key]
                assert other == pytest.approx(value, rel=1e-5, abs=1e-12), (target, mode, key)
            assert two["targets"][target][mode]["accept"] == entry["accept"]
