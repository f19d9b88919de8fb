"""Samplers compared like with like: identical fp32 engines under top-k / top-p / min-p / repetition penalty are not a
mismatch (accept rate 1, k3 ~ 0) in `trm` and `trm_exact`, and what cannot be reproduced is refused at start-up."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from trl_trm.processors import SamplerProcessors, sampler_for_trainer

SAMPLERS = {
    "top_k": dict(top_k=20),
    "top_p": dict(top_p=0.9),
    # The tiny model's logits are near-flat (std 0.16): min-p 0.1 cuts nothing at temperature 1, so sharpen them.
    "min_p": dict(min_p=0.1, temperature=0.1),
    "repetition_penalty": dict(repetition_penalty=1.2),
    "combined": dict(top_k=20, top_p=0.9, min_p=0.1, repetition_penalty=1.2, temperature=0.3),
}
MODES = {"trm": dict(trm_mode="trm"), "trm_exact": dict(trm_mode="trm_exact", trm_rollout_topk=4)}


def _window_metrics(trainer) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith("trm/"):
                out.setdefault(key, []).append(value)
    return out


def _train(make_trainer, disable_processors=False, **overrides):
    trainer = make_trainer(bf16=False, max_steps=2, **overrides)  # fp32 rollout and training: identical engines
    if disable_processors:  # the behaviour before samplers were compared like with like
        trainer._trm_processors = None
    trainer.train()
    return trainer, _window_metrics(trainer)


def _cases():
    """Every sampler in `trm`; in `trm_exact` top-k and the combined set by default, the others with `make test-slow`."""
    for mode in MODES:
        for sampler in SAMPLERS:
            slow = mode == "trm_exact" and sampler not in ("top_k", "combined")
            yield pytest.param(sampler, mode, marks=[pytest.mark.slow] if slow else [], id=f"{sampler}-{mode}")


@pytest.mark.parametrize(("sampler", "mode"), list(_cases()))
def test_identical_engines_are_not_a_mismatch_under_any_sampler(make_trainer, sampler, mode):
    trainer, metrics = _train(make_trainer, **SAMPLERS[sampler], **MODES[mode])
    assert metrics["trm/accept_rate"] == [1.0, 1.0]
    assert max(metrics["trm/kl_k3"]) < 1e-6
    assert max(metrics["trm/log_ratio_abs_max/max"]) < 1e-4
    if mode == "trm_exact":  # the rollout's top-k is processed, and so is π_θ at those ids
        assert max(metrics["trm/kl_tok_max_lb/max"]) < 1e-6
    assert trainer._trm_processors is not None and trainer._trm_processors.engine == "transformers"


@pytest.mark.slow
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_without_the_processors_the_same_run_reads_as_a_mismatch(make_trainer, sampler):
    """The control of the test above: the loss forward's temperature-only log-probs against processed rollout
    log-probs (what TRMTrainer compared before) are far apart, so the test above can fail."""
    _, metrics = _train(make_trainer, disable_processors=True, **SAMPLERS[sampler], **MODES["trm"])
    assert max(metrics["trm/log_ratio_abs_max/max"]) > 1e-3  # the test above asserts < 1e-4
    if sampler != "repetition_penalty":  # 1.2 on near-flat logits: |log ρ| ~ 0.03, k3 ~ 5e-7
        assert max(metrics["trm/kl_k3"]) > 1e-5  # the test above asserts < 1e-6
    if sampler in ("top_k", "combined"):  # truncation to 20 of 512 near-equiprobable tokens: |log ρ| > log 2
        assert max(metrics["trm/accept_rate"]) == 0.0


def test_generation_mask_policy_under_top_k(make_trainer):
    _, metrics = _train(make_trainer, top_k=20, trm_mask_policy="generation")
    assert metrics["trm/accept_rate"] == [1.0, 1.0]
    assert max(metrics["trm/kl_k3"]) < 1e-6


def test_row_chunks_and_the_compact_head_layout(make_trainer, monkeypatch):
    """TRL's forward in row chunks (`batch_size` < B on the generation-time forward) and the CUDA head layout (only
    labelled positions scored), with the repetition penalty's per-row context."""
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    _, metrics = _train(
        make_trainer, repetition_penalty=1.3, top_k=30, per_device_train_batch_size=2, steps_per_generation=2,
        trm_mask_policy="generation",
    )  # fmt: skip
    assert metrics["trm/accept_rate"] and set(metrics["trm/accept_rate"]) == {1.0}  # one mask per generated batch
    assert max(metrics["trm/kl_k3"]) < 1e-6


def test_bf16_training_is_still_a_mismatch_under_top_k(make_trainer):
    """Like with like removes only the sampler's difference, not a real engine difference."""
    trainer = make_trainer(bf16=True, top_k=20, max_steps=1, trm_delta_max=1e-3)
    trainer.train()
    metrics = _window_metrics(trainer)
    assert metrics["trm/kl_k3"][0] > 1e-9
    assert metrics["trm/log_ratio_abs_max/max"][0] > 1e-3


# --------------------------------------------------------------------------- start-up refusals and settings
@pytest.mark.parametrize(
    "kwargs",
    [{"typical_p": 0.9}, {"no_repeat_ngram_size": 2}, {"epsilon_cutoff": 1e-3}, {"bad_words_ids": [[5]]}],
)
def test_trainer_refuses_unreproduced_generation_kwargs(make_trainer, kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}="):
        make_trainer(generation_kwargs=kwargs)


def test_trm_mode_none_only_warns(make_trainer):
    with pytest.warns(UserWarning, match="typical_p"):
        trainer = make_trainer(trm_mode="none", generation_kwargs={"typical_p": 0.9})
    assert trainer._trm_processors is None


def test_the_models_own_generation_config_is_read(tiny_model_dir, toy_dataset, tmp_path):
    """`generate` fills what TRL leaves unset (`min_p=None`) from the model's generation_config: so does the check."""
    from trainer_kwargs import base_config_kwargs, length_reward
    from transformers import GenerationConfig

    from trl_trm import TRMConfig, TRMTrainer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)

    def make():
        args = TRMConfig(**base_config_kwargs(tmp_path / "out"))
        return TRMTrainer(model=str(model_dir), reward_funcs=length_reward, args=args, train_dataset=toy_dataset)

    GenerationConfig(do_sample=True, min_p=0.2, pad_token_id=0).save_pretrained(model_dir)
    processors = make()._trm_processors
    assert processors is not None and processors.min_p == 0.2
    GenerationConfig(do_sample=True, no_repeat_ngram_size=3, pad_token_id=0).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        make()


def test_temperature_only_needs_no_capture(make_trainer):
    trainer = make_trainer(temperature=0.7)
    assert trainer._trm_processors is None


def test_tools_with_processors_are_refused():
    args = SimpleNamespace(
        temperature=1.0, top_k=20, top_p=1.0, min_p=None, repetition_penalty=1.0, generation_kwargs=None,
        trm_mode="trm", use_vllm=True,
    )  # fmt: skip
    trainer = SimpleNamespace(args=args, use_vllm=True, rollout_func=None, tools=[lambda: None])
    with pytest.raises(ValueError, match="tool calling"):
        sampler_for_trainer(trainer)
    trainer.tools = None
    assert sampler_for_trainer(trainer) == SamplerProcessors(engine="vllm", top_k=20)


# --------------------------------------------------------------------------- vLLM path (fake server, vLLM's order)
def test_vllm_server_path_uses_vllms_order(make_trainer, tiny_model_dir, monkeypatch):
    """TRL's real `VLLMGeneration` (server mode) against a fake server that samples with vLLM's order (penalties,
    temperature, min-p, top-k + top-p), written independently (`test_processors._vllm_reference`): identical fp32
    engines, so accept rate 1 and k3 ~ 0, and the trainer picked the vLLM order."""
    import torch
    import trl.generation.vllm_generation as vllm_generation
    from test_processors import _vllm_reference
    from test_vllm_client_side import SERVER_OK, FakeVLLMClient, FakeVLLMServer
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id

    class SamplingServer(FakeVLLMServer):
        @torch.no_grad()
        def completions(self, prompts, n, max_tokens, logprobs, **params):
            self.generate_calls.append(params)
            settings = {key: params[key] for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
            vocab = self.model.config.vocab_size
            choices = []
            for prompt in prompts:
                for _ in range(n):
                    tokens, logps = list(prompt), []
                    for _ in range(max_tokens):
                        logits = self.model(input_ids=torch.tensor([tokens])).logits[:, -1].float()  # (1, V)
                        seen = torch.zeros(1, vocab, dtype=torch.bool)
                        seen[0, tokens] = True  # prompt and output so far (vLLM's prompt has no padding)
                        logp = torch.log_softmax(_vllm_reference(logits, seen, **settings), dim=-1)[0]  # (V,)
                        token = int(torch.multinomial(logp.exp(), 1, generator=self.rng))
                        tokens.append(token)
                        logps.append(float(logp[token]))
                        if token == eos:
                            break
                    completion = tokens[len(prompt) :]
                    entry = {
                        "tokens": [f"token_id:{t}" for t in completion],
                        "token_logprobs": logps,
                        "top_logprobs": [None] * len(completion),
                    }
                    choices.append({"prompt_token_ids": prompt, "token_ids": completion, "logprobs": entry})
            return choices

    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "VLLMClient", FakeVLLMClient)
    FakeVLLMClient.server = server = SamplingServer(tiny_model_dir, SERVER_OK)
    sampler = dict(temperature=0.3, top_k=20, top_p=0.9, min_p=0.1, repetition_penalty=1.2)
    trainer = make_trainer(use_vllm=True, vllm_mode="server", bf16=False, max_completion_length=6, **sampler)
    assert trainer._trm_processors == SamplerProcessors(engine="vllm", **sampler, reference_temperature=0.3)
    trainer.train()
    metrics = _window_metrics(trainer)
    assert server.generate_calls and server.generate_calls[0]["top_k"] == 20
    assert metrics["trm/accept_rate"] == [1.0, 1.0]
    assert max(metrics["trm/kl_k3"]) < 1e-6
    assert max(metrics["trm/log_ratio_abs_max/max"]) < 1e-4


def test_rho_factor_uses_processed_old_logprobs(make_trainer):
    """With TRL's `old_per_token_logps` (here `steps_per_generation=2`), the ρ factor exp(log π_old − log π_roll) of
    identical engines is 1 only when π_old is processed like π_roll. `learning_rate=0`: the second step's policy is
    not stale (with a real update it is, and may rightly reject)."""
    _, metrics = _train(
        make_trainer, top_k=20, repetition_penalty=1.2, per_device_train_batch_size=2, steps_per_generation=2,
        learning_rate=0.0,
    )  # fmt: skip
    assert metrics["trm/accept_rate"] == [1.0, 1.0]
    assert max(abs(w - 1.0) for w in metrics["trm/token_weight/mean"]) < 1e-4


def test_trl_scores_every_loss_forward_through_the_fused_head():
    """The capture sees the logits only through TRL's fused LM head: trl 1.16 has no other scoring path in
    `_get_per_token_logps_and_entropies` (Liger keeps it: TRL refuses Liger's fused linear cross-entropy)."""
    import inspect

    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
    assert source.count("model(") == 1 and "fused_lm_head=True" in source
    assert "outputs.logits" not in source and "outputs.log_probs" in source
    init = inspect.getsource(GRPOTrainer.__init__)
    assert "add_fused_lm_head(" in init and '"fused_linear_cross_entropy": False' in init
