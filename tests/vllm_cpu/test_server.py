"""TRMTrainer in vLLM server mode against a real vLLM server on CPU (started by tests/vllm_cpu/serve_cpu.py).

What runs for real: the server (bf16, `--logprobs-mode processed_logprobs --max-logprobs 4`), its `/server_info`,
which `trl_trm.vllm_checks.check_trainer_engine` reads at start-up, and generation through TRL's `VLLMClient` (HTTP, TRL's own
log-prob parsing) feeding TRM's mask.

What cannot run on CPU, and is stubbed here: TRL's weight sync to a server. `VLLMClient.init_communicator` (called
when the trainer is built) raises `NotImplementedError: Weight synchronization runs on vLLM's NCCL weight-transfer
engine, which needs a CUDA device, got 'cpu'`, and `sync_weights` streams over that NCCL group. Both are replaced by
no-ops, so the server keeps the initial weights while the trainer trains: from the second step on, the rollouts are
stale, and the tests use that as a second, larger mismatch that TRM must see.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from vllm_spies import MaskInputSpy, length_reward, logs, rows, vllm_config_kwargs

pytestmark = pytest.mark.vllm

MAX_LOGPROBS = 4
STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    """A vLLM server on 127.0.0.1 serving the tiny model; stopped (SIGTERM, then SIGKILL) after the module."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine in its own processes
    command = [
        sys.executable,
        str(Path(__file__).with_name("serve_cpu.py")),
        "--model",
        tiny_model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "128",
        "--enforce-eager",  # no compilation: faster start-up
        "--logprobs-mode",
        "processed_logprobs",
        "--max-logprobs",
        str(MAX_LOGPROBS),
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-4000:]
                pytest.fail(f"vLLM server did not come up (exit code {proc.poll()}); log tail:\n{tail}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine/worker processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def no_cpu_weight_sync(monkeypatch):
    """Stub TRL's NCCL weight sync, which needs CUDA (see the module docstring). Returns the list of skipped syncs."""
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    skipped = []
    monkeypatch.setattr(VLLMClient, "init_communicator", lambda self, device: None)
    monkeypatch.setattr(VLLMGeneration, "sync_weights", lambda self: skipped.append(1))
    return skipped


@pytest.fixture
def server_trainer(vllm_server, no_cpu_weight_sync, tiny_model_dir, toy_dataset, tmp_path):
    from trl_trm import TRMConfig, TRMTrainer

    def _make(**overrides):
        kwargs = dict(vllm_mode="server", vllm_server_base_url=vllm_server, vllm_server_timeout=30)
        kwargs.update(overrides)
        args = TRMConfig(**vllm_config_kwargs(tmp_path / "out", **kwargs))
        return TRMTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=toy_dataset)

    return _make


def test_real_server_info_is_what_the_startup_check_reads(vllm_server):
    from trl.generation.vllm_client import VLLMClient

    info = VLLMClient(base_url=vllm_server).get_server_info()
    assert info["model_config"]["logprobs_mode"] == "processed_logprobs"
    assert info["model_config"]["max_logprobs"] == MAX_LOGPROBS


def test_startup_check_against_real_server(server_trainer):
    # k = 0 (sampled token only) and k = max_logprobs are served; k > max_logprobs is refused at start-up, naming
    # the flag to restart the server with.
    assert server_trainer().vllm_generation.logprobs == 0
    assert server_trainer(trm_rollout_topk=MAX_LOGPROBS).vllm_generation.logprobs == MAX_LOGPROBS
    with pytest.raises(ValueError, match=f"--max-logprobs {MAX_LOGPROBS + 1}"):
        server_trainer(trm_rollout_topk=MAX_LOGPROBS + 1)


def test_server_mode_training_sees_bf16_then_staleness(server_trainer, no_cpu_weight_sync):
    from trl.generation.vllm_client import VLLMClient

    trainer = server_trainer(max_steps=2)
    client = trainer.vllm_generation.vllm_client
    returned = []
    original = VLLMClient.generate

    def spy(*args, **kwargs):
        out = original(client, *args, **kwargs)
        returned.append(out)
        return out

    client.generate = spy
    mask_spy = MaskInputSpy(trainer)
    trainer.train()
    assert len(no_cpu_weight_sync) == 2  # TRL tried to sync before each generation
    # The mask's rollout log-probs are the server's, as parsed by TRL's client.
    served = {
        tuple(ids): [lp[0] for lp in lps]
        for out in returned
        for ids, lps in zip(out["completion_ids"], out["logprobs"], strict=True)
    }
    per_step = []
    for batch in mask_spy.batches:
        deltas = []
        for ids, theta, roll in rows(batch):
            assert torch.equal(roll, torch.tensor(served[ids], dtype=torch.float32))
            deltas.append((theta - roll).abs())
        per_step.append(float(torch.cat(deltas).mean()))
    history = [h for h in trainer.state.log_history if "loss" in h]
    print(f"[vllm-server] mean |dlogp| step 1 (bf16 only) = {per_step[0]:.3e}, step 2 (+ stale) = {per_step[1]:.3e}")
    # Step 1: same weights, bf16 server vs fp32 trainer. Step 2: the trainer moved (lr 1e-2), the server did not.
    assert 1e-6 < per_step[0] < 5e-3
    assert per_step[1] > 10 * per_step[0]
    d_max = logs(trainer, "trm/log_ratio_abs_max/mean")
    assert d_max[1] > 10 * d_max[0] > 0
    assert all(math.isfinite(h["loss"]) for h in history)


def test_trm_exact_with_real_server_topk(server_trainer):
    # trm_exact with k = 4 top log-probs from the real server: the per-token KL (a lower bound from the top-4 plus
    # a rest bucket) is logged and finite; it is tiny at step 1 (bf16 only) and accepted at a permissive δ_kl.
    trainer = server_trainer(trm_mode="trm_exact", trm_rollout_topk=MAX_LOGPROBS, trm_delta_kl=1.0, max_steps=1)
    trainer.train()
    (h,) = [h for h in trainer.state.log_history if "loss" in h]
    kl_keys = [k for k in h if k.startswith("trm/kl_tok_max")]
    assert kl_keys, f"no trm/kl_tok_max* metric in {sorted(k for k in h if k.startswith('trm/'))}"
    values = [h[k] for k in kl_keys]
    assert all(math.isfinite(v) and 0 <= v < 1e-2 for v in values)
    assert h["trm/accept_rate"] == 1.0
