"""The MoE aux loss over kept tokens (trl_trm/moe.py) on a tiny Qwen3-MoE built locally."""

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from trl_trm import moe


@pytest.fixture
def tiny_moe():
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    return Qwen3MoeForCausalLM(cfg)


def _aux(model, ids, am, weights):
    with moe.RouterLogitsCapture(model) as cap:
        out = model(input_ids=ids, attention_mask=am, output_router_logits=True)
    return out, moe.masked_aux_loss(cap, model.config, am, weights, None)


def test_all_accepted_equals_architecture_aux_loss(tiny_moe):
    ids = torch.randint(0, 64, (3, 10))
    am = torch.ones(3, 10, dtype=torch.long)
    am[0, :2] = 0
    out, loss = _aux(tiny_moe, ids, am, torch.ones(3, 6))
    assert torch.allclose(loss, out.aux_loss, atol=1e-6)


def test_rejected_row_puts_no_gradient_on_router(tiny_moe):
    ids = torch.randint(0, 64, (3, 10))
    am = torch.ones(3, 10, dtype=torch.long)
    w = torch.ones(3, 6)
    w[2] = 0.0
    _, loss = _aux(tiny_moe, ids, am, w)
    grads_with = torch.autograd.grad(loss, [r.weight for r in moe.router_modules(tiny_moe)])
    _, loss2 = _aux(tiny_moe, ids[:2], am[:2], w[:2])
    grads_without = torch.autograd.grad(loss2, [r.weight for r in moe.router_modules(tiny_moe)])
    for g1, g2 in zip(grads_with, grads_without, strict=True):
        assert g1.abs().sum() > 0
        assert torch.allclose(g1, g2, atol=1e-6)


def test_gpt_oss_router_all_accepted_equals_architecture_aux_loss():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        layer_types=["full_attention", "full_attention"],
    )
    model = GptOssForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8))
    am = torch.ones(2, 8, dtype=torch.long)
    out, loss = _aux(model, ids, am, torch.ones(2, 4))
    assert len(moe.router_modules(model)) == 2
    assert torch.allclose(loss, out.aux_loss, atol=1e-6)
