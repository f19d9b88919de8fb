"""TRMTrainer end to end on the tiny model: masking decides whether parameters move, and what they move by."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_kwargs import loss_batch


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _moved(before, model):
    after = dict(model.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, after[n].detach())}


def _trm_logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_reject_all_freezes_parameters(make_trainer, use_peft):
    # bf16 autocast in training vs fp32 processed sampling scores: |log rho| ~1e-3, far above 1e-9.
    trainer = make_trainer(peft_config=_lora() if use_peft else None, trm_delta_max=1e-9, trm_delta_avg=None)
    before = _snapshot(trainer.model)
    assert before, "no trainable parameters"
    trainer.train()
    assert _trm_logs(trainer, "trm/accept_rate") == [0.0, 0.0]
    assert all(r == 1.0 for r in _trm_logs(trainer, "trm/reject_rate/delta_max"))
    assert all(v > 1e-9 for v in _trm_logs(trainer, "trm/log_ratio_abs_max/max"))  # the mismatch is real
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert _moved(before, trainer.model) == set()


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_permissive_threshold_trains(make_trainer, use_peft):
    trainer = make_trainer(peft_config=_lora() if use_peft else None, trm_delta_max=10.0, trm_delta_avg=10.0)
    before = _snapshot(trainer.model)
    trainer.train()
    assert _trm_logs(trainer, "trm/accept_rate") == [1.0, 1.0]
    moved = _moved(before, trainer.model)
    assert moved, "no parameter moved although every sequence was accepted"
    if use_peft:
        assert all("lora_" in n for n in moved)


def test_transformers_rollout_logprobs_are_captured_not_recomputed(make_trainer):
    # fp32 training: the captured processed sampling log-probs equal the training log-probs (temperature applied).
    exact = make_trainer(bf16=False, temperature=0.7, trm_delta_max=1e-3)
    exact.train()
    assert max(_trm_logs(exact, "trm/log_ratio_abs_max/max")) < 1e-4
    assert _trm_logs(exact, "trm/accept_rate") == [1.0, 1.0]
    # bf16 autocast training: the same capture now differs from training, as a real engine mismatch would.
    mixed = make_trainer(bf16=True, temperature=0.7, trm_delta_max=1e-3)
    mixed.train()
    assert max(_trm_logs(mixed, "trm/log_ratio_abs_max/max")) > 1e-4


def test_generation_mask_policy(make_trainer):
    trainer = make_trainer(trm_mask_policy="generation", trm_delta_max=1e-9, trm_delta_avg=None, num_iterations=2)
    before = _snapshot(trainer.model)
    trainer.train()
    assert _trm_logs(trainer, "trm/accept_rate")[0] == 0.0
    assert _moved(before, trainer.model) == set()


def test_mode_none_logs_diagnostics_and_trains(make_trainer):
    trainer = make_trainer(trm_mode="none")
    before = _snapshot(trainer.model)
    trainer.train()
    assert _trm_logs(trainer, "trm/accept_rate") == [1.0, 1.0]
    assert all(v > 0 for v in _trm_logs(trainer, "trm/log_ratio_abs_max/max"))
    assert _moved(before, trainer.model)


# --------------------------------------------------------------------------- gradient identity
def _loss_batch(trainer, reject_rows, nan_rows=()):
    """A hand-built batch of 4 completions whose rollout log-probs are the model's own, perturbed by +1.0 on one
    token for `reject_rows` (|log rho| = 1 > delta_max) and by 1e-4 elsewhere."""
    torch.manual_seed(0)
    model = trainer.model
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (4, 5))
    completion_ids = torch.randint(3, vocab, (4, 7))
    completion_mask = torch.ones(4, 7, dtype=torch.long)
    completion_mask[1, 5:] = 0
    completion_mask[3, 3:] = 0
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, 4:-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    sampling = logps + 1e-4
    for r in reject_rows:
        sampling[r, 1] += 1.0
    for r in nan_rows:
        sampling[r, 0] = float("nan")
    return loss_batch(prompt_ids, completion_ids, completion_mask, sampling)


def _reference_loss(model, inputs, kept, loss_type, max_completion_length, ratio_factor=True):
    """The masked GRPO loss written out by hand: kept rows only, normalised as `loss_type` normalises the WHOLE
    batch. With old log-probs equal to the current ones, the per-token loss is -A * exp(logp - logp.detach())."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    logits = model(ids).logits[:, inputs["prompt_ids"].size(1) - 1 : -1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"].float()
    # The seeds' estimator: kept tokens weighted by the detached pi_old / pi_roll (pi_old = pi_theta here).
    rho = torch.exp(logps.detach() - inputs["sampling_per_token_logps"]) if ratio_factor else torch.ones_like(logps)
    per_token = -inputs["advantages"].unsqueeze(1) * torch.exp(logps - logps.detach()) * rho * mask
    per_token = per_token * torch.tensor([1.0 if i in kept else 0.0 for i in range(4)]).unsqueeze(1)
    if loss_type == "bnpo":
        return per_token.sum() / mask.sum()
    if loss_type == "grpo":
        return (per_token.sum(1) / mask.sum(1)).mean()
    if loss_type == "dr_grpo":
        return per_token.sum() / (4 * max_completion_length)
    if loss_type == "dapo":
        return per_token.sum() / inputs["num_items_in_batch"]
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dr_grpo", "dapo"])
def test_gradient_is_kept_sequences_over_whole_batch_normaliser(make_trainer, loss_type):
    trainer = make_trainer(bf16=False, loss_type=loss_type, trm_delta_max=0.1, trm_delta_avg=None)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    model = trainer.model
    inputs = _loss_batch(trainer, reject_rows=(0, 2))

    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    _reference_loss(model, inputs, kept={1, 3}, loss_type=loss_type, max_completion_length=12).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert got.keys() == want.keys() and got
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)
    trainer._trm_flush_window("train")
    assert trainer._metrics["train"]["trm/accept_rate"][-1] == 0.5
    # the batch itself is untouched (it is reused across num_iterations)
    assert inputs["advantages"].shape == (4,)


def test_all_rejected_batch_gives_finite_zero_loss_and_zero_grad(make_trainer):
    trainer = make_trainer(bf16=False, loss_type="bnpo", trm_delta_max=0.1, trm_delta_avg=None)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = _loss_batch(trainer, reject_rows=(0, 1, 2), nan_rows=(3,))
    loss = trainer._compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    trainer._trm_flush_window("train")
    assert trainer._metrics["train"]["trm/nonfinite_frac"][-1] == 0.25


def test_tis_weights_scale_the_per_token_loss(make_trainer):
    trainer = make_trainer(bf16=False, loss_type="bnpo", trm_mode="token_tis", trm_ratio_max=1.5)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = _loss_batch(trainer, reject_rows=(0,))
    loss = trainer._compute_loss(trainer.model, inputs)
    # with old == current log-probs the per-token loss is -A * w_t with w_t = min(rho_t, C), summed / N tokens
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():
        logits = trainer.model(ids).logits[:, 4:-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    w = torch.exp((logps - inputs["sampling_per_token_logps"]).clamp(max=math.log(1.5))) * inputs["completion_mask"]
    expected = (-inputs["advantages"].unsqueeze(1) * w).sum() / inputs["completion_mask"].sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert w[0, 1] < 1.0  # the perturbed token's ratio exp(-1) was not truncated, the others ~1
