"""`trm_old_policy="rollout"` (π_old := π_roll, the "bypass" PPO baseline): the loss and gradient equal a hand-written
PPO-clip loss against π_roll with the mask, for every loss type; TRL's old-log-prob forward is not run; the settings
under which it cannot work are refused by name."""

from __future__ import annotations

import pytest
import torch
from test_estimator import LOSS_TYPES, _batch, _logs, _train, shifted_rollout
from trainer_kwargs import base_config_kwargs, trl_policy_loss

from trl_trm import TRMConfig

# mode -> the (B, T) mask the test batch gets (row 2's first token has log ρ = 5.3, every other token 0.3; row 1's
# last token is padding)
MODES = {
    "trm": lambda m: torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None] * m,
    "token_mis": lambda m: (
        torch.where(torch.arange(m.size(1)) == 0, torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None], 1.0) * m
    ),
    "none": lambda m: m,
}


def _reference(trainer, batch, logps, weights):
    """TRL 1.16's per-token losses written out with π_old = π_roll, the advantages times the 0/1 mask."""
    adv = batch["advantages"][:, None] * weights  # (B, T)
    return trl_policy_loss(trainer, batch, logps, batch["sampling_per_token_logps"], adv)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_equal_ppo_clip_against_the_rollout_policy(make_trainer, loss_type, mode):
    extra = dict(trm_delta_max=1.0, trm_delta_avg=None) if mode == "trm" else {}
    trainer = make_trainer(bf16=False, loss_type=loss_type, trm_mode=mode, trm_old_policy="rollout", **extra)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    # TRL's π_old (here π_θ + 0.15) is in the batch, as with num_iterations > 1: bypass must not use it.
    batch = _batch(trainer, c=0.3, old_shift=0.15, reject_rows=(2,))
    batch["sampling_per_token_logps"][:, 1] += 0.4  # log ρ = -0.1 there: some ratios inside PPO's clip, some outside
    model = trainer.model

    model.zero_grad()
    loss = trainer._compute_loss(model, batch)
    loss.backward()
    got = _grads(model)

    model.zero_grad()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    logits = model(input_ids=ids).logits[:, batch["prompt_ids"].size(1) - 1 : -1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    want_loss = _reference(trainer, batch, logps, MODES[mode](batch["completion_mask"].float()))
    want_loss.backward()
    want = _grads(model)

    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-7)
    assert got.keys() == want.keys() and got
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0
    for n in want:
        assert float((got[n] - want[n]).abs().max()) <= 1e-5 * scale, n
    assert "old_per_token_logps" in batch and batch["old_per_token_logps"] is not batch["sampling_per_token_logps"]


def _count_forwards(trainer) -> list[int]:
    """[no-grad forwards, grad forwards] of the policy model, counted by a forward hook."""
    counts = [0, 0]

    def hook(module, args, output):
        counts[torch.is_grad_enabled()] += 1

    trainer.accelerator.unwrap_model(trainer.model).register_forward_hook(hook)
    return counts


@pytest.mark.slow
def test_the_old_logprob_forward_is_not_run(tiny_model_dir, toy_dataset, tmp_path):
    """num_iterations=2, max_steps=4: two generations. TRL runs one no-grad old-log-prob forward per generation;
    bypass runs none (the rollout_func's own forwards are the same in both runs), and its gradient steps differ."""
    settings = dict(
        num_iterations=2, max_steps=4, learning_rate=0.5, trm_mode="none", rollout_func=shifted_rollout(0.3)
    )
    runs = {}
    for policy in ("trainer", "rollout"):
        from trl_trm import TRMTrainer

        args = TRMConfig(**base_config_kwargs(tmp_path / policy, bf16=False, optim="sgd", trm_old_policy=policy))
        for key, value in settings.items():
            if key != "rollout_func":
                setattr(args, key, value)
        trainer = TRMTrainer(
            model=tiny_model_dir,
            reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
            args=args,
            train_dataset=toy_dataset,
            rollout_func=settings["rollout_func"],
        )
        counts = _count_forwards(trainer)
        trainer.train()
        runs[policy] = (trainer, counts)
    (default, default_counts), (bypass, bypass_counts) = runs["trainer"], runs["rollout"]
    assert default.trm_skipped_old_forwards == 0 and bypass.trm_skipped_old_forwards == 2
    assert default_counts[1] == bypass_counts[1] == 4  # one loss forward per step
    assert default_counts[0] - bypass_counts[0] == 2  # the two old-log-prob forwards
    assert _logs(default, "grad_norm") != pytest.approx(_logs(bypass, "grad_norm"), rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("c", [0.0, 0.3])
def test_with_an_exact_rollout_bypass_trains_like_trl(tiny_model_dir, toy_dataset, tmp_path, c):
    """π_roll = π_θ at generation (c = 0): π_roll is TRL's π_old, so bypass trains exactly like TRL's default at every
    iteration; with c = 0.3 it does not (its ratio is then against π_roll)."""
    settings = dict(num_iterations=2, learning_rate=0.5, trm_mode="trm", trm_delta_max=10.0, trm_delta_avg=None)
    runs = [
        _train(
            tiny_model_dir, toy_dataset, tmp_path / p, rollout_func=shifted_rollout(c), trm_old_policy=p, **settings
        )
        for p in ("trainer", "rollout")
    ]
    default, bypass = (_logs(t, "grad_norm") for t in runs)
    assert runs[1].trm_skipped_old_forwards == 1 and runs[0].trm_skipped_old_forwards == 0
    if c == 0.0:
        assert bypass == pytest.approx(default, rel=1e-4)
        assert abs(default[1] - default[0]) > 1e-3  # the policy moved between the two iterations
    else:
        assert bypass != pytest.approx(default, rel=1e-3)


@pytest.mark.slow
def test_the_reference_forward_is_kept(tiny_model_dir, toy_dataset, tmp_path):
    """With beta != 0 TRL also runs a no-grad reference forward after the skipped one: it must still run (a
    zero placeholder there would make the KL to the reference huge)."""
    trainer = _train(
        tiny_model_dir,
        toy_dataset,
        tmp_path,
        rollout_func=shifted_rollout(0.3),
        num_iterations=2,
        beta=0.1,
        trm_mode="none",
        trm_old_policy="rollout",
    )
    assert trainer.trm_skipped_old_forwards == 1
    kl = _logs(trainer, "kl")
    assert kl and all(0.0 <= k < 1e-3 for k in kl)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(trm_mode="token_tis"), "token_tis"),
        (dict(trm_mode="seq_tis"), "seq_tis"),
        (dict(trm_mode="none", vllm_importance_sampling_correction=True), "vllm_importance_sampling_correction"),
        (dict(trm_mode="none", loss_type="vespo"), "vespo"),
        (dict(trm_old_policy="behaviour"), "trm_old_policy"),
    ],
)
def test_refused_by_name(tmp_path, overrides, named):
    kwargs = base_config_kwargs(tmp_path, **{"trm_old_policy": "rollout", **overrides})
    with pytest.raises(ValueError, match=named) as info:
        TRMConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_sampler_processors_are_refused(make_trainer):
    with pytest.raises(ValueError, match="trm_old_policy='rollout'.*processed") as info:
        make_trainer(trm_old_policy="rollout", top_k=5)
    assert "\n" not in str(info.value)


def test_a_batch_without_rollout_logprobs_is_refused(make_trainer):
    trainer = make_trainer(trm_mode="none", trm_old_policy="rollout")
    batch = _batch(trainer)
    del batch["sampling_per_token_logps"]
    with pytest.raises(ValueError, match="trm_old_policy='rollout'` needs the rollout log-probs"):
        trainer._compute_loss(trainer.model, batch)


def test_the_ratio_factor_switch_is_named_as_ignored(tmp_path):
    with pytest.warns(UserWarning, match="trm_ratio_factor=False"):
        TRMConfig(**base_config_kwargs(tmp_path, trm_old_policy="rollout", trm_ratio_factor=False))


def test_sequence_level_ratio_is_against_the_rollout_policy(make_trainer):
    """`importance_sampling_level="sequence"` (GSPO): the ratio is exp(mean_t log π_θ/π_roll) per sequence."""
    trainer = make_trainer(
        bf16=False, loss_type="grpo", importance_sampling_level="sequence", trm_mode="none", trm_old_policy="rollout"
    )
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    batch = _batch(trainer, c=0.3, old_shift=0.15)
    batch["sampling_per_token_logps"][2] += 0.5  # row 2: mean log ratio -0.2, outside the clip on one side only
    model = trainer.model
    loss = trainer._compute_loss(model, batch)

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, batch["prompt_ids"].size(1) - 1 : -1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"].float()
    log_ratio = ((logps - batch["sampling_per_token_logps"]) * mask).sum(-1) / mask.sum(-1)  # (B,)
    coef_1 = torch.exp(log_ratio)[:, None]
    coef_2 = torch.clamp(coef_1, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
    adv = batch["advantages"][:, None]
    per_token = -torch.min(coef_1 * adv, coef_2 * adv).expand_as(mask)
    want = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_mask_evaluated_at_generation_weights_by_the_mask_alone(tiny_model_dir, toy_dataset, tmp_path):
    """`trm_mask_policy="generation"`: the mask's weights are built with π_old = π_roll, so an accepted token's weight
    is 1 (the default gives π_old/π_roll = e^0.3); the generation-time forward of the mask itself still runs."""
    settings = dict(trm_mask_policy="generation", num_iterations=2, trm_delta_max=10.0, trm_delta_avg=None)
    runs = {
        p: _train(
            tiny_model_dir, toy_dataset, tmp_path / p, rollout_func=shifted_rollout(0.3), trm_old_policy=p, **settings
        )
        for p in ("trainer", "rollout")
    }
    assert _logs(runs["rollout"], "trm/token_weight/mean") == pytest.approx([1.0], rel=1e-5)
    assert _logs(runs["trainer"], "trm/token_weight/mean") == pytest.approx([1.3499], rel=1e-3)


@pytest.mark.parametrize("mode", ["trm", "trm_exact", "geo_mask", "seq_mis", "token_mis", "none"])
def test_every_mask_mode_weights_by_its_mask_alone_with_pi_old_the_rollout(mode):
    """What `rollout_as_old_policy` gives `estimator_weights` (π_old = π_roll): the mode's own 0/1 mask, for every mode
    that composes with bypass (the factor π_old/π_roll is exactly 1)."""
    from trl_trm.loss_inputs import old_logps_for, rollout_as_old_policy
    from trl_trm.masking import mask_and_weights

    gen = torch.Generator().manual_seed(0)
    theta = -torch.rand(6, 9, generator=gen) * 3  # (B, T)
    sampling = theta - 0.003 * torch.randn(6, 9, generator=gen)
    sampling[0, 2] -= 1.0  # log ρ = 1 at one token of rows 0 and 3: every mode rejects it (token_mis the token)
    sampling[3, 7] -= 1.0
    mask = torch.ones(6, 9)
    mask[1, 5:] = 0
    inputs = {"sampling_per_token_logps": sampling, "old_per_token_logps": theta + 0.2, "trm_old_logps": theta}
    rollout_as_old_policy(inputs)
    old = old_logps_for(inputs, theta)
    assert old is sampling
    extra = {"kl_tok": (theta - sampling) ** 2} if mode == "trm_exact" else {}
    result, weights = mask_and_weights(theta, sampling, old, mask, mode=mode, **extra)
    assert torch.equal(weights, result.weights)
    assert set(weights.unique().tolist()) <= {0.0, 1.0}
    rejected = {"none": 0, "token_mis": 2}.get(mode, 9 + 9)  # weights lost: whole rows, or the two tokens
    assert int(mask.sum() - weights.sum()) == rejected
