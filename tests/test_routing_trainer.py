"""`trm_routing_replay` and `trm/routing_disagree_frac` in `TRMTrainer` on a tiny Qwen3-MoE built locally."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from trainer_kwargs import base_config_kwargs, length_reward

from trl_trm import routing
from trl_trm.modes import TRM_MODES


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from trl_trm.tiny import save_tiny_moe_model

    return save_tiny_moe_model(tmp_path_factory.mktemp("tiny-qwen3-moe"))


def _trainer(moe_dir, toy_dataset, tmp_path, peft_config=None, rollout_func=None, **overrides):
    from trl_trm import TRMConfig, TRMTrainer

    kwargs = base_config_kwargs(tmp_path / "out", **{"bf16": False, "max_steps": 1, **overrides})
    return TRMTrainer(
        model=moe_dir,
        reward_funcs=length_reward,
        args=TRMConfig(**kwargs),
        train_dataset=toy_dataset,
        peft_config=peft_config,
        rollout_func=rollout_func,
    )


def _spy_batches(trainer) -> list[dict]:
    """Records the generated batches (`_generate_and_score_completions`' outputs)."""
    seen, original = [], trainer._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        seen.append(out)
        return out

    trainer._generate_and_score_completions = spy
    return seen


@pytest.mark.parametrize("mode", TRM_MODES)
def test_replay_composes_with_every_mode(moe_dir, toy_dataset, tmp_path, mode):
    """Identical engines (fp32 generation and training): every completion token's routing agrees, with replay on, in
    every `trm_mode`; the routes travel with the batch as (B, P + C, L, k) int16."""
    extra = {"trm_rollout_topk": 4} if mode == "trm_exact" else {}
    trainer = _trainer(moe_dir, toy_dataset, tmp_path, trm_mode=mode, trm_routing_replay=True, **extra)
    batches = _spy_batches(trainer)
    trainer.train()
    routes = batches[0][routing.ROUTES_KEY]
    prompt, completion = batches[0]["prompt_ids"], batches[0]["completion_ids"]
    assert routes.dtype == torch.int16
    assert routes.shape == (prompt.size(0), prompt.size(1) + completion.size(1), 2, 2)
    logs = [log for log in trainer.state.log_history if "trm/routing_disagree_frac" in log]
    assert logs and logs[0]["trm/routing_disagree_frac"] == 0.0
    assert logs[0]["trm/routing_disagree_frac/layer_1"] == 0.0


def test_disagreement_is_measured_without_replay_and_written_to_the_jsonl(moe_dir, toy_dataset, tmp_path):
    """Without replay the training forward's routes are still compared; under bf16 autocast (training) against fp32
    generation some differ. The per-layer fractions are in trm_stats.jsonl, and no layer exceeds the any-layer one."""
    import json

    trainer = _trainer(moe_dir, toy_dataset, tmp_path, bf16=True, max_steps=2, trm_mode="none")
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "out" / "trm_stats.jsonl")]
    assert records and all("trm/routing_disagree_frac" in r for r in records)
    for r in records:
        layers = [r[f"trm/routing_disagree_frac/layer_{i}"] for i in range(2)]
        assert 0.0 <= max(layers) <= r["trm/routing_disagree_frac"] <= sum(layers) + 1e-12


def test_replay_with_lora(moe_dir, toy_dataset, tmp_path):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(moe_dir, toy_dataset, tmp_path, peft_config=peft_config, trm_routing_replay=True)
    assert len(trainer._trm_routing.forcer.routers) == 2  # found inside the PEFT wrapper
    trainer.train()
    logs = [log for log in trainer.state.log_history if "trm/routing_disagree_frac" in log]
    assert logs and logs[0]["trm/routing_disagree_frac"] == 0.0


def test_replay_refused_with_a_rollout_func_and_on_a_dense_model(moe_dir, tiny_model_dir, toy_dataset, tmp_path):
    def rollout_func(prompts, trainer):  # never called: refused at start-up
        raise AssertionError

    with pytest.raises(ValueError, match="`rollout_func` returns no routed experts"):
        _trainer(moe_dir, toy_dataset, tmp_path, rollout_func=rollout_func, trm_routing_replay=True)
    with pytest.raises(ValueError, match=r"no `\*TopKRouter` module"):
        _trainer(tiny_model_dir, toy_dataset, tmp_path, trm_routing_replay=True)


def _fake(model, **attrs):
    defaults = dict(
        use_vllm=False,
        rollout_func=None,
        use_transformers_continuous_batching=False,
        tools=None,
        environment_factories=None,
        args=SimpleNamespace(trm_routing_replay=True),
        model=model,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        add_callback=lambda callback: None,
    )
    return SimpleNamespace(**{**defaults, **attrs})


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        (dict(use_vllm=True), "TRL's vLLM generation does not return the experts"),
        (dict(use_transformers_continuous_batching=True), "transformers continuous batching"),
        (dict(tools=[len]), "tool / environment turns"),
        (dict(environment_factories={"e": object}), "tool / environment turns"),
    ],
)
def test_replay_refused_by_name_where_routes_are_not_recorded(attrs, reason):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=2,
        )
    )
    with pytest.raises(ValueError, match="`trm_routing_replay=True` cannot take effect: " + reason):
        routing.check_routing_setup(_fake(model, **attrs))
    assert routing.check_routing_setup(_fake(model, **attrs, args=SimpleNamespace(trm_routing_replay=False))) is None
    assert routing.check_routing_setup(_fake(model)).forcer.replay


def test_replay_option_must_be_a_bool(tmp_path):
    from trl_trm import TRMConfig

    with pytest.raises(ValueError, match="`trm_routing_replay` must be True or False"):
        TRMConfig(**base_config_kwargs(tmp_path, trm_routing_replay="yes"))


def test_routes_stay_aligned_across_micro_batches_and_checkpointing(moe_dir, toy_dataset, tmp_path):
    """A generation batch split into shuffled micro-batches (`steps_per_generation=2`, gradient accumulation), under
    gradient checkpointing: each row's routes travel with it, so identical engines still agree on every token (a
    misaligned row would disagree)."""
    trainer = _trainer(
        moe_dir,
        toy_dataset,
        tmp_path,
        trm_routing_replay=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        gradient_checkpointing=True,
        max_steps=2,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "trm/routing_disagree_frac" in log]
    assert len(logs) == 2 and all(log["trm/routing_disagree_frac"] == 0.0 for log in logs)


@pytest.mark.parametrize(
    "settings",
    [
        {"trm_mask_policy": "generation"},
        {"trm_old_policy": "rollout", "num_iterations": 2},
        {"num_iterations": 2},  # TRL's old-log-prob forward runs inside generation, armed with the pending routes
    ],
    ids=["mask-at-generation", "bypass", "old-forward"],
)
def test_replay_with_the_forwards_inside_generation(moe_dir, toy_dataset, tmp_path, settings):
    """The forwards run inside generation (TRL's old log-probs, the generation-time mask) are armed with the batch's
    routes (a size mismatch would raise). The first step is on-policy: identical engines agree on every token. With
    `num_iterations=2` the second step reuses the batch after an update, so its routes may legitimately differ."""
    trainer = _trainer(moe_dir, toy_dataset, tmp_path, trm_routing_replay=True, max_steps=2, **settings)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "trm/routing_disagree_frac" in log]
    assert len(logs) == 2 and logs[0]["trm/routing_disagree_frac"] == 0.0
    if "num_iterations" not in settings:
        assert logs[1]["trm/routing_disagree_frac"] == 0.0


def test_forcer_is_disarmed_after_training_so_later_forwards_route_freely(moe_dir, toy_dataset, tmp_path):
    """The forcer stays armed after a loss forward (the backward's recomputation needs it) but not past the step: after
    `train()` a forward of the model outside the trainer routes by its own router, as with the hooks removed."""
    trainer = _trainer(moe_dir, toy_dataset, tmp_path, trm_routing_replay=True)
    trainer.train()
    forcer = trainer._trm_routing.forcer
    assert forcer._routes is None
    model = trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.tensor([[3, 5, 7, 9, 11, 4]])
    with torch.no_grad():
        hooked = model(ids).logits
        forcer.remove()
        free = model(ids).logits
    assert torch.equal(hooked, free)


def test_replay_refuses_generation_without_the_kv_cache(moe_dir, toy_dataset, tmp_path):
    """`use_cache=False` re-runs the whole sequence at every decode step: the recorded routes cannot be laid out per
    token, and replay would force the wrong experts. Refused with the reason; without replay only the metric is
    missing."""
    trainer = _trainer(moe_dir, toy_dataset, tmp_path, trm_routing_replay=True, generation_kwargs={"use_cache": False})
    with pytest.raises(ValueError, match="use_cache=False"):
        trainer.train()
    trainer = _trainer(moe_dir, toy_dataset, tmp_path / "b", generation_kwargs={"use_cache": False})
    trainer.train()
    assert not any("trm/routing_disagree_frac" in log for log in trainer.state.log_history)
