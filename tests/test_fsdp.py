"""FSDP2 (`fully_shard` through Accelerate's FSDP plugin) on 2 CPU processes (gloo): same `trm/` metrics, loss and
gradient norm as one unsharded process on the same global batch, for `trm` and `trm_exact`, full fine-tuning and
LoRA; the saved model loads and equals the one-process model. See docs/distributed.md.

Accelerate 1.15 does not enable its FSDP plugin for CPU processes (the run silently becomes DDP, tested below), so
the 2-process script applies a narrow, named workaround (`fsdp_step.allow_fsdp_on_cpu`); the sharding itself is
PyTorch's and Accelerate's own code, not a mock: the parameters are DTensor shards (checked).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_kwargs import assert_same_step

SCRIPTS = Path(__file__).parent / "scripts"
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in trl 1.16
sys.path.insert(0, str(SCRIPTS))


def _torchrun(nproc: int, args: list[str], timeout: int = 240, expect_error: str | None = None) -> dict:
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port (see test_distributed.py)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    proc = subprocess.run(
        cmd + [str(SCRIPTS / "fsdp_step.py"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if expect_error is not None:
        assert proc.returncode != 0 and expect_error in proc.stderr, proc.stderr[-4000:]
        return {}
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(Path(args[1]).read_text())


def _one_process(model_dir: str, out: Path, mode: str, peft: bool) -> dict:
    """The reference: the same script's step in this process, unsharded, the whole global batch (8) on one rank."""
    import fsdp_step

    return fsdp_step.run(model_dir, str(out), 8, mode=mode, peft=peft, save=True)


def _state_dict(path: Path, peft: bool, base_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    if peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(path))
        return {k: v for k, v in model.state_dict().items() if "lora_" in k}
    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


CASES = [("trm", False), ("trm_exact", False), ("trm", True), ("trm_exact", True)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("mode", "peft"), CASES, ids=[f"{m}-{'lora' if p else 'full'}" for m, p in CASES])
def test_fsdp2_two_processes_match_one_process(mode, peft, tiny_model_dir, tmp_path):
    flags = ["--fsdp", "--mode", mode, "--save"] + (["--peft"] if peft else [])
    two = _torchrun(2, [tiny_model_dir, str(tmp_path / "two.json"), "8", *flags])
    one = _one_process(tiny_model_dir, tmp_path / "one.json", mode, peft)

    # Really sharded by FSDP2: 2 decoder layers + the root are FSDP modules, parameters are DTensor shards.
    assert (one["world"], two["world"]) == (1, 2)
    assert two["distributed_type"] == "DistributedType.FSDP" and two["fsdp_modules"] >= 3
    vocab, hidden = one["head_weight_local_shape"]
    assert two["head_weight_type"] == "DTensor" and two["head_weight_local_shape"] == [vocab // 2, hidden]
    if mode == "trm_exact":
        # The fused-LM-head capture is handed the all-gathered head weight (FSDP2 unshards it for the forward),
        # not a DTensor shard: every call sees a plain (V, H) parameter.
        assert two["capture_weights"] and two["capture_weights"] == one["capture_weights"]
        assert all(w == {"type": "Parameter", "shape": [vocab, hidden]} for w in two["capture_weights"])
        assert "trm/kl_tok_max_lb/max" in two["log"]

    assert 0.0 < one["log"]["trm/accept_rate"] < 1.0  # a mixed batch: the mask matters
    assert_same_step(one["log"], two["log"])

    # The saved model (full state dict gathered from the shards; the adapter for LoRA) loads and equals the
    # one-process model after the same step, which differs from the initial weights.
    saved_two = _state_dict(tmp_path / "two.json.model", peft, tiny_model_dir)
    saved_one = _state_dict(tmp_path / "one.json.model", peft, tiny_model_dir)
    assert saved_two.keys() == saved_one.keys() and len(saved_two) > 0
    for name, value in saved_one.items():
        torch.testing.assert_close(saved_two[name], value, rtol=1e-5, atol=1e-6, msg=name)
    if peft:
        assert any(float(v.abs().max()) > 0 for k, v in saved_two.items() if "lora_B" in k)  # B starts at 0
    else:
        initial = _state_dict(Path(tiny_model_dir), False, tiny_model_dir)
        assert any(not torch.equal(initial[k], v) for k, v in saved_two.items())


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_ignores_fsdp_on_cpu_without_the_workaround(tiny_model_dir, tmp_path):
    """Documents why the workaround exists: accelerate 1.15 with `fsdp=True` on CPU processes would silently train
    with DDP, so TRMTrainer refuses it by name. If this starts failing, Accelerate supports FSDP on CPU: drop the
    patch (and the refusal)."""
    out = tmp_path / "plain.json"
    _torchrun(
        2,
        [tiny_model_dir, str(out), "8", "--fsdp", "--no-cpu-fsdp-workaround"],
        expect_error="has no effect here: Accelerate runs this job as DistributedType.MULTI_CPU",
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_routing_replay_on_a_tiny_moe(tmp_path):
    """`trm_routing_replay` under FSDP2 (2 processes): the hooks sit on the routers inside the sharded decoder layers,
    the routes recorded during generation are carried and replayed, and with identical fp32 engines every completion
    token's routing agrees."""
    from trl_trm.tiny import save_tiny_moe_model

    save_tiny_moe_model(tmp_path / "moe")
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    out = tmp_path / "two.json"
    script = [str(SCRIPTS / "fsdp_moe_replay.py"), str(tmp_path / "moe"), str(out)]
    proc = subprocess.run(cmd + script, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads(out.read_text())
    assert (two["world"], two["distributed_type"]) == (2, "DistributedType.FSDP")
    assert two["router_weight_type"] == "DTensor" and two["routers"] == 2
    assert two["log"]["trm/routing_disagree_frac"] == 0.0
