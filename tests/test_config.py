"""Bad input gets a clear error naming the problem and the fix."""

from __future__ import annotations

import pytest
from trainer_kwargs import base_config_kwargs, length_reward


def _config(tmp_path, **overrides):
    from trl_trm import TRMConfig

    return TRMConfig(**base_config_kwargs(tmp_path, **overrides))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"trm_mode": "tmr"}, r"Unknown `trm_mode` 'tmr'"),
        ({"trm_mode": "trm_exact"}, r"needs `trm_rollout_topk >= 1`"),
        ({"trm_rollout_topk": -1}, r"`trm_rollout_topk` must be an integer >= 0"),
        ({"trm_mode": "trm_exact", "trm_rollout_topk": 5, "trm_delta_kl": 0.0}, r"`trm_delta_kl` must be a positive"),
        ({"trm_mode": "trm_exact", "trm_rollout_topk": 5, "trm_delta_kl": None}, r"needs `trm_delta_kl`"),
        ({"trm_delta_max": -0.1}, r"`trm_delta_max` must be a positive"),
        ({"trm_delta_avg": float("nan")}, r"`trm_delta_avg` must be a positive"),
        ({"trm_delta_max": None, "trm_delta_avg": None}, r"rejects nothing"),
        ({"trm_mode": "geo_mask", "trm_geo_low": 1.01, "trm_geo_high": 1.02}, r"band must contain 1"),
        ({"trm_mode": "seq_tis", "trm_ratio_max": None}, r"needs `trm_ratio_max`"),
        ({"trm_mask_policy": "stale"}, r"Unknown `trm_mask_policy`"),
        ({"trm_nonfinite": "ignore"}, r"Unknown `trm_nonfinite`"),
        ({"vllm_importance_sampling_correction": True}, r"two off-policy corrections"),
        ({"off_policy_mask_threshold": 0.5}, r"off_policy_mask_threshold"),
        ({"loss_type": "vespo"}, r"vespo"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **overrides)


def test_trm_exact_is_available_with_a_top_k(tmp_path):
    config = _config(tmp_path, trm_mode="trm_exact", trm_rollout_topk=20)
    assert (config.trm_mode, config.trm_rollout_topk, config.trm_delta_kl) == ("trm_exact", 20, 1e-4)
    assert _config(tmp_path).trm_rollout_topk == 0  # no top-k capture by default


def test_defaults_apply_exactly_one_correction(tmp_path):
    config = _config(tmp_path)
    assert config.trm_mode == "trm"
    assert config.vllm_importance_sampling_correction is False  # GRPOConfig defaults it to True
    # TRL's own correction is allowed when TRM only logs diagnostics
    assert _config(tmp_path, trm_mode="none", vllm_importance_sampling_correction=True).trm_mode == "none"


def test_trainer_rejects_a_plain_grpo_config(tiny_model_dir, toy_dataset, tmp_path):
    from trl import GRPOConfig

    from trl_trm import TRMTrainer

    args = GRPOConfig(**base_config_kwargs(tmp_path))
    with pytest.raises(TypeError, match="needs a `TRMConfig`"):
        TRMTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=toy_dataset)


def test_continuous_batching_without_logprobs_fails_at_startup(make_trainer):
    with pytest.raises(ValueError, match="continuous batching"):
        make_trainer(use_transformers_continuous_batching=True)


def _rollout_func(logprobs_for):
    def rollout_func(prompts, trainer):
        tok = trainer.processing_class
        prompt_ids = [tok(p)["input_ids"] for p in prompts]
        completion_ids = [tok(" 1 2 3")["input_ids"] + [tok.eos_token_id] for _ in prompts]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs_for(completion_ids)}

    return rollout_func


def test_rollout_func_without_logprobs_is_an_error(make_trainer):
    trainer = make_trainer(rollout_func=_rollout_func(lambda ids: None))
    with pytest.raises(ValueError, match=r"returned `logprobs=None`"):
        trainer.train()


def test_rollout_func_with_short_logprobs_is_an_error(make_trainer):
    trainer = make_trainer(rollout_func=_rollout_func(lambda ids: [[-1.0] * (len(c) - 1) for c in ids]))
    with pytest.raises(ValueError, match=r"has \d+ completion tokens but \d+ log-probs"):
        trainer.train()


def test_rollout_func_logprobs_are_used(make_trainer):
    # A rollout engine that reports log-prob -50 for every token: |log rho| is huge, so every sequence is rejected.
    trainer = make_trainer(rollout_func=_rollout_func(lambda ids: [[-50.0] * len(c) for c in ids]))
    trainer.train()
    accept = [h["trm/accept_rate"] for h in trainer.state.log_history if "trm/accept_rate" in h]
    assert accept == [0.0, 0.0]
    assert all(h["trm/log_ratio_abs_max/max"] > 40 for h in trainer.state.log_history if "trm/accept_rate" in h)
