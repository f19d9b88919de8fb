"""Built-in reward functions (TRL signature: `f(completions, **dataset_columns) -> list[float]`) and name resolution.

Recipes name rewards in `reward_funcs` as `trl grpo` does: a built-in name below, one of TRL's reward names
(`accuracy_reward`, `reasoning_accuracy_reward`, `think_format_reward`, `get_soft_overlong_punishment`, resolved to
`trl.rewards` exactly as `trl/scripts/grpo.py` does), or an import path `package.module:function`
(`package.module.function` also works) importable from the working directory.

| name | task | reward |
|---|---|---|
| `reversal` | `builtin:reversal` (demo; defined in `trl_trm/tasks.py`) | graded in [0, 1]; 1.0 = exact reversal of the `target` column |
| `gsm8k_accuracy` | GSM8K-style data with an `answer` column ending in `#### <number>` | 1.0 when the last number of the completion equals it, else 0.0 |
| `hash_answer_format` | any | 1.0 when the completion ends with a `#### <number>` line, else 0.0 |
"""

from __future__ import annotations

import functools
import importlib
import inspect
import numbers
import os
import re
import sys
from collections.abc import Callable

from .tasks import _text, reversal

# A number: optional sign only at the start or after whitespace/`(`/`$`/`=`, digits with `,` groups, optional decimals.
_NUMBER = re.compile(
    r"(?:(?<=^)|(?<=[\s($=:]))-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)|(?<![\d.])\d[\d,]*(?:\.\d+)?|(?<![\d.])\.\d+"
)
# The final answer line: `#### 1,234`, `#### -3.5`, `#### $5`, `#### 7.` (trailing period or unit-free).
_HASH_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)\s*\.?\s*$")
_HASH_ANY = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _final_number(text: str) -> float | None:
    """The number after the last `####` if there is one, else the last number in the text."""
    marked = _HASH_ANY.findall(text)
    if marked:
        return _to_number(marked[-1])
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final answer (after its last `####`, else its last number) equals the reference
    after `####` in the `answer` column, else 0.0."""
    rewards = []
    for completion, ref in zip(completions, answer, strict=True):
        match = _HASH_ANY.findall(ref)
        want = _to_number(match[-1]) if match else _to_number(ref.strip())
        if want is None:
            raise ValueError(
                f"gsm8k_accuracy: cannot read a reference number from the `answer` column value {ref!r}: it must end "
                "with `#### <number>` (GSM8K format) or be a number."
            )
        got = _final_number(_text(completion))
        rewards.append(1.0 if got is not None and abs(got - want) < 1e-6 else 0.0)
    return rewards


def hash_answer_format(completions, **kwargs) -> list[float]:
    """1.0 when the completion ends with a `#### <number>` line (the answer format GSM8K prompts ask for)."""
    return [1.0 if _HASH_ANSWER.search(_text(c).strip()) else 0.0 for c in completions]


BUILTIN_REWARDS: dict[str, Callable] = {
    "reversal": reversal,
    "gsm8k_accuracy": gsm8k_accuracy,
    "hash_answer_format": hash_answer_format,
}


# TRL's reward names, as `trl grpo` resolves them (trl/scripts/grpo.py). The soft overlong punishment is built with the
# same values as there, so a recipe gives the same rewards under both commands.
TRL_REWARD_NAMES = (
    "accuracy_reward",
    "reasoning_accuracy_reward",
    "think_format_reward",
    "get_soft_overlong_punishment",
)
SOFT_OVERLONG_MAX_LEN, SOFT_OVERLONG_CACHE = 1280, 256
# TRL rewards that read `completion[0]["content"]`: they need conversational prompts.
CONVERSATIONAL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")
# TRL rewards that need `math_verify` at call time (they would fail at the first reward, mid-training).
MATH_VERIFY_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward")


def _trl_reward(name: str) -> Callable:
    import trl.rewards

    if name in MATH_VERIFY_REWARDS:
        from trl.import_utils import is_math_verify_available

        if not is_math_verify_available():
            raise ValueError(
                f"Reward function {name!r} (trl.rewards) needs the `math_verify` package, which is not installed: "
                "`pip install math-verify`, or use another reward function."
            )
    if name == "get_soft_overlong_punishment":
        return trl.rewards.get_soft_overlong_punishment(
            max_completion_len=SOFT_OVERLONG_MAX_LEN, soft_punish_cache=SOFT_OVERLONG_CACHE
        )
    return getattr(trl.rewards, name)


def resolve_reward_funcs(names: list[str] | None) -> list[Callable]:
    """Turn recipe names into callables; raises ValueError naming the entry and the fix.

    Args:
        names: built-in names (`BUILTIN_REWARDS`), TRL's reward names (`TRL_REWARD_NAMES`) or import paths
            `package.module:function` / `package.module.function`.

    Returns:
        The reward functions, in the order given.
    """
    if not names:
        raise ValueError(
            "No reward function given: set `reward_funcs` in the recipe (a list), e.g. `reward_funcs: [gsm8k_accuracy]` "
            f"(built-ins: {', '.join(BUILTIN_REWARDS)}; TRL's: {', '.join(TRL_REWARD_NAMES)}) or "
            "`reward_funcs: [my_pkg.rewards:my_reward]`, or a reward model in `reward_model_name_or_path`."
        )
    funcs = []
    for name in names:
        if name in BUILTIN_REWARDS:
            funcs.append(BUILTIN_REWARDS[name])
            continue
        if name in TRL_REWARD_NAMES:
            funcs.append(_trl_reward(name))
            continue
        if ":" in name:
            module_name, _, attr = name.partition(":")
        elif "." in name:
            module_name, _, attr = name.rpartition(".")
        else:
            raise ValueError(
                f"Unknown reward function {name!r}: use a built-in name ({', '.join(BUILTIN_REWARDS)}), one of TRL's "
                f"({', '.join(TRL_REWARD_NAMES)}) or an import path `package.module:function`."
            )
        if os.getcwd() not in sys.path:  # recipes name modules next to them, as `trl grpo` does
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(
                f"Cannot import the module of reward function {name!r}: {err}. Check the spelling, and run from the "
                "directory that holds the module (or install it)."
            ) from err
        except Exception as err:  # the module itself fails: a syntax error, or an error at import time
            where = f" ({err.filename}, line {err.lineno})" if isinstance(err, SyntaxError) else ""
            raise ValueError(
                f"The module of reward function {name!r} fails to import: {type(err).__name__}: "
                f"{getattr(err, 'msg', None) or err}{where}. Fix the module (`python -c 'import {module_name}'` shows "
                "the full traceback)."
            ) from None
        func = getattr(module, attr, None)
        if not callable(func):
            raise ValueError(f"Reward function {name!r}: module {module_name!r} has no callable named {attr!r}.")
        funcs.append(func)
    return funcs


REWARD_CONTRACT = (
    "a reward function is called as `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`, so it "
    "must accept `**kwargs`, and must return a list with one float (or None) per completion"
)


def checked_reward(func: Callable) -> Callable:
    """`func` wrapped so that a call TRL makes that fails on the signature, or a result that is not one float (or
    None) per completion, raises one ValueError naming the function and what it must return (instead of a
    traceback deep in TRL at step 1). The name and signature stay `func`'s (TRL logs rewards by `__name__`). Async
    functions and non-functions (reward models) are returned as they are."""
    if not inspect.isfunction(func) or inspect.iscoroutinefunction(func):
        return func
    name = getattr(func, "__name__", repr(func))

    @functools.wraps(func)
    def reward(*args, **kwargs):
        try:
            result = func(*args, **kwargs)
        except TypeError as err:
            if "argument" not in str(err):
                raise
            raise ValueError(f"Reward function {name!r} cannot be called ({err}): {REWARD_CONTRACT}.") from None
        completions = kwargs.get("completions", args[0] if args else None)
        if completions is None:
            return result
        if not isinstance(result, (list, tuple)) and not hasattr(result, "tolist"):
            raise ValueError(
                f"Reward function {name!r} returned a {type(result).__name__}, not a list: {REWARD_CONTRACT}."
            )
        values = result.tolist() if hasattr(result, "tolist") else list(result)
        if len(values) != len(completions):
            raise ValueError(
                f"Reward function {name!r} returned {len(values)} values for {len(completions)} completions: "
                f"{REWARD_CONTRACT}."
            )
        bad = next((v for v in values if v is not None and not isinstance(v, numbers.Real)), None)
        if bad is not None:
            raise ValueError(
                f"Reward function {name!r} returned {bad!r} (a {type(bad).__name__}) among its rewards: "
                f"{REWARD_CONTRACT}."
            )
        return result

    return reward
