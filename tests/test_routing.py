"""MoE routing (trl_trm/routing.py): routes recorded during generation, compared with the training forward's, and
replayed (R3) at the `*TopKRouter` seam, on tiny MoE models built locally."""

from __future__ import annotations

import pytest
import torch
import transformers

from trl_trm import routing
from trl_trm.moe import router_modules

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts_per_tok=2,
)
ARCHS = {  # architecture -> (config class, model class, its own kwargs)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=16)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(num_local_experts=4, layer_types=["full_attention", "full_attention"]),
    ),
}


def tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, own = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **own, **overrides})
    model = getattr(transformers, model_cls)(config)
    for router in router_modules(model):  # zero-initialised routers would tie every expert: spread them
        torch.nn.init.normal_(router.weight, std=0.5)
    return model.eval()


def own_routes(model, ids, mask=None) -> torch.Tensor:
    with routing.RouteRecorder(model) as recorder:
        model(input_ids=ids, attention_mask=mask)
    return recorder.routes(ids.size(0))[0]  # (B, S, L, k)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_replaying_the_forwards_own_routes_changes_nothing(arch):
    """The scores recomputed over forced experts are the architecture's: forcing a forward's own routes gives the
    same logits bit for bit, and the forcer records those routes as the forward's own."""
    model = tiny(arch)
    ids = torch.randint(0, 64, (3, 7))
    routes = own_routes(model, ids)
    assert routes.dtype == torch.int16 and routes.shape == (3, 7, 2, 2)
    plain = model(input_ids=ids).logits
    forcer = routing.RouteForcer(model, replay=True)
    forcer.arm(routes)
    forced = model(input_ids=ids).logits
    assert torch.equal(forcer.own_routes(), routes)
    forcer.remove()
    assert torch.equal(plain, forced)


def _biased_gpt_oss(expert_bias: float) -> torch.nn.Module:
    """GPT-OSS whose router bias makes expert 3 never (-100) or always (+100) chosen; the rest is identical."""
    model = tiny("gpt_oss")
    with torch.no_grad():
        for router in router_modules(model):
            router.bias.zero_()
            router.bias[3] = expert_bias
    return model


def test_replay_gives_the_rollout_routing_paths_log_probs():
    """Hand-built: the 'rollout' never routes to expert 3, the 'trainer' always does (same weights otherwise).
    GPT-OSS's gate weights are a softmax over the chosen experts' logits, which the two share: with the rollout's
    routes replayed the trainer's log-probs are the rollout's; without, they differ."""
    rollout, trainer = _biased_gpt_oss(-100.0), _biased_gpt_oss(100.0)
    ids = torch.randint(0, 64, (2, 9))
    rollout_routes = own_routes(rollout, ids)
    assert not (rollout_routes == 3).any()
    expected = torch.log_softmax(rollout(input_ids=ids).logits, -1)
    free = torch.log_softmax(trainer(input_ids=ids).logits, -1)
    forcer = routing.RouteForcer(trainer, replay=True)
    forcer.arm(rollout_routes)
    replayed = torch.log_softmax(trainer(input_ids=ids).logits, -1)
    assert (forcer.own_routes() == 3).any(dim=-1).all()  # without replay every position would use expert 3
    assert (free - expected).abs().max() > 1e-2
    torch.testing.assert_close(replayed, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_the_router_still_gets_a_gradient_under_replay(arch):
    model = tiny(arch).train()
    ids = torch.randint(0, 64, (2, 6))
    other = tiny(arch, seed=1)
    forced = own_routes(other, ids)  # another model's routes: most differ from this one's
    forcer = routing.RouteForcer(model, replay=True)
    forcer.arm(forced)
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    for router in router_modules(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert not torch.equal(forcer.own_routes(), forced)  # the routes really were replaced


def test_replay_survives_the_recomputation_of_gradient_checkpointing():
    """Under gradient checkpointing the backward re-runs each layer's forward: it must see the replayed routes too,
    so the gradient equals the one without checkpointing."""
    ids = torch.randint(0, 64, (2, 6))
    forced = own_routes(tiny("qwen3_moe", seed=1), ids)
    grads = []
    for checkpointing in (False, True):
        model = tiny("qwen3_moe").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        forcer = routing.RouteForcer(model, replay=True)
        forcer.arm(forced)
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        grads.append(torch.cat([r.weight.grad.flatten() for r in router_modules(model)]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_generation_routes_match_an_identical_training_forward():
    """Identical engines (fp32 both): the routes recorded while generating from left-padded prompts, laid out for the
    training batch, agree with the training forward's own on 100 % of the positions, prompt included."""
    model = tiny("qwen3_moe")
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    mask = (ids != 0).long()
    with routing.RouteRecorder(model) as recorder, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=6, min_new_tokens=6)
    routes, width = recorder.routes(2)
    assert width == 5 and routes.shape[:2] == (2, 5 + 5)  # the last sampled token is never fed back
    completions = [out[i, 5:].tolist() for i in range(2)]
    rows = routing.per_sample_routes(routes, width, [5, 3], [6, 6])
    assert [r.shape[0] for r in rows] == [11, 9] and (rows[0][-1] == -1).all() and (rows[0][:-1] >= 0).all()
    # The training layout: prompts left-padded to 5, completions right after.
    batch = routing.pad_routes(rows, [5, 3], 5, 11)  # (B, 11, L, k)
    train_ids = torch.tensor([p + c for p, c in zip([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]], completions, strict=True)])
    forcer = routing.RouteForcer(model, replay=False)
    forcer.arm(batch)
    with torch.no_grad():
        model(input_ids=train_ids, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1))
    own = forcer.own_routes()
    recorded = batch >= 0
    assert recorded.sum() > 0 and torch.equal(own[recorded], batch[recorded])
    any_layer, per_layer = routing.disagreement(batch, own, torch.ones(2, 6))
    assert not any_layer.any() and per_layer.shape == (2, 6, 2)
    assert routing.counted_tokens(batch, torch.ones(2, 6)).all()  # each token's predicting position was recorded


def test_disagreement_is_per_predicting_position_and_ignores_expert_order():
    rollout = torch.zeros(1, 4, 2, 2, dtype=torch.int16)  # P = 1, C = 3, L = 2, k = 2
    rollout[..., 1] = 1
    trained = rollout.clone()
    trained[0, 0, 0] = torch.tensor([1, 0])  # same set, other order: agrees
    trained[0, 2, 1] = torch.tensor([0, 2])  # layer 1 at position 2 predicts completion token 2
    trained[0, 3, 0] = torch.tensor([3, 2])  # the last position predicts nothing scored
    any_layer, per_layer = routing.disagreement(rollout, trained, torch.ones(1, 3))
    assert any_layer.tolist() == [[False, False, True]]
    assert per_layer[0, 2].tolist() == [False, True]


def test_replay_refuses_unsupported_routers_by_name():
    model = transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(**{**COMMON, "num_local_experts": 4}))
    problem = routing.replay_problem(model)
    assert problem is not None and "GraniteMoeTopKRouter" in problem
    assert routing.replay_problem(tiny("qwen3_moe")) is None
    dense = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
    assert "no `*TopKRouter`" in routing.replay_problem(dense)


def test_replay_without_recorded_routes_is_an_error():
    """A batch whose generation recorded no routes (a replaced `generate`) cannot be replayed: an error, not a silent
    no-op; without replay the batch simply carries no routes."""
    model = tiny("qwen3_moe")
    batch = {"prompt_ids": torch.zeros(2, 3, dtype=torch.long), "completion_ids": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="recorded no routes"):
        routing.TrainerRouting(model, replay=True).take(dict(batch))
    plain = dict(batch)
    routing.TrainerRouting(model, replay=False).take(plain)
    assert routing.ROUTES_KEY not in plain


def test_armed_routes_stay_int16():
    """The forcer keeps the (L, B·S, k) routes in int16 (widened per router call), not an int64 copy 4x the size."""
    from trl_trm.routing import RouteForcer

    class _Router(torch.nn.Module):
        pass

    _Router.__name__ = "ToyTopKRouter"
    model = torch.nn.Sequential(_Router(), _Router())
    forcer = RouteForcer(model, replay=False)
    forcer.arm(torch.zeros(2, 3, 2, 2, dtype=torch.int16))
    assert forcer._routes.dtype == torch.int16 and forcer._routes.shape == (2, 6, 2)
