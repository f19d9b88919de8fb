"""CUDA checks (marker `gpu`; `benchmarks/gpu_check.sh` runs them on a GPU machine): masking on CUDA equals CPU,
the fused-LM-head capture of `trm_exact` on CUDA (TRL's Triton head scores only the completion tokens) equals CPU,
the one-pass head (`trl_trm.head_pass`) equals TRL's Triton head (outputs and gradients, fp32 and bf16 autocast),
and a `trm_exact` training step on CUDA gives the CPU step's `trm/` metrics.

``TRM_GPU_TEST_DEVICE=cpu`` runs the same tests with "cpu" in place of "cuda" (CPU against CPU): the dry run of
gpu_check.sh uses it to check the test code itself on a machine without a GPU. It proves nothing about CUDA.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from trl_trm.masking import TRM_MODES, compute_trust_region_mask
from trl_trm.topk import head_logprobs_at

DEVICE = os.environ.get("TRM_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="needs a CUDA device (or TRM_GPU_TEST_DEVICE=cpu for a dry run of the test code)",
    ),
]


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 matmuls on CUDA (TF32 would round the LM head's inputs to 10 mantissa bits)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _inputs(batch, length, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    roll = -5.0 * torch.rand(batch, length, generator=gen)
    theta = roll + 0.05 * torch.randn(batch, length, generator=gen)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    kl = 1e-3 * torch.rand(batch, length, generator=gen)
    theta.view(-1)[torch.randint(0, batch * length, (3,), generator=gen)] = math.nan  # rejected, counted
    return theta.to(dtype), roll.to(dtype), mask, kl


@pytest.mark.parametrize("shape", [(64, 1024), (8, 40000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", TRM_MODES)
def test_masking_on_device_equals_cpu(mode, dtype, shape):
    theta, roll, mask, kl = _inputs(*shape, dtype)
    kwargs = {"mode": mode, "kl_tok": kl, "delta_kl": 9e-4, "delta_max": 0.15}
    cpu = compute_trust_region_mask(theta, roll, mask, **kwargs)
    kwargs["kl_tok"] = kl.to(DEVICE)
    dev = compute_trust_region_mask(theta.to(DEVICE), roll.to(DEVICE), mask.to(DEVICE), **kwargs)
    assert dev.weights.device.type == torch.device(DEVICE).type
    for name in ("keep", "length", "num_finite", "finite"):
        assert torch.equal(getattr(dev, name).cpu(), getattr(cpu, name)), name
    assert dev.rejected_by.keys() == cpu.rejected_by.keys()
    for name, value in cpu.rejected_by.items():
        assert torch.equal(dev.rejected_by[name].cpu(), value), name
    for name in ("weights", "log_ratio_abs_max", "k3_mean", "k3_max", "k1_mean", "geo_ratio", "seq_log_ratio"):
        torch.testing.assert_close(getattr(dev, name).cpu(), getattr(cpu, name), rtol=1e-6, atol=1e-6, msg=name)
    for name in ("token_weight_sum", "kl_tok_max", "kl_tok_sum"):
        torch.testing.assert_close(getattr(dev, name).cpu(), getattr(cpu, name), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_head_logprobs_on_device_equal_cpu(compute_dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=gen)
    weight = 0.2 * torch.randn(40000, 64, generator=gen)
    bias = 0.1 * torch.randn(40000, generator=gen)
    ids = torch.randint(0, 40000, (300, 21), generator=gen)
    kwargs = dict(temperature=0.7, logit_scale=1.3, final_logit_softcapping=30.0, compute_dtype=compute_dtype)
    cpu = head_logprobs_at(hidden, weight, bias, ids, **kwargs)
    dev = head_logprobs_at(hidden.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), ids.to(DEVICE), **kwargs)
    assert dev.device.type == torch.device(DEVICE).type and dev.dtype == torch.float32
    tol = 1e-5 if compute_dtype == torch.float32 else 2e-2  # bf16 matmuls accumulate differently
    torch.testing.assert_close(dev.cpu(), cpu, rtol=tol, atol=tol)
    assert bool((cpu < 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_head_on_device_equals_trl_head(dtype):
    """`trl_trm.head_pass.OnePassHead` against TRL's fused head on the device (Triton on CUDA): log-probs, entropies
    and the gradients of hidden states and weight, under autocast for bf16 as in training."""
    from trl.kernels import ChunkedLogProbFunction

    from trl_trm.head_pass import HeadExtras, OnePassHead

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(600, 64, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (0.2 * torch.randn(40000, 64, generator=gen)).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, 40000, (600,), generator=gen).to(DEVICE)
    extras = HeadExtras(torch.arange(0, 600, 7, device=DEVICE), torch.randint(0, 40000, (86, 21)).to(DEVICE))
    up = torch.randn(2, 600, generator=gen).to(DEVICE)
    outs, grads = [], []
    for head in ("trl", "ours"):
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype, enabled=dtype != torch.float32):
            args = (hidden, weight, None, targets, 0.7)
            if head == "trl":
                out = ChunkedLogProbFunction.apply(*args, 32768, None, 1.3, ("log_probs", "entropy"))
            else:
                out = OnePassHead.apply(*args, None, 1.3, ("log_probs", "entropy"), extras, None, None)
        outs.append(out[:2])
        grads.append(torch.autograd.grad((out[0] * up[0]).sum() + (out[1] * up[1]).sum(), [hidden, weight]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    for got, want in zip(grads[1], grads[0], strict=True):
        scale = float(want.float().abs().max())
        torch.testing.assert_close(
            got.float(), want.float(), rtol=0, atol=(1e-4 if dtype == torch.float32 else 2e-2) * scale
        )
    assert extras.values.device.type == torch.device(DEVICE).type and bool((extras.values < 0).all())


@pytest.mark.slow
def test_trm_exact_step_on_device_matches_cpu(tiny_model_dir, tmp_path):
    """One `trm_exact` step (top-k from a deterministic rollout_func) on the device and on CPU: the fused-head
    capture runs on the device (on CUDA TRL's head scores only the completion tokens, the capture's other layout)
    and every `trm/` metric, the loss and the gradient norm agree."""
    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import fsdp_step

    cpu = fsdp_step.run(tiny_model_dir, str(tmp_path / "cpu"), 8, mode="trm_exact", device="cpu")
    dev = fsdp_step.run(tiny_model_dir, str(tmp_path / "dev"), 8, mode="trm_exact", device=DEVICE)
    assert dev["capture_weights"] and all(w["type"] == "Parameter" for w in dev["capture_weights"])
    keys = sorted(k for k in cpu["log"] if k.startswith("trm/") and cpu["log"][k] is not None)
    assert "trm/kl_tok_max_lb/max" in keys and 0.0 < cpu["log"]["trm/accept_rate"] < 1.0
    for k in keys:
        assert math.isclose(cpu["log"][k], dev["log"][k], rel_tol=1e-4, abs_tol=1e-6), (
            k,
            cpu["log"][k],
            dev["log"][k],
        )
    assert math.isclose(cpu["log"]["loss"], dev["log"]["loss"], rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(cpu["log"]["grad_norm"], dev["log"]["grad_norm"], rel_tol=1e-3)
