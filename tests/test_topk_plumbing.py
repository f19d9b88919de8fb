"""The trainer's top-k plumbing in `trl_trm.topk` (start-up check, the vLLM turn record, a batch's top-k, coverage
counts, the KL inputs of the mask) and the old import paths of what moved to `trl_trm.lm_head`, without TRL."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trl_trm import lm_head, topk
from trl_trm.topk import SequenceTopK, check_topk_setup, completion_topk, record_vllm_generate, topk_coverage


def test_names_moved_to_lm_head_are_still_importable_from_topk():
    for name in ("head_logprobs_at", "FusedHeadCapture", "HEAD_CHUNK_ELEMENTS", "VOCAB_CHUNK"):
        assert getattr(topk, name) is getattr(lm_head, name)
        assert name in topk.__all__


def test_topk_setup_refuses_continuous_batching_and_tools():
    with pytest.raises(ValueError, match="continuous batching"):
        check_topk_setup(4, continuous_batching=True, rollout_func=False, tools=False)
    with pytest.raises(ValueError, match="does not support tool calling"):
        check_topk_setup(4, continuous_batching=False, rollout_func=False, tools=True)
    check_topk_setup(4, continuous_batching=True, rollout_func=True, tools=False)


def test_vllm_generate_is_recorded_and_restored():
    engine = SimpleNamespace(generate=lambda *a, **k: ("prompts", a, k))
    original = engine.generate
    with record_vllm_generate(engine) as returned:
        assert engine.generate(1, x=2) == ("prompts", (1,), {"x": 2})
    assert returned == [("prompts", (1,), {"x": 2})]
    assert engine.generate is original

    class Engine:
        def generate(self):
            return "class method"

    engine = Engine()
    with record_vllm_generate(engine) as returned:
        engine.generate()
    assert returned == ["class method"] and "generate" not in vars(engine)  # the shadow is removed, not left


def _seq(n, k=2):
    return SequenceTopK(torch.zeros(n, k), torch.arange(n * k).view(n, k), torch.ones(n, k, dtype=torch.bool))


def test_completion_topk_from_the_turn_or_from_a_rollout_func():
    recorded = [_seq(2), _seq(1)]
    assert completion_topk([[1, 2], [3]], 2, None, recorded) is recorded
    with pytest.raises(RuntimeError, match="recorded no top-k"):
        completion_topk([[1]], 2, None, None)
    with pytest.raises(ValueError, match="sequence 1 has 2 completion tokens but 1 top-k positions"):
        completion_topk([[1, 2], [3, 4]], 2, None, recorded)
    extra = {"topk_logprobs": [[[-0.1, -2.0]]], "topk_token_ids": [[[4, 5]]], "other": 1}
    (seq,) = completion_topk([[4]], 2, extra, None)
    assert extra == {"other": 1}  # popped: TRL would forward them to the reward functions
    assert seq.ids.tolist() == [[4, 5]] and seq.mask.all()


def test_topk_coverage_counts_short_lists_among_valid_tokens():
    batch = {
        "completion_mask": torch.tensor([[1, 1, 0]]),
        "trm_topk_mask": torch.tensor([[[True, True], [True, False], [False, False]]]),
    }
    assert topk_coverage(batch, k=2, vocab=512).tolist() == [[1.0, 2.0]]
    assert topk_coverage(batch, k=2, vocab=1).tolist() == [[0.0, 2.0]]  # min(k, V) entries suffice
    batch["tool_mask"] = torch.tensor([[1, 0, 1]])
    assert topk_coverage(batch, k=2, vocab=512).tolist() == [[0.0, 1.0]]


def test_kl_terms_need_theta_for_trm_exact_only():
    with pytest.raises(ValueError, match="needs the rollout top-k in the batch"):
        topk.topk_kl_terms({}, None, "trm_exact")
    assert topk.topk_kl_terms({}, None, "trm") == (None, None)
    roll = torch.log_softmax(torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(0)), -1)  # (B, T, V = 4)
    theta = torch.log_softmax(roll + 0.3, -1)
    ids = torch.arange(4).expand(1, 2, 4)
    sampled = torch.tensor([[0, 3]])
    batch = {
        "trm_topk_logprobs": roll,
        "trm_topk_ids": ids,
        "trm_topk_mask": torch.ones(1, 2, 4, dtype=torch.bool),
        "sampling_per_token_logps": roll.gather(-1, sampled.unsqueeze(-1)).squeeze(-1),
        "completion_ids": sampled,
    }
    theta_k = torch.cat([theta, theta.gather(-1, sampled.unsqueeze(-1))], -1)  # (B, T, k + 1)
    kl, chi2 = topk.topk_kl_terms(batch, theta_k, "trm_exact")
    exact = (roll.exp() * (roll - theta)).sum(-1)
    torch.testing.assert_close(kl, exact, rtol=1e-5, atol=1e-6)  # k = V: the exact KL
    assert chi2.shape == (1, 2) and bool((chi2 >= 0).all())
