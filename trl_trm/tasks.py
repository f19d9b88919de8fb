"""Built-in tasks: a dataset built locally (no download) together with the reward that grades it.

A recipe selects one with `dataset_name: builtin:<name>` and names its reward in `reward_funcs`:

| task | prompts | reward (`reward_funcs`) |
|---|---|---|
| `builtin:reversal` | "reverse: <word>" (2-4 letters from a-j), the reversed word in `target` | `reversal`: graded in [0, 1] |

`trl-trm train`, `trl-trm demo`, the benchmarks and the mismatch study all take their task from here, so the
task's data and its grading live in one place. This module imports neither torch nor TRL (`datasets` on use).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

BUILTIN_PREFIX = "builtin:"


def _text(completion) -> str:
    """A completion is a string (standard prompts) or a list of messages (conversational prompts)."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def reversal(completions, target, **kwargs) -> list[float]:
    """Exact, graded reward in [0, 1] for string reversal: half for using only the word's letters, half for matching
    the reversal position by position (1.0 = the exact reversal and nothing else). The first half gives a random
    model a learning signal.

    Args:
        completions: the generated completions (strings, or message lists for conversational prompts).
        target: the `target` column: the reversed word of each prompt.

    Returns:
        One reward in [0, 1] per completion.
    """
    rewards = []
    for completion, want in zip(completions, target, strict=True):
        got = _text(completion).strip()
        if not got:
            rewards.append(0.0)
            continue
        letters = sum(c in want for c in got) / len(got)
        hits = sum(a == b for a, b in zip(got, want, strict=False)) / max(len(want), len(got))
        rewards.append(0.5 * letters + 0.5 * hits)
    return rewards


def reversal_dataset(n: int, seed: int):
    """`n` conversational prompts "reverse: <word>" (2-4 letters from a-j) with the reversed word in `target`.

    Args:
        n: number of rows.
        seed: seed of the word generator (the same seed gives the same rows).

    Returns:
        A `datasets.Dataset` with the columns `prompt` (one user message) and `target`.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": [{"role": "user", "content": f"reverse: {word}"}], "target": word[::-1]})
    return Dataset.from_list(rows)


@dataclass(frozen=True)
class Task:
    """A built-in task.

    Args:
        build: `build(n, seed) -> datasets.Dataset` with a `prompt` column.
        rewards: names of the reward functions that grade it (keys of `trl_trm.rewards.BUILTIN_REWARDS`).
        train_rows: rows of the `train` split.
        test_rows: rows of the `test` split (built with `seed + 1`, so it does not repeat the training rows' order).
    """

    build: Callable
    rewards: tuple[str, ...]
    train_rows: int = 512
    test_rows: int = 64


BUILTIN_TASKS: dict[str, Task] = {"reversal": Task(build=reversal_dataset, rewards=("reversal",))}


def load_builtin_dataset(name: str, split: str, seed: int):
    """The `split` ("train" or "test") of the built-in task `name` (`builtin:reversal` or `reversal`).

    Raises:
        ValueError: naming the task or split when it does not exist, and the ones that do.
    """
    which = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else name
    if which not in BUILTIN_TASKS:
        raise ValueError(
            f"Unknown built-in dataset {name!r}: available: {', '.join(BUILTIN_PREFIX + t for t in BUILTIN_TASKS)}."
        )
    task = BUILTIN_TASKS[which]
    if split == "train":
        return task.build(task.train_rows, seed)
    if split == "test":
        return task.build(task.test_rows, seed + 1)
    raise ValueError(
        f"Built-in dataset {name!r} has the splits 'train' and 'test', not {split!r}: set `dataset_train_split` / "
        "`dataset_test_split` to one of them."
    )
