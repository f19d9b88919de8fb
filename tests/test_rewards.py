"""Built-in rewards give exact values, and reward names resolve or fail with a clear message."""

from __future__ import annotations

import pytest

from trl_trm.rewards import BUILTIN_REWARDS, gsm8k_accuracy, hash_answer_format, resolve_reward_funcs, reversal


def test_reversal_reward_values():
    got = reversal(["cba", "abc", "", [{"role": "assistant", "content": " cb"}], "zzz"], target=["cba"] * 5)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(0.5 + 0.5 * 1 / 3)  # right letters, one position (b) right
    assert got[2] == 0.0
    assert got[3] == pytest.approx(0.5 + 0.5 * 2 / 3)  # conversational completion, stripped
    assert got[4] == 0.0


def test_gsm8k_accuracy_reads_the_hash_answer():
    answers = ["... so 3 + 4 = 7\n#### 7", "#### 1,200", "#### -3"]
    completions = ["I think 7", "The answer is 1200.\n#### 1,200", "#### 3"]
    assert gsm8k_accuracy(completions, answer=answers) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="#### <number>"):
        gsm8k_accuracy(["1"], answer=["no number here"])


def test_hash_answer_format():
    assert hash_answer_format(["x\n#### 12", "12", "#### 1.5 "]) == [1.0, 0.0, 1.0]


def test_resolve_builtin_and_import_paths(tmp_path, monkeypatch):
    (tmp_path / "const_rewards.py").write_text("def const(completions, **kw):\n    return [0.25] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = resolve_reward_funcs(["reversal", "const_rewards:const", "const_rewards.const"])
    assert funcs[0] is BUILTIN_REWARDS["reversal"]
    assert funcs[1](["a", "b"]) == [0.25, 0.25] and funcs[2] is funcs[1]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "No reward function"),
        (["accuracy"], "Unknown reward function 'accuracy'"),
        (["no_such_module_xyz:f"], "Cannot import the module of reward function 'no_such_module_xyz:f'"),
        (["trl_trm.rewards:nope"], "has no callable named 'nope'"),
    ],
)
def test_bad_reward_names_fail_clearly(names, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward_funcs(names)


@pytest.mark.parametrize(
    ("completion", "ref", "expected"),
    [
        ("#### 72\nCheck: 72/2=36", "#### 72", 1.0),  # the marked answer wins over later numbers
        ("12-5", "#### 5", 1.0),  # a hyphen between numbers is not a sign
        ("so the answer is -3", "#### -3", 1.0),
        ("total $1,200.50.", "#### 1200.5", 1.0),
        ("#### $5", "#### 5", 1.0),
        ("it is .5", "#### 0.5", 1.0),
        ("no number", "#### 1", 0.0),
    ],
)
def test_gsm8k_answer_extraction(completion, ref, expected):
    assert gsm8k_accuracy([completion], answer=[ref]) == [expected]


def test_hash_format_accepts_a_trailing_period_and_dollar():
    assert hash_answer_format(["#### 3.", "#### $5", "####"]) == [1.0, 1.0, 0.0]
