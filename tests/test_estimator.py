"""The seeds' estimator inside TRL's loss (spec "Inside TRL's loss"): accepted tokens carry ρ_t, TIS weights use
π_old/π_roll, a rejected sequence contributes nothing through any loss term, and metrics span the logging window.

The rollout engine here is a `rollout_func` whose log-probs are the trainer's own (fp32, same weights) shifted by a
constant c, so log ρ_t = c on every token: the talk's gradient (1/N) Σ M_i A_i Σ_t ρ_t ∇log π_θ then scales by e^c.
"""

from __future__ import annotations

import math

import pytest
import torch
from trainer_kwargs import base_config_kwargs, length_reward, loss_batch, trl_policy_loss

LOSS_TYPES = ["dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo"]
ACCEPT_ALL = dict(trm_delta_max=10.0, trm_delta_avg=None)


def _completions(prompts, tok):
    """Deterministic completions of different lengths (so rewards, hence advantages, differ)."""
    words = [" 1", " 2 3", " 4 5 6", " 7 8 9 0"]
    return [tok(words[(len(p) + i) % 4])["input_ids"] + [tok.eos_token_id] for i, p in enumerate(prompts)]


def _theta_logps(trainer, prompt_ids, completion_ids):
    """log π_θ of each completion token under the trainer's current weights (fp32, temperature applied)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    out = []
    with torch.no_grad():
        for p, c in zip(prompt_ids, completion_ids, strict=True):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float() / trainer.temperature
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0])
    return out


def shifted_rollout(c: float, outlier: tuple[int, int, float] | None = None):
    """`rollout_func` reporting log π_roll = log π_θ − c (ρ_t = e^c); ``outlier=(prompt_index, t, d)`` adds log ρ = d at
    token t of the completion of the ``prompt_index``-th distinct prompt seen in each call."""

    def rollout_func(prompts, trainer):
        tok = trainer.processing_class
        prompt_ids = [tok(p)["input_ids"] for p in prompts]
        completion_ids = _completions(prompts, tok)
        logprobs = [(lp - c).tolist() for lp in _theta_logps(trainer, prompt_ids, completion_ids)]
        if outlier is not None:
            index, t, d = outlier
            first = sorted(set(prompts))[index]
            i = prompts.index(first)
            logprobs[i][t] -= d
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout_func


def _train(tiny_model_dir, toy_dataset, tmp_path, trainer_cls=None, rollout_func=None, **overrides):
    from trl_trm import TRMConfig, TRMTrainer

    kwargs = base_config_kwargs(tmp_path / "out", bf16=False, optim="sgd", learning_rate=1e-4, max_steps=2)
    kwargs.update(overrides)
    if trainer_cls is None:
        args, trainer_cls = TRMConfig(**kwargs), TRMTrainer
    else:  # a plain GRPOTrainer with the same settings
        from trl import GRPOConfig

        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("trm_")}
        args = GRPOConfig(**kwargs)
    trainer = trainer_cls(
        model=tiny_model_dir,
        reward_funcs=length_reward,
        args=args,
        train_dataset=toy_dataset,
        rollout_func=rollout_func,
    )
    trainer.train()
    return trainer


def _logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _grad_norm_ratio(tiny_model_dir, toy_dataset, tmp_path, c=0.5, **overrides):
    runs = [
        _train(tiny_model_dir, toy_dataset, tmp_path / f"c{shift}", rollout_func=shifted_rollout(shift), **overrides)
        for shift in (0.0, c)
    ]
    base, shifted = (_logs(t, "grad_norm") for t in runs)
    assert len(base) == len(shifted) == 2 and all(g > 0 for g in base)
    # (with trm_mask_policy="generation" and num_iterations=2 the mask is evaluated, hence logged, once per batch)
    accept = _logs(runs[1], "trm/accept_rate")
    assert accept and all(a == 1.0 for a in accept)
    return [s / b for s, b in zip(shifted, base, strict=True)]


# ---------------------------------------------------------------------------------------------------------------------
# 1. ρ_t inside accepted sequences: the gradient scales with e^c
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_grad_norm_scales_with_rho(tiny_model_dir, toy_dataset, tmp_path, loss_type, num_iterations):
    ratios = _grad_norm_ratio(
        tiny_model_dir, toy_dataset, tmp_path, loss_type=loss_type, num_iterations=num_iterations, **ACCEPT_ALL
    )
    assert ratios == pytest.approx([math.exp(0.5)] * 2, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("policy", ["current", "generation"])
def test_grad_norm_scales_with_rho_every_loss_type(
    tiny_model_dir, toy_dataset, tmp_path, loss_type, num_iterations, policy
):
    ratios = _grad_norm_ratio(
        tiny_model_dir,
        toy_dataset,
        tmp_path,
        loss_type=loss_type,
        num_iterations=num_iterations,
        trm_mask_policy=policy,
        **ACCEPT_ALL,
    )
    assert ratios == pytest.approx([math.exp(0.5)] * 2, rel=1e-3)


@pytest.mark.parametrize("policy", ["current", "generation"])
def test_ratio_factor_off_gives_the_plain_mask(tiny_model_dir, toy_dataset, tmp_path, policy):
    ratios = _grad_norm_ratio(
        tiny_model_dir, toy_dataset, tmp_path, trm_ratio_factor=False, trm_mask_policy=policy, **ACCEPT_ALL
    )
    assert ratios == pytest.approx([1.0, 1.0], rel=1e-4)


@pytest.mark.parametrize("mode", ["geo_mask", "seq_mis"])
def test_other_mask_modes_carry_rho(tiny_model_dir, toy_dataset, tmp_path, mode):
    c = 0.002  # inside the default Geo-Mask band exp(c) <= 1.01 and the Seq-MIS limit for 5-token completions
    ratios = _grad_norm_ratio(tiny_model_dir, toy_dataset, tmp_path, c=c, trm_mode=mode)
    assert ratios == pytest.approx([math.exp(c)] * 2, rel=1e-4)


def test_token_tis_counts_the_policy_ratio_once(tiny_model_dir, toy_dataset, tmp_path):
    """With π_roll = π_old (c = 0) a TIS weight min(π_old/π_roll, C) = 1: TRMTrainer trains exactly like GRPOTrainer,
    also at the second iteration, where π_θ ≠ π_old (the weight must not be min(π_θ/π_roll, C))."""
    from trl import GRPOTrainer

    settings = dict(num_iterations=2, learning_rate=0.5, trm_mode="token_tis", trm_mask_policy="current")
    ours = _train(tiny_model_dir, toy_dataset, tmp_path / "trm", rollout_func=shifted_rollout(0.0), **settings)
    ref = _train(
        tiny_model_dir, toy_dataset, tmp_path / "grpo", GRPOTrainer, rollout_func=shifted_rollout(0.0), **settings
    )
    ours_norms, ref_norms = _logs(ours, "grad_norm"), _logs(ref, "grad_norm")
    assert ours_norms == pytest.approx(ref_norms, rel=1e-4)
    assert _logs(ours, "loss") == pytest.approx(_logs(ref, "loss"), rel=1e-4, abs=1e-7)
    assert abs(ours_norms[1] - ours_norms[0]) > 1e-3  # the policy did move between the two iterations


# ---------------------------------------------------------------------------------------------------------------------
# 2. The loss equals a hand-written reference of the estimator inside TRL's clip, for every loss type
# ---------------------------------------------------------------------------------------------------------------------
def _batch(trainer, c=0.3, old_shift=None, reject_rows=()):
    tok = trainer.processing_class
    prompts = ["1+1=", "2+2=", "3+3=", "4+4="]
    prompt_ids = torch.tensor([tok(p)["input_ids"] for p in prompts])
    completion_ids = torch.tensor([tok(" 1 2 3")["input_ids"] + [tok.eos_token_id]] * 4)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, -1] = 0
    theta = torch.stack(_theta_logps(trainer, prompt_ids.tolist(), completion_ids.tolist()))  # (B, T)
    sampling = theta - c
    for r in reject_rows:
        sampling[r, 0] -= 5.0
    batch = loss_batch(prompt_ids, completion_ids, completion_mask, sampling)
    if old_shift is not None:  # num_iterations > 1: π_old differs from the current policy
        batch["old_per_token_logps"] = theta + old_shift
    return batch


def _reference(trainer, batch, logps, kept):
    """TRL 1.16's per-token losses written out, with the estimator's weight w_t = M_i · π_old/π_roll applied to A."""
    old = batch.get("old_per_token_logps", logps.detach())
    w = torch.exp(old - batch["sampling_per_token_logps"]) * torch.tensor(kept, dtype=torch.float32)[:, None]
    adv = batch["advantages"][:, None] * w  # (B, T)
    return trl_policy_loss(trainer, batch, logps, old, adv)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("old_shift", [None, 0.15], ids=["iter1", "old"])
def test_loss_equals_the_estimator_reference(make_trainer, loss_type, old_shift):
    trainer = make_trainer(bf16=False, loss_type=loss_type, trm_delta_max=1.0, trm_delta_avg=None)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = _batch(trainer, c=0.3, old_shift=old_shift, reject_rows=(2,))
    model = trainer.model

    model.zero_grad()
    loss = trainer._compute_loss(model, batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    logits = model(input_ids=ids).logits[:, batch["prompt_ids"].size(1) - 1 : -1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    want_loss = _reference(trainer, batch, logps, kept=[1, 1, 0, 1])
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-7)
    assert got.keys() == want.keys() and got
    scale = max(float(g.abs().max()) for g in want.values())
    for n in want:  # float32 noise of two forward paths (TRL's fused head vs the plain LM head): ~1e-7 relative
        assert float((got[n] - want[n]).abs().max()) <= 1e-5 * scale, n
    # The factor matters here: e^0.3 on every accepted token, so the plain mask's gradient is far off.
    assert max(float((got[n] - want[n] / math.exp(0.3)).abs().max()) for n in want) > 0.1 * scale


# ---------------------------------------------------------------------------------------------------------------------
# 3. A rejected sequence contributes nothing, through every loss term TRL 1.16 has
# ---------------------------------------------------------------------------------------------------------------------
def _all_rejected_grads(trainer, **batch_kwargs):
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = _batch(trainer, c=0.0, reject_rows=(0, 1, 2, 3), **batch_kwargs)
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    return loss, grads


def test_reject_all_with_entropy_bonus_gives_zero_gradient(make_trainer):
    trainer = make_trainer(bf16=False, entropy_coef=0.1, trm_delta_max=1.0, trm_delta_avg=None)
    loss, grads = _all_rejected_grads(trainer)
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    # ... and the entropy itself is still measured (TRL's `entropy` metric, the adaptive controller)
    assert trainer._metrics["train"]["entropy"][-1] > 0


def test_entropy_bonus_still_acts_on_accepted_sequences(make_trainer):
    on = make_trainer(bf16=False, entropy_coef=0.1, trm_delta_max=1.0, trm_delta_avg=None)
    on.current_gradient_accumulation_steps = 1
    batch = _batch(on, c=0.0, reject_rows=(0, 1, 2))
    batch["advantages"] = torch.zeros(4)  # only the entropy term has a gradient
    loss = on._compute_loss(on.model, batch)
    loss.backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in on.model.parameters() if p.grad is not None)


def test_reject_all_with_adaptive_entropy_gives_zero_gradient(make_trainer):
    trainer = make_trainer(
        bf16=False, use_adaptive_entropy=True, entropy_coef=0.1, trm_delta_max=1.0, trm_delta_avg=None
    )
    trainer._last_world_entropy = 0.0  # below the target: the adaptive bonus is applied
    _, grads = _all_rejected_grads(trainer)
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_reject_all_with_kl_to_reference_gives_zero_gradient(make_trainer):
    trainer = make_trainer(bf16=False, beta=0.1, trm_delta_max=1.0, trm_delta_avg=None)
    trainer.current_gradient_accumulation_steps = 1
    batch = _batch(trainer, c=0.0, reject_rows=(0, 1, 2, 3))
    batch["ref_per_token_logps"] = batch["sampling_per_token_logps"] - 0.5  # a far-away reference
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in trainer.model.parameters() if p.grad is not None)


def test_moe_router_aux_loss_trains_in_trm_mode(tmp_path, toy_dataset):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from trl_trm import TRMConfig, TRMTrainer
    from trl_trm.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = Qwen2MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=2,
        num_experts_per_tok=1,
        router_aux_loss_coef=0.01,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2MoeForCausalLM(config)
    args = TRMConfig(**base_config_kwargs(tmp_path / "moe", max_steps=1))
    trainer = TRMTrainer(
        model=model, reward_funcs=length_reward, args=args, train_dataset=toy_dataset, processing_class=tok
    )
    assert trainer.aux_loss_enabled  # no longer refused: the aux loss is masked to kept tokens (trl_trm/moe.py)
    trainer.train()
    aux = [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log]
    assert aux and all(a == a and a >= 0 for a in aux)  # finite, non-negative load-balancing loss was added


# ---------------------------------------------------------------------------------------------------------------------
# 4. Window-level metrics: one reduction over every micro-batch since the last log
# ---------------------------------------------------------------------------------------------------------------------
def test_window_metrics_do_not_depend_on_gradient_accumulation(tiny_model_dir, toy_dataset, tmp_path):
    rollout = shifted_rollout(0.0, outlier=(0, 1, 2.0))  # one token with log rho = 2 in each generation batch
    common = dict(max_steps=1, trm_mode="none")
    one = _train(
        tiny_model_dir, toy_dataset, tmp_path / "ga1", rollout_func=rollout, per_device_train_batch_size=8, **common
    )
    two = _train(
        tiny_model_dir,
        toy_dataset,
        tmp_path / "ga2",
        rollout_func=rollout,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        **common,
    )
    (m1,), (m2,) = ([h for h in t.state.log_history if "trm/accept_rate" in h] for t in (one, two))
    assert m2["trm/log_ratio_abs_max/max"] == pytest.approx(2.0, rel=1e-4)  # a max over the window
    keys = sorted(k for k in m1 if k.startswith("trm/"))
    assert keys == sorted(k for k in m2 if k.startswith("trm/"))
    for key in keys:
        if m1[key] is None or (isinstance(m1[key], float) and math.isnan(m1[key])):
            assert m2[key] is None or math.isnan(m2[key]), key
            continue
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key


def test_seq_tis_auto_clip_is_computed_per_batch_and_logged(make_trainer):
    trainer = make_trainer(bf16=False, loss_type="bnpo", trm_mode="seq_tis", trm_ratio_max="auto")
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = _batch(trainer, c=0.3, reject_rows=(2,))  # row 2: one token 5 nats further off
    lengths = batch["completion_mask"].sum(-1).double()  # (B,)
    s = 0.3 * lengths + torch.tensor([0.0, 0.0, 5.0, 0.0], dtype=torch.float64)  # (B,) sum_t log(pi_old / pi_roll)
    clip = math.sqrt(2 * float(torch.exp(2 * s).mean()))
    loss = trainer._compute_loss(trainer.model, batch)
    trainer._trm_flush_window("train")
    assert trainer._metrics["train"]["trm/seq_tis_clip"] == [pytest.approx(clip, rel=1e-5)]
    # the loss used that clip: at num_iterations = 1 the bnpo loss is -sum_i A_i w_i T_i / sum_i T_i
    w = torch.exp(s.clamp(max=math.log(clip)))
    want = -(batch["advantages"].double() * w * lengths).sum() / lengths.sum()
    assert loss.item() == pytest.approx(float(want), rel=1e-5)
    assert float(torch.exp(s).max()) > clip  # the clip binds for the outlier


def test_auto_clip_and_seq_tis_weights_share_one_pass(make_trainer, monkeypatch):
    """`trm_ratio_max="auto"`: the (B,) sum_t log(pi_old/pi_roll) is computed once per batch (issue 22: the clip and
    the Seq-TIS weights each reduced the (B, T) log-ratios), and the weights use that float64 sum."""
    import trl_trm.trainer as trainer_module
    from trl_trm.masking import compute_trust_region_mask, estimator_weights, old_seq_log_ratio

    calls = []

    def counted(*args):
        calls.append(1)
        return old_seq_log_ratio(*args)

    monkeypatch.setattr(trainer_module, "old_seq_log_ratio", counted)
    trainer = make_trainer(bf16=False, loss_type="bnpo", trm_mode="seq_tis", trm_ratio_max="auto")
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = _batch(trainer, c=0.3, reject_rows=(2,))
    trainer._compute_loss(trainer.model, batch)
    assert calls == [1]
    # with the caller's sum, seq_tis reads it and not the (B, T) log-ratios: a sum shifted by 0.1 shifts log w by 0.1
    old, roll, mask = (
        batch["sampling_per_token_logps"] + 0.3,
        batch["sampling_per_token_logps"],
        batch["completion_mask"],
    )
    result = compute_trust_region_mask(old, roll, mask, mode="seq_tis", ratio_max=1e6)
    seq = old_seq_log_ratio(old, roll, mask)  # (B,) float64
    plain = estimator_weights(result, old, roll, mask, mode="seq_tis", ratio_max=1e6)
    given = estimator_weights(result, old, roll, mask, mode="seq_tis", ratio_max=1e6, old_seq_log_ratio=seq + 0.1)
    valid = mask.bool()
    assert torch.allclose(given[valid].log(), plain[valid].log() + 0.1, atol=1e-5)
    exact = estimator_weights(result, old, roll, mask, mode="seq_tis", ratio_max=1e6, old_seq_log_ratio=seq)
    assert torch.allclose(exact, plain, rtol=1e-6)
