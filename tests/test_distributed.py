"""Two processes (gloo, CPU) compute the same trm/ metrics as one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from trainer_kwargs import assert_same_step, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "dist_step.py"


def _run(nproc: int, model_dir: str, out: Path) -> dict:
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    cmd = torchrun(nproc)
    cmd += [str(SCRIPT), model_dir, str(out), "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process(tiny_model_dir, tmp_path):
    one = _run(1, tiny_model_dir, tmp_path / "one.json")
    two = _run(2, tiny_model_dir, tmp_path / "two.json")
    assert (one["world"], two["world"]) == (1, 2)
    # Same metrics and the same masked gradient: the masks are applied per rank consistently and normalised by the
    # global token count.
    keys = assert_same_step(one["log"], two["log"])
    assert "trm/accept_rate" in keys and 0.0 < one["log"]["trm/accept_rate"] < 1.0  # a mixed batch


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_train_on_two_processes_exits_cleanly(tmp_path):
    """`torchrun --nproc_per_node 2 -m trl_trm.cli train`: both ranks exit 0, only the main process writes."""
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = torchrun(2)
    cmd += ["-m", "trl_trm.cli", "train", "--config", str(Path(__file__).parent.parent / "recipes" / "demo.yaml")]
    cmd += ["--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trl-trm train: done") == 1  # accelerator.print: main process only
    records = [json.loads(line) for line in (out / "trm_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one writer
    assert all(0.0 <= r["trm/accept_rate"] <= 1.0 for r in records)
    assert (out / "model.safetensors").exists() and "## Trust Region Masking" in (out / "README.md").read_text()
