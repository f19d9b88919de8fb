"""Offline equivalents of the MoE training rows of TRL's own `tests/test_grpo_trainer.py` (`test_train` with
`tiny-Qwen3MoeForCausalLM` and `tiny-GptOssForCausalLM`), run against `TRMTrainer` in `trm` mode. TRL's rows load
their tiny models from the Hub, which is not reachable here: these build tiny models of the same architectures
locally, with the tiny tokenizer of `trl_trm.tiny`, and make TRL's assertions (a training loss, the MoE aux loss
logged, the parameters changed), plus the same with routing replay."""

from __future__ import annotations

import pytest
import torch
from trainer_kwargs import base_config_kwargs, length_reward

pytestmark = pytest.mark.slow


def _model(arch: str, vocab: int, pad: int, eos: int):
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts_per_tok=2,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=None,
        output_router_logits=True,  # TRL's Hub models enable the aux loss; TRL then adds it (`aux_loss_enabled`)
        router_aux_loss_coef=0.01,
    )
    torch.manual_seed(0)
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=16)
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.GptOssConfig(**common, num_local_experts=4, layer_types=["full_attention"] * 2)
        model = transformers.GptOssForCausalLM(config)
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    return model


@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_train_moe_in_trm_mode(arch, replay, toy_dataset, tmp_path):
    from trl_trm import TRMConfig, TRMTrainer
    from trl_trm.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = _model(arch, len(tok), tok.pad_token_id, tok.eos_token_id)
    args = TRMConfig(
        **base_config_kwargs(
            tmp_path / "out",
            learning_rate=0.1,
            per_device_train_batch_size=3,
            num_generations=3,
            max_completion_length=8,
            max_steps=2,
            trm_mode="trm",
            trm_delta_max=10.0,  # TRL's row checks that every parameter moved: accept every sequence
            trm_delta_avg=1.0,
            trm_routing_replay=replay,
        )
    )
    trainer = TRMTrainer(
        model=model, reward_funcs=length_reward, args=args, train_dataset=toy_dataset, processing_class=tok
    )
    assert trainer.aux_loss_enabled
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert any("aux_loss" in log and log["aux_loss"] is not None for log in trainer.state.log_history)
    assert any("trm/routing_disagree_frac" in log for log in trainer.state.log_history)
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(before[n], p)]
    assert unchanged == [], f"parameters that did not change: {unchanged}"
