"""`trl_trm.rollout.RolloutLogprobChecks` and `recording_problem`: the trainer's checks of the rollout log-probs, on
hand-built recorders and `_generate` results, without TRL."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from trl_trm.rollout import RolloutLogprobChecks, recording_problem


def _recorder(tokens=None, logprobs=None, problem=None):
    tokens = None if tokens is None else torch.tensor(tokens)
    logprobs = None if logprobs is None else torch.tensor(logprobs)
    return SimpleNamespace(token_ids=tokens, logprobs=logprobs, problem=problem)


def test_recorded_logprobs_are_cut_to_each_completion():
    recorder = _recorder([[5, 6, 7], [8, 9, 0]], [[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6]])
    got = RolloutLogprobChecks().recorded(recorder, [[5, 6, 7], [8]], "trm")
    assert got == [pytest.approx([-0.1, -0.2, -0.3]), pytest.approx([-0.4])]


def test_an_empty_generation_records_nothing_and_needs_nothing():
    assert RolloutLogprobChecks().recorded(_recorder(), [[], []], "trm") == [[], []]


@pytest.mark.parametrize(
    ("recorder", "completions", "message"),
    [
        (_recorder(problem="greedy_search (do_sample=False)"), [[1]], "ran in greedy_search"),
        (_recorder(), [[1, 2]], "no token was sampled through transformers' decoding loop"),
        (_recorder([[1, 2]], [[-1.0, -1.0]]), [[1, 2], [1, 2]], "recorded 1 sampled rows for 2 completions"),
        (_recorder([[1, 2]], [[-1.0, -1.0]]), [[1, 3]], "Completion 0 is not the token sequence"),
        (_recorder([[1, 2]], [[-1.0, -1.0]]), [[1, 2, 3]], "Completion 0 is not the token sequence"),
    ],
)
def test_each_recording_problem_is_named(recorder, completions, message):
    assert message in recording_problem(recorder, completions)
    with pytest.raises(ValueError, match=r"^`trm_mode='trm'` needs the rollout log-probs: "):
        RolloutLogprobChecks().recorded(recorder, completions, "trm")


def test_with_trm_mode_none_a_missing_recording_warns_once_per_trainer():
    checks = RolloutLogprobChecks()
    with pytest.warns(UserWarning, match="The trm/ diagnostics are skipped"):
        assert checks.recorded(_recorder(), [[1]], "none") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checks.recorded(_recorder(), [[1]], "none") is None
        checks.generated([[1]], None, "none", rollout_func=False)  # the same warning budget
    with pytest.warns(UserWarning, match="No rollout log-probs are available"):
        RolloutLogprobChecks().generated([[1]], None, "none", rollout_func=False)  # a new trainer warns again


def test_generated_logprobs_must_exist_and_match_the_completion_lengths():
    checks = RolloutLogprobChecks()
    with pytest.raises(ValueError, match="but `rollout_func` returned `logprobs=None`"):
        checks.generated([[1]], None, "trm", rollout_func=True)
    with pytest.raises(ValueError, match="but the generation backend returned `logprobs=None`"):
        checks.generated([[1]], None, "token_tis", rollout_func=False)
    with pytest.raises(ValueError, match="sequence 1 has 2 completion tokens but 1 log-probs"):
        checks.generated([[1], [2, 3]], [[-0.5], [-0.5]], "trm", rollout_func=False)
    with pytest.raises(ValueError, match="looks like a probability"):  # a rollout_func's values are checked too
        checks.generated([[1]], [[0.5]], "trm", rollout_func=True)
    checks.generated([[1], [2, 3]], [[-0.5], [-0.5, -1.0]], "trm", rollout_func=True)
