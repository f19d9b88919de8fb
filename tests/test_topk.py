"""`trl_trm.topk`: rollout top-k parsing (vLLM, rollout_func, transformers scores), the KL partition with the sampled
token, and π_θ's log-probs at stored ids from hidden states (chunked, as TRL's fused head)."""

from __future__ import annotations

import math

import pytest
import torch

from trl_trm.masking import topk_token_kl
from trl_trm.rollout import processed_logprobs
from trl_trm.topk import (
    check_distinct_ids,
    from_padded,
    from_rollout_func,
    from_vllm,
    head_logprobs_at,
    ids_with_sampled,
    pad_topk,
    rollout_topk_kl,
)


# --------------------------------------------------------------------------- vLLM output parsing
def _vllm_position(logp: torch.Tensor, sampled: int, k: int):
    """What vLLM returns at one position with `logprobs=k`: the sampled token plus the top-k, sorted by descending
    probability (k entries when the sampled token is among the top-k, k + 1 otherwise)."""
    top = logp.topk(k).indices.tolist()
    ids = top if sampled in top else top + [sampled]
    ids = sorted(ids, key=lambda i: -float(logp[i]))
    return [float(logp[i]) for i in ids], ids


def test_vllm_sampled_logprob_is_matched_by_id_not_taken_first():
    logp = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0]), dim=-1)
    completion = [[0, 4, 2]]  # top-1, outside the top-2, inside the top-2... at three positions
    lps, ids = zip(*(_vllm_position(logp, s, k=2) for s in completion[0]), strict=True)
    sampled, topk = from_vllm(completion, [list(lps)], [list(ids)], k=2)
    torch.testing.assert_close(torch.tensor(sampled[0]), logp[[0, 4, 2]])  # never lp[0] (the top-1) at t = 1, 2
    assert sampled[0][1] != lps[1][0]
    s = topk[0]
    assert s.ids.tolist() == [[0, 1]] * 3  # the sampled token outside the top-2 is not kept in the top-k slots
    torch.testing.assert_close(s.logprobs, logp[[0, 1]].expand(3, 2))
    assert s.mask.all()


def test_vllm_none_becomes_nan_and_short_lists_are_masked():
    sampled, topk = from_vllm([[7, 3]], [[[-0.1, None], [-0.5]]], [[[7, 2], [3]]], k=4)
    assert sampled[0][0] == pytest.approx(-0.1)
    assert math.isnan(topk[0].logprobs[0, 1])
    assert topk[0].mask.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert topk[0].ids[1].tolist() == [3, 0, 0, 0]


def test_vllm_errors():
    with pytest.raises(ValueError, match="do not include the sampled token 5"):
        from_vllm([[5]], [[[-0.1, -0.2]]], [[[1, 2]]], k=2)
    with pytest.raises(ValueError, match="expected one per token"):
        from_vllm([[5, 6]], [[[-0.1]]], [[[5]]], k=2)
    with pytest.raises(ValueError, match="logprob_token_ids"):
        from_vllm([[5]], [[[-0.1]]], None, k=2)


# --------------------------------------------------------------------------- rollout_func lists
def test_rollout_func_lists_short_and_errors():
    seqs = from_rollout_func([[[-0.1, -2.0], [-0.3]]], [[[4, 9], [1]]], [[4, 1]], k=3)
    s = seqs[0]
    assert s.mask.tolist() == [[True, True, False], [True, False, False]]
    assert s.ids.tolist() == [[4, 9, 0], [1, 0, 0]]
    assert s.logprobs.dtype == torch.float32
    with pytest.raises(ValueError, match="at most `trm_rollout_topk=1`"):
        from_rollout_func([[[-0.1, -2.0]]], [[[4, 9]]], [[4]], k=1)
    with pytest.raises(ValueError, match="1 completion tokens but 2"):
        from_rollout_func([[[-0.1], [-0.2]]], [[[4], [5]]], [[4]], k=1)
    with pytest.raises(ValueError, match="did not return"):
        from_rollout_func(None, None, [[4]], k=1)
    with pytest.raises(ValueError, match="same number of each"):
        from_rollout_func([[[-0.1, -0.2]]], [[[4]]], [[4]], k=2)


def test_pad_topk_and_duplicate_ids():
    seqs = from_rollout_func([[[-0.1]], [[-0.2], [-0.3]]], [[[4]], [[5], [6]]], [[4], [5, 6]], k=2)
    batch = pad_topk(seqs, length=3, k=2, device="cpu")
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "trm_topk_logprobs": (2, 3, 2),
        "trm_topk_ids": (2, 3, 2),
        "trm_topk_mask": (2, 3, 2),
    }
    assert batch["trm_topk_mask"].sum().item() == 3  # padding rows and unused slots are masked
    with pytest.raises(ValueError, match="repeat within a position"):
        check_distinct_ids(torch.tensor([[3, 3]]), torch.tensor([[True, True]]))
    check_distinct_ids(torch.tensor([[3, 3]]), torch.tensor([[True, False]]))  # an unused slot may hold anything


# --------------------------------------------------------------------------- transformers scores
def test_processed_logprobs_topk_and_small_vocabulary():
    g = torch.Generator().manual_seed(0)
    scores = tuple(torch.randn(2, 6, generator=g) for _ in range(3))
    scores[1][0, 2:] = -math.inf  # a top-k/top-p warper left only 2 tokens
    sequences = torch.tensor([[9, 1, 0, 5], [9, 2, 3, 4]])
    sampled, top, ids = processed_logprobs(scores, sequences, topk=4)
    full = torch.stack([torch.log_softmax(s, -1) for s in scores], dim=1)  # (2, 3, 6)
    torch.testing.assert_close(sampled, full.gather(-1, sequences[:, 1:, None]).squeeze(-1))
    torch.testing.assert_close(top, full.topk(4, dim=-1).values)
    assert torch.equal(full.gather(-1, ids), top)
    assert top[0, 1, 2:].eq(-math.inf).all()  # removed tokens are exact zero probabilities, not missing data
    seqs = from_padded(*processed_logprobs(scores, sequences, topk=8)[1:], lengths=[3, 2], k=8)  # k > V = 6
    assert seqs[0].mask.sum(-1).tolist() == [6, 6, 6] and len(seqs[1]) == 2


# --------------------------------------------------------------------------- KL over top-k + sampled + rest
def _partition_kl(log_p: torch.Tensor, log_q: torch.Tensor, ids: list[int]) -> float:
    """KL between the bucketed distributions {each id} + {rest}, by hand."""
    p, q = log_p.exp(), log_q.exp()
    total = sum(float(p[i] * (log_p[i] - log_q[i])) for i in ids)
    p_rest, q_rest = 1 - float(p[ids].sum()), 1 - float(q[ids].sum())
    return total + (p_rest * math.log(p_rest / q_rest) if p_rest > 1e-12 else 0.0)


@pytest.mark.parametrize("sampled_in_topk", [True, False])
def test_rollout_topk_kl_adds_the_sampled_token_once(sampled_in_topk):
    g = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.randn(10, generator=g, dtype=torch.float64) * 2, -1)
    log_q = torch.log_softmax(log_p + 0.3 * torch.randn(10, generator=g, dtype=torch.float64), -1)
    top = log_p.topk(3).indices
    sampled = int(top[1]) if sampled_in_topk else int(log_p.topk(10).indices[-1])
    ids = ids_with_sampled(top.view(1, 1, 3), torch.tensor([[sampled]]))  # (1, 1, 4)
    kl = rollout_topk_kl(
        log_p[top].view(1, 1, 3),
        top.view(1, 1, 3),
        torch.ones(1, 1, 3, dtype=torch.bool),
        log_p[sampled].view(1, 1),
        torch.tensor([[sampled]]),
        log_q[ids],
    )
    want = _partition_kl(log_p, log_q, sorted(set(top.tolist()) | {sampled}))
    assert kl.item() == pytest.approx(want, rel=1e-10)
    exact = float((log_p.exp() * (log_p - log_q)).sum())
    assert kl.item() <= exact + 1e-12


def test_nan_in_a_used_slot_makes_the_kl_nan():
    roll = torch.log_softmax(torch.randn(2, 3, 4, dtype=torch.float64), -1)
    theta = roll.clone()
    roll[0, 1, 2] = float("nan")
    theta[1, 0, 0] = float("inf")
    kl = topk_token_kl(roll, theta)
    assert math.isnan(kl[0, 1]) and math.isnan(kl[1, 0])
    assert int(torch.isnan(kl).sum()) == 2
    mask = torch.ones_like(roll, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 0, 0] = False  # the same values in unused slots are ignored
    assert bool(torch.isfinite(topk_token_kl(roll, theta, mask)).all())


# --------------------------------------------------------------------------- π_θ at stored ids from hidden states
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_head_logprobs_at_matches_dense_log_softmax(softcap):
    g = torch.Generator().manual_seed(2)
    hidden, weight, bias = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50)
    ids = torch.stack([torch.randperm(50, generator=g)[:5] for _ in range(7)])  # (7, 5)
    z = (hidden @ weight.T + bias) * 0.5
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    dense = torch.log_softmax(z / 0.7, -1)  # (7, 50)
    kwargs = dict(temperature=0.7, final_logit_softcapping=softcap, logit_scale=0.5)
    got = head_logprobs_at(hidden, weight, bias, ids, **kwargs)
    torch.testing.assert_close(got, dense.gather(-1, ids), rtol=1e-5, atol=1e-5)
    chunked = head_logprobs_at(hidden, weight, bias, ids, max_chunk_elements=60, **kwargs)  # one row at a time
    torch.testing.assert_close(chunked, got, rtol=1e-6, atol=1e-5)  # float32 rounding only
    with pytest.raises(ValueError, match=r"in \[0, 50\)"):
        head_logprobs_at(hidden, weight, bias, ids + 50)


def test_head_logprobs_at_uses_the_compute_dtype():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(4, 32, generator=g), torch.randn(40, 32, generator=g)
    ids = torch.arange(40).expand(4, 40)
    bf16 = head_logprobs_at(hidden, weight, None, ids, compute_dtype=torch.bfloat16)
    want = torch.log_softmax((hidden.bfloat16() @ weight.bfloat16().T).float(), -1)
    torch.testing.assert_close(bf16, want, rtol=1e-6, atol=1e-5)  # float32 rounding only
    assert not torch.allclose(bf16, head_logprobs_at(hidden, weight, None, ids), rtol=0, atol=1e-3)


@pytest.mark.parametrize("k", [512, 511, 20])
def test_float32_rounding_is_not_read_as_kl(k):
    """Two float32 log-softmaxes of the same logits (computed in different orders) differ only by rounding: the KL
    between them must stay at rounding level, not be inflated by a rest bucket made of normalisation error."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 6, 512, generator=g)  # (B, T, V) near-uniform, as the tiny model
    log_p = torch.log_softmax(logits, -1)  # float32
    log_q = torch.log_softmax(logits.flip(-1), -1).flip(-1)  # same values, another summation order
    ids = log_p.topk(k, dim=-1).indices
    kl = topk_token_kl(log_p.gather(-1, ids), log_q.gather(-1, ids))
    assert kl.dtype == torch.float32
    assert float(kl.max()) < 1e-6
    # one float32 ulp apart, in opposite directions: 1 - sum p > 0 and 1 - sum q < 0 by rounding alone. Computed with
    # a float64 tolerance, that "rest" would read as a KL of ~7e-6.
    low, high = torch.nextafter(log_p, log_p - 1), torch.nextafter(log_q, log_q + 1)
    nudged = topk_token_kl(low.gather(-1, ids), high.gather(-1, ids))
    assert float(nudged.max()) < 1e-6
    real = torch.log_softmax(logits + 0.01 * torch.randn(logits.shape, generator=g), -1)  # a real mismatch
    assert float(topk_token_kl(log_p.gather(-1, ids), real.gather(-1, ids)).min()) > (1e-5 if k > 20 else 1e-7)
