"""`trl_trm.window.MetricsWindow`: gathered per-sequence statistics of every micro-batch in, one value per `trm/` key
out, without TRL (the trainer only gathers and hands tensors over)."""

from __future__ import annotations

import math

import pytest
import torch

from trl_trm.masking import compute_trust_region_mask, summarize_mask_stats
from trl_trm.window import MetricsWindow, pack_sequence_stats, sequence_statistics


def _batch(seed: int, batch: int = 4, length: int = 6, kl: bool = False):
    g = torch.Generator().manual_seed(seed)
    theta = -torch.rand(batch, length, generator=g) * 3
    roll = theta + 0.2 * torch.randn(batch, length, generator=g)
    mask = torch.ones(batch, length)
    mask[0, 4:] = 0
    kl_tok = (torch.rand(batch, length, generator=g) * 0.01) if kl else None
    mode, delta_kl = ("trm_exact", 1.0) if kl else ("trm", None)
    result = compute_trust_region_mask(theta, roll, mask, mode=mode, kl_tok=kl_tok, delta_kl=delta_kl)
    return result, mask


def _add(window, mode, result, advantages=None, mask=None):
    names, packed = pack_sequence_stats(sequence_statistics(result, advantages, mask))
    window.add_sequences(mode, names, packed)  # one process: gathering is the identity
    return names, packed


def test_max_of_a_window_is_the_max_over_every_micro_batch():
    window = MetricsWindow()
    results = [_batch(seed)[0] for seed in range(3)]
    for result in results:
        _add(window, "train", result)
    out = window.flush("train")
    per_batch = [float(r.log_ratio_abs_max[r.length > 0].max()) for r in results]
    assert out["trm/log_ratio_abs_max/max"] == max(per_batch)
    assert out["trm/log_ratio_abs_max/max"] > min(per_batch)  # not the last batch's, nor a mean of maxima
    mean_of_maxima = sum(per_batch) / len(per_batch)
    assert out["trm/log_ratio_abs_max/max"] != pytest.approx(mean_of_maxima)


def test_window_equals_one_reduction_over_the_concatenated_sequences():
    """What the trainer logged before the window class existed: `summarize_mask_stats` over the concatenation."""
    window = MetricsWindow()
    stats = []
    for seed in range(3):
        result, mask = _batch(seed)
        advantages = torch.randn(4, generator=torch.Generator().manual_seed(seed))
        _add(window, "train", result, advantages, mask)
        stats.append(sequence_statistics(result, advantages, mask))
    want = summarize_mask_stats(
        {k: torch.cat([s[k].double() for s in stats]) for k in stats[0]}, kl_tok_lower_bound=True
    )
    got = window.flush("train")
    assert got.keys() == want.keys()
    assert all(got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])) for k in want)


def test_empty_window_emits_nothing_and_a_flush_clears():
    window = MetricsWindow()
    assert window.flush("train") == {}
    _add(window, "train", _batch(0)[0])
    assert window.flush("eval") == {}  # modes are separate
    assert "trm/accept_rate" in window.flush("train")
    assert window.flush("train") == {}


def test_lb_suffix_unless_the_top_k_covers_the_head_vocabulary():
    window = MetricsWindow()
    _add(window, "train", _batch(0, kl=True)[0])
    assert "trm/kl_tok_max_lb/max" in window.flush("train", topk=8)  # no head seen yet: a lower bound
    window.head_vocab = 16
    _add(window, "train", _batch(0, kl=True)[0])
    out = window.flush("train", topk=8)
    assert "trm/kl_tok_max_lb/max" in out and "trm/kl_tok_max/max" not in out
    _add(window, "train", _batch(0, kl=True)[0])
    out = window.flush("train", topk=16)
    assert "trm/kl_tok_max/max" in out and "trm/kl_tok_max_lb/max" not in out


def test_keys_missing_from_one_micro_batch_are_dropped():
    window = MetricsWindow()
    _add(window, "train", _batch(0, kl=True)[0])
    _add(window, "train", _batch(1, kl=False)[0])
    out = window.flush("train", topk=8)
    assert not any(key.startswith(("trm/kl_tok_max", "trm/kl_tok_mean")) for key in out)
    assert "trm/accept_rate" in out


def test_topk_coverage_and_seq_tis_clips():
    window = MetricsWindow()
    window.add_topk_coverage("train", torch.tensor([1.0, 10.0]))
    window.add_topk_coverage("train", torch.tensor([2.0, 20.0]))
    window.add_clip("train", 2.0)
    window.add_clip("train", 3.0)
    out = window.flush("train")
    assert out == {"trm/topk_missing_frac": 3.0 / 30.0, "trm/seq_tis_clip": 2.5}
    window.add_topk_coverage("train", torch.tensor([0.0, 0.0]))  # no valid token: no ratio
    assert window.flush("train") == {}


def test_adaptive_step_counts_and_thresholds():
    window = MetricsWindow()
    assert window.step_accept_rate() is None
    result, _ = _batch(0)
    names, packed = _add(window, "train", result)
    window.count_step("train", names, packed, 0.5, None)
    window.count_step("train", names, packed, 0.7, None)
    nonempty = result.length > 0
    kept = float(result.keep[nonempty].float().sum())
    assert window.step_accept_rate() == (2 * kept) / (2 * float(nonempty.sum()))
    assert window.step_accept_rate() is None  # a new step starts empty
    out = window.flush("train")
    assert out["trm/delta_max"] == (0.5 + 0.7) / 2  # TRL's average of the values logged since the last log
    assert math.isnan(out["trm/delta_avg"])  # a criterion that is off (TRL's `log` reports None)


def test_empty_sequences_do_not_count_toward_the_step():
    window = MetricsWindow()
    names = ["keep", "length"]
    gathered = torch.tensor([[1.0, 3.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # row 1: no tokens
    window.count_step("train", names, gathered, 0.1, 0.1)
    assert window.step_accept_rate() == 0.5


def test_per_token_advantages_are_averaged_over_the_mask():
    result, mask = _batch(0)
    advantages = torch.arange(24, dtype=torch.float32).view(4, 6)
    stats = sequence_statistics(result, advantages, mask)
    assert stats["advantage"][0] == pytest.approx(float(advantages[0, :4].mean()))
    assert stats["advantage"][1] == pytest.approx(float(advantages[1].mean()))
    names, packed = pack_sequence_stats(stats)
    assert packed.dtype == torch.float64 and packed.shape == (4, len(names))
    assert torch.equal(packed[:, names.index("advantage")], stats["advantage"].double())
