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


MALFORMED = '<tool_call>\n{"arguments": {"a": 3, "b": 4}}\n</tool_call>'  # TRL's malformed row: no tool name


def _moe_tool_model(call: str):
    """The bigram tool-calling model of tests/test_generation_features.py built as a tiny Qwen3-MoE (its aux loss on):
    attention and expert outputs zeroed, so the logits depend on the current token only, the routers still route.
    After the generation prompt it emits ``call`` (one added token) with p ~ 0.85, then `<|im_end|>`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from trl.chat_template_utils import qwen2_5_chat_template

    from trl_trm.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template
    tokenizer.add_tokens([call])
    call_id, eos_id = tokenizer.convert_tokens_to_ids(call), tokenizer.eos_token_id
    newline_id = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )[-1]
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=2048, tie_word_embeddings=False, output_router_logits=True,
        router_aux_loss_coef=0.01, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id, bos_token_id=None,
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
        normed = model.model.norm(model.model.embed_tokens.weight)  # (V, H)
        model.lm_head.weight.zero_()
        for src, dst in ((newline_id, call_id), (call_id, eos_id)):
            model.lm_head.weight[dst] = 8.0 * normed[src] / normed[src].pow(2).sum()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_id
    return model, tokenizer


@pytest.fixture(scope="module")
def moe_tool_model():
    from test_generation_features import CALL

    return _moe_tool_model(CALL)


def _moe_tool_trainer(model_and_tokenizer, tmp_path, env=False):
    from datasets import Dataset
    from test_generation_features import MultiplyEnv, multiply

    from trl_trm import TRMConfig, TRMTrainer

    model, tokenizer = model_and_tokenizer
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} times 4?"}]} for i in range(8)])
    config = base_config_kwargs(
        tmp_path / "out", bf16=False, max_completion_length=96, max_steps=1, trm_mode="trm", learning_rate=1e-3,
        max_tool_calling_iterations=1,
    )  # fmt: skip
    extra = {"environment_factory": MultiplyEnv} if env else {"tools": [multiply]}
    return TRMTrainer(
        model=fresh, reward_funcs=length_reward, args=TRMConfig(**config), train_dataset=dataset,
        processing_class=tokenizer, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("env", [False, True], ids=["tools", "environment_factory"])
def test_moe_tool_calling_in_trm_mode(moe_tool_model, env, tmp_path):
    """TRL's tool and environment rows use a tiny Qwen3-MoE: in `trm` mode it trains (router aux loss over kept
    tokens, not refused), every tool-calling turn's log-probs are recorded, and the routing metric is not logged
    (routes are not recorded across tool turns; docs/moe.md)."""
    trainer = _moe_tool_trainer(moe_tool_model, tmp_path, env)
    assert trainer.aux_loss_enabled
    trainer.train()
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert logs["tools/call_frequency"] > 0.5
    assert logs["trm/accept_rate"] == 1.0 and logs["trm/log_ratio_abs_max/max"] < 1e-4
    assert logs["aux_loss"] is not None and logs["aux_loss"] > 0
    assert "trm/routing_disagree_frac" not in logs


def test_moe_malformed_tool_calls_in_trm_mode(tmp_path):
    """TRL's malformed-tool-call row: the tiny Qwen3-MoE emits a tool call without a name; training goes on in `trm`
    mode (no tool runs), with the rollout log-probs recorded."""
    trainer = _moe_tool_trainer(_moe_tool_model(MALFORMED), tmp_path)
    trainer.train()
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert logs["train_loss"] is not None and logs["aux_loss"] > 0
    assert logs["trm/accept_rate"] == 1.0 and logs["trm/log_ratio_abs_max/max"] < 1e-4
    # Some completions are the malformed call then <|im_end|> (2 tokens); it is parsed as no call at all.
    assert logs["completions/min_length"] == 2 and logs["tools/call_frequency"] == 0.0
