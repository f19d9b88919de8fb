"""GRPOTrainer's generation features through TRMTrainer, the way a TRL user passes them, in `trm_mode="none"` and
`"trm"`: tool calling and `environment_factory` (multi-turn) on the transformers path, a replaced `generate`, beam
search / greedy decoding, and malformed `rollout_func` log-probs.

The tool model is a real (tiny) transformers model whose sampler really emits the tool call: a Qwen2 with zeroed
attention/MLP outputs is a bigram model (the logits depend on the current token only), and its LM head is set so that
after "\\n" (the end of the generation prompt) the tool-call token is likely (p ~ 0.85) and after it `<|im_end|>`.
Generation and training use the same weights in fp32, so correct rollout log-probs give log ρ = 0 on model tokens,
while tool-result tokens (rollout log-prob 0 by TRL's convention, π_θ ≪ 1) must be masked by `tool_mask`.
"""

from __future__ import annotations

import math
from unittest.mock import patch

import pytest
import torch
from datasets import Dataset
from trainer_kwargs import base_config_kwargs, length_reward

CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>'


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


class MultiplyEnv:
    """An `environment_factory` environment: its public methods are the tools."""

    def __init__(self):
        self.calls = 0

    def reset(self, **kwargs):
        self.calls = 0

    def multiply(self, a: int, b: int) -> int:
        """
        Multiplies two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The product of the two integers.
        """
        self.calls += 1
        return a * b


@pytest.fixture(scope="module")
def tool_model():
    """(model, tokenizer): the bigram tool-calling model described in the module docstring."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.chat_template_utils import qwen2_5_chat_template

    from trl_trm.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template  # TRL knows its tool-call format (response schema)
    tokenizer.add_tokens([CALL])
    call_id, eos_id = tokenizer.convert_tokens_to_ids(CALL), tokenizer.eos_token_id
    newline_id = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )[-1]
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id, bos_token_id=None,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        normed = model.model.norm(model.model.embed_tokens.weight)  # (V, H) what the head sees per token
        model.lm_head.weight.zero_()
        for src, dst in ((newline_id, call_id), (call_id, eos_id)):
            model.lm_head.weight[dst] = 8.0 * normed[src] / normed[src].pow(2).sum()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_id
    return model, tokenizer


def _tool_trainer(tool_model, tmp_path, mode, **kwargs):
    from trl_trm import TRMConfig, TRMTrainer

    model, tokenizer = tool_model
    model = type(model)(model.config)
    model.load_state_dict(tool_model[0].state_dict())  # a fresh copy per test: training changes the weights
    model.generation_config = tool_model[0].generation_config
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} times 4?"}]} for i in range(8)])
    config = base_config_kwargs(
        tmp_path / mode, bf16=False, max_completion_length=96, max_steps=1, trm_mode=mode, learning_rate=1e-3,
        max_tool_calling_iterations=1,
    )  # fmt: skip
    extra = {"environment_factory": MultiplyEnv} if kwargs.pop("env", False) else {"tools": [multiply]}
    return TRMTrainer(
        model=model, reward_funcs=length_reward, args=TRMConfig(**config), train_dataset=dataset,
        processing_class=tokenizer, **extra, **kwargs,
    )  # fmt: skip


def _capture_batches(trainer) -> list[dict]:
    batches, original = [], trainer._generate_and_score_completions

    def capture(inputs):
        batches.append(original(inputs))
        return batches[-1]

    trainer._generate_and_score_completions = capture
    return batches


def _direct_logps(model, batch) -> torch.Tensor:
    """(B, T) log π(y_t | c_t) of every completion token from one full forward per row (no cache, no padding)."""
    out = torch.zeros(batch["completion_ids"].shape)
    with torch.no_grad():
        for i in range(out.size(0)):
            prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
            completion = batch["completion_ids"][i]
            logits = model(torch.cat([prompt, completion]).unsqueeze(0)).logits[0, prompt.numel() - 1 : -1].float()
            out[i] = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    return out


@pytest.mark.parametrize("mode", ["none", "trm"])
@pytest.mark.parametrize(
    "env", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["tools", "environment_factory"]
)
def test_tool_calling_multi_turn_records_every_generation_turn(tool_model, tmp_path, mode, env):
    trainer = _tool_trainer(tool_model, tmp_path, mode, env=env)
    batches = _capture_batches(trainer)
    # The rollout log-probs are from the weights at generation time: compare before the optimizer step.
    reference = type(trainer.model)(trainer.model.config)
    reference.load_state_dict(trainer.model.state_dict())
    trainer.train()

    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert logs["tools/call_frequency"] > 0.5  # most completions called the tool
    if env:
        assert any(e.calls > 0 for e in trainer.environments)
    batch = batches[0]
    tool_mask, completion_mask = batch["tool_mask"], batch["completion_mask"]
    tool_tokens = (tool_mask == 0) & completion_mask.bool()  # (B, T)
    model_tokens = (tool_mask == 1) & completion_mask.bool()
    assert tool_tokens.sum(1).gt(0).sum() >= 2  # at least two completions have two generation turns
    sampling = batch["sampling_per_token_logps"]
    theta = _direct_logps(reference, batch)
    # Model tokens of every turn (before and after the tool result) carry the sampler's log-probs ...
    turn2 = model_tokens & (tool_tokens.int().cumsum(1) > 0)
    assert turn2.any()
    torch.testing.assert_close(sampling[model_tokens], theta[model_tokens], atol=1e-4, rtol=0)
    # ... tool-result tokens carry TRL's 0.0, which π_θ is far from: only `tool_mask` keeps them out of the mask.
    assert sampling[tool_tokens].eq(0.0).all() and theta[tool_tokens].abs().max() > 1.0
    if mode == "trm":
        assert logs["trm/accept_rate"] == 1.0
        assert logs["trm/log_ratio_abs_max/max"] < 1e-4
    else:
        assert "trm/log_ratio_abs_max/max" in logs  # diagnostics are logged in "none" too


def _fake_generate(input_ids, **kwargs):
    """TRL's own tests replace `generate` with fixed tokens; no sampler runs."""
    return torch.cat([input_ids, torch.full((input_ids.size(0), 3), 7, dtype=torch.long)], dim=1)


def test_wrapped_generate_that_still_samples_is_recorded(make_trainer):
    """A wrapper around the real `generate` (returning its plain token tensor) used to break the capture
    (`'Tensor' object has no attribute 'scores'`); the sampler still runs inside, so its log-probs are recorded."""
    trainer = make_trainer(trm_mode="trm", max_steps=1, bf16=False)
    real = trainer.model.generate
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(kwargs.get("generation_config"))
        return real(*args, **kwargs)

    batches = _capture_batches(trainer)
    with patch.object(trainer.model, "generate", side_effect=wrapped):
        trainer.train()
    assert calls and not calls[0].output_scores  # generate is no longer asked for every step's scores
    sampling, mask = batches[0]["sampling_per_token_logps"], batches[0]["completion_mask"].bool()
    assert sampling[mask].lt(0).all() and torch.isfinite(sampling[mask]).all()
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert logs["trm/accept_rate"] == 1.0 and logs["trm/log_ratio_abs_max/max"] < 1e-4  # fp32: identical engines


def test_replaced_generate_is_refused_by_name_with_a_trm_mode(make_trainer):
    trainer = make_trainer(trm_mode="trm", max_steps=1)
    with patch.object(trainer.model, "generate", side_effect=_fake_generate):
        with pytest.raises(ValueError, match="no token was sampled through transformers' decoding loop"):
            trainer.train()


def test_replaced_generate_skips_diagnostics_with_one_warning_in_none(make_trainer):
    trainer = make_trainer(trm_mode="none", max_steps=2)
    with patch.object(trainer.model, "generate", side_effect=_fake_generate), pytest.warns(UserWarning) as record:
        trainer.train()
    ours = [w for w in record if "rollout log-probs are unknown" in str(w.message)]
    assert len(ours) == 1 and "trm/ diagnostics are skipped" in str(ours[0].message)
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "train_loss" in logged and not any(k.startswith("trm/") for k in logged)


@pytest.mark.parametrize(
    ("generation_kwargs", "name"),
    [({"num_beams": 2}, "num_beams"), ({"do_sample": False}, "do_sample")],
    ids=["beam_search", "greedy"],
)
def test_non_sampling_generation_is_refused_at_startup_with_a_trm_mode(make_trainer, generation_kwargs, name):
    with patch("transformers.GenerationMixin.generate") as generate:
        with pytest.raises(ValueError, match=name):
            make_trainer(trm_mode="trm", generation_kwargs=generation_kwargs).train()
    generate.assert_not_called()


@pytest.mark.parametrize(
    ("generation_kwargs", "name"),
    [({"num_beams": 2}, "beam_sample"), ({"do_sample": False}, "greedy_search")],
    ids=["beam_search", "greedy"],
)
def test_non_sampling_generation_skips_diagnostics_in_none(make_trainer, generation_kwargs, name):
    with pytest.warns(UserWarning) as record:
        trainer = make_trainer(trm_mode="none", generation_kwargs=generation_kwargs, max_steps=2)
        trainer.train()
    ours = [w for w in record if "no per-token sampling distribution" in str(w.message)]
    assert len(ours) == 1 and name in str(ours[0].message) and "num_beams" in str(ours[0].message)
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "train_loss" in logged and not any(k.startswith("trm/") for k in logged)


def _rollout_func(logprobs_of):
    """A `rollout_func` returning fixed completions; ``logprobs_of(completion_ids)`` builds its `logprobs`."""

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        completion_ids = [[5 + (i % 7), 9, 11, tokenizer.eos_token_id] for i in range(len(prompts))]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs_of(completion_ids)}

    return rollout


BAD_LOGPROBS = {
    "flat": (lambda c: [-0.5 for _ in c], r"flat list of numbers: `logprobs\[0\]` is -0.5.*sequence 0"),
    "nested": (
        lambda c: [[[-0.5, -2.0] for _ in ids] for ids in c],
        r"nested one level too deep: `logprobs\[0\]\[0\]` \(sequence 0, token 0\)",
    ),
    "probabilities": (
        lambda c: [[-0.1] * (len(ids) - 1) + [0.3] for ids in c],
        r"`logprobs\[0\]\[3\] = 0.3` \(sequence 0, token 3\).*looks like a probability",
    ),
}


@pytest.mark.parametrize("mode", ["none", "trm"])
@pytest.mark.parametrize("case", list(BAD_LOGPROBS))
def test_malformed_rollout_func_logprobs_are_one_clear_error(make_trainer, mode, case):
    build, message = BAD_LOGPROBS[case]
    trainer = make_trainer(trm_mode=mode, rollout_func=_rollout_func(build), max_steps=1)
    with pytest.raises(ValueError, match=message) as err:
        trainer.train()
    assert "Return `logprobs` as one list per completion" in str(err.value)


@pytest.mark.parametrize("mode", ["none", "trm"])
def test_well_formed_rollout_func_logprobs_pass_including_nonfinite(make_trainer, mode):
    """The checks do not refuse valid input: 0.0 (a certain token) and a NaN (left to `trm_nonfinite`) are fine."""

    def logprobs_of(c):
        rows = [[-1.0, -0.5, 0.0, -2.0] for _ in c]
        rows[1][0] = math.nan
        return rows

    trainer = make_trainer(trm_mode=mode, rollout_func=_rollout_func(logprobs_of), max_steps=1)
    trainer.train()
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert logs["trm/nonfinite_frac"] > 0
