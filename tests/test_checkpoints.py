"""`trl_trm.checkpoints`: which checkpoint `resume_from_checkpoint` means (incomplete ones skipped with a warning),
and an earlier run in `output_dir` refused, or cleared with `overwrite_output_dir`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from trl_trm.checkpoints import RESUME_NONE, check_output_dir, earlier_run_files, resolve_checkpoint


def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")  # an empty, complete safetensors file
    state = json.dumps({"global_step": step})
    (path / "trainer_state.json").write_text(state if complete else state[:5])  # cut short by a full disk
    return path


def test_resolve_checkpoint(tmp_path):
    from trl_trm.checkpoints import resolve_checkpoint

    for name in ("checkpoint-2", "checkpoint-10"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")  # complete (see tests/test_cli_errors.py)
    assert resolve_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint(None, str(tmp_path)) is None and resolve_checkpoint("false", str(tmp_path)) is None
    assert resolve_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="is not a directory"):
        resolve_checkpoint(str(tmp_path / "nope"), str(tmp_path))


def test_resume_skips_an_incomplete_last_checkpoint_with_a_warning(tmp_path):
    from trl_trm.adaptive import STATE_FILE_NAME
    from trl_trm.checkpoints import resolve_checkpoint

    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, complete=False)
    with pytest.warns(RuntimeWarning, match=r"Skipping the incomplete checkpoint .*checkpoint-6 \(its trainer_state"):
        assert resolve_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / STATE_FILE_NAME).write_text('{"scale": 1.')  # truncated adaptive state
    (tmp_path / "checkpoint-2" / STATE_FILE_NAME).write_text('{"scale": 1.0}')
    with pytest.warns(RuntimeWarning, match="checkpoint-4 .its trm_adaptive_state.json is cut short"):
        assert resolve_checkpoint("true", str(tmp_path), need_adaptive=True) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="is incomplete .its trainer_state.json is cut short"):
        resolve_checkpoint(str(tmp_path / "checkpoint-6"), str(tmp_path))


@pytest.mark.parametrize("value", [*RESUME_NONE, "False", "NONE"])
def test_every_start_fresh_value_means_no_checkpoint(tmp_path, value):
    _checkpoint(tmp_path, 1)
    assert resolve_checkpoint(value, str(tmp_path)) is None


def test_resume_last_refuses_an_output_dir_without_a_complete_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"`resume_from_checkpoint: last` but .* holds no checkpoint-\* folder"):
        resolve_checkpoint("last", str(tmp_path))
    (tmp_path / "checkpoint-x").mkdir()  # not a step: ignored
    _checkpoint(tmp_path, 3, complete=False)
    with pytest.warns(RuntimeWarning, match="checkpoint-3"):
        with pytest.raises(ValueError, match=r"every checkpoint-\* folder in .* is incomplete"):
            resolve_checkpoint("true", str(tmp_path))


def test_an_earlier_run_is_refused_and_overwrite_clears_it(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out, 3)
    (out / "trm_stats.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    assert earlier_run_files(str(out)) == ["checkpoint-3", "trm_stats.jsonl"]
    assert earlier_run_files(str(tmp_path / "none")) == []
    config = SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None)
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint-3, trm_stats.jsonl\)"):
        check_output_dir(SimpleNamespace(overwrite_output_dir=False), config)
    check_output_dir(
        SimpleNamespace(overwrite_output_dir=False), SimpleNamespace(**{**vars(config), "resume_from_checkpoint": "x"})
    )
    check_output_dir(SimpleNamespace(overwrite_output_dir=True), config)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the run's files went, the user's stayed
