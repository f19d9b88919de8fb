"""The checks `trl-trm train` runs before any model loads, each a small function raising one `ValueError` line that
names the input and the fix (`trl_trm.cli` prints it and exits with code 2).

Two stages, called by `trl_trm.train.build_trainer` in this order:

- :func:`check_recipe`: what needs neither data nor model (refused script fields, `max_steps` and `VALUE_LIMITS`,
  trackers, reward sources and weights, push_to_hub offline, quantization, the checkpoint to resume from and what
  the resume may do);
- :func:`check_data`: what needs the loaded training data (its size, empty prompts, the columns the reward functions
  read, TRL's named rewards, an earlier run in `output_dir`).

Reward functions named in the recipe are wrapped by :func:`~trl_trm.rewards.checked_reward`, so the first call that breaks TRL's
contract names the function (they are not called here: they may be expensive). Prompts longer than the model's
context are checked once the model is loaded (`trl_trm.train.check_prompt_lengths`).

Where several checks share a shape they read a table: `REFUSED_SCRIPT_FIELDS`, `VALUE_LIMITS`, `TRACKERS`,
`QUANTIZATION_PROBLEMS`, `HUB_OFFLINE_VARS`, `TRL_REWARD_KWARGS`. The checkpoint and output-directory checks live in `trl_trm/checkpoints.py`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

from .checkpoints import check_output_dir, check_resume, resolve_checkpoint
from .rewards import REWARD_CONTRACT as REWARD_CONTRACT
from .rewards import checked_reward

# Script fields `trl-trm train` refuses when set: field -> the one-line error.
REFUSED_SCRIPT_FIELDS = {
    "ignore_bias_buffers": "`ignore_bias_buffers` is a DDP workaround of TRL's DPO scripts that GRPO does not use "
    "(`trl grpo` ignores it too): remove it.",
}
# report_to name -> (importable modules, pip package).
TRACKERS = {
    "wandb": (("wandb",), "wandb"),
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "mlflow": (("mlflow",), "mlflow"),
    "swanlab": (("swanlab",), "swanlab"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "neptune": (("neptune",), "neptune"),
}
# Why a quantized (QLoRA) model cannot load, checked in order: (problem(model_args), error naming the `{flag}`).
QUANTIZATION_PROBLEMS: tuple[tuple[Callable[[Any], bool], str], ...] = (
    (
        lambda model_args: importlib.util.find_spec("bitsandbytes") is None,
        "`{flag}: true` quantizes the model with bitsandbytes, which is not installed: `pip install bitsandbytes` "
        "(it needs a supported accelerator), or remove `{flag}`.",
    ),
    (
        lambda model_args: not model_args.use_peft,
        "`{flag}: true` without `use_peft: true`: a quantized model cannot be fully fine-tuned. Set `use_peft: "
        "true` (QLoRA), or remove the quantization.",
    ),
)
TRUE_VALUES = ("1", "true", "yes")  # how an environment switch reads as on
HUB_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
# Keyword arguments TRL passes to every reward function besides the dataset columns (grpo_trainer `_calculate_rewards`).
TRL_REWARD_KWARGS = {
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
}


# ------------------------------------------------------------------------------------------------ the two stages
def check_recipe(script_args, config, model_args) -> tuple[list, Any]:
    """The checks that need neither data nor model, in order. Resolves `config.resume_from_checkpoint` to a folder
    (or None) and returns (reward_funcs, quantization_config)."""
    check_script_fields(script_args)
    check_max_steps(config)
    check_report_to(config)
    reward_funcs = check_rewards(script_args, config)
    check_push_offline(config)
    quantization_config = check_quantization(model_args)
    config.resume_from_checkpoint = resolve_checkpoint(
        config.resume_from_checkpoint, config.output_dir, need_adaptive=config.trm_target_accept_rate is not None
    )
    check_resume(script_args, config)
    return reward_funcs, quantization_config


def check_data(script_args, config, reward_funcs: list, train_dataset) -> None:
    """The checks that need the loaded training data, in order (the last one may clear an earlier run's files)."""
    from .rewards import TRL_REWARD_NAMES

    check_dataset_size(train_dataset, config)
    check_prompts(train_dataset)
    columns = train_dataset.column_names or list(next(iter(train_dataset)))  # a mapped stream may not know them
    check_reward_columns(reward_funcs, columns)
    check_trl_rewards([n for n in script_args.reward_funcs or [] if n in TRL_REWARD_NAMES], train_dataset, config)
    check_output_dir(script_args, config)


# ------------------------------------------------------------------------------------------------ recipe checks
def check_script_fields(script_args) -> None:
    """A field of `REFUSED_SCRIPT_FIELDS` that is set is refused with its line."""
    for name, error in REFUSED_SCRIPT_FIELDS.items():
        if getattr(script_args, name, None):
            raise ValueError(error)


# Settings whose value cannot give a working run, refused before the model loads: (field, is_bad, what it must be).
# Other limits (num_generations >= 2, batch divisible by num_generations) are TRL's own one-line errors.
VALUE_LIMITS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("learning_rate", lambda v: v < 0, ">= 0 (a negative rate climbs the loss)"),
    ("temperature", lambda v: v <= 0, "> 0: GRPO samples its completions and divides the logits by it"),
    ("max_completion_length", lambda v: v is not None and v < 1, ">= 1 token"),
    ("per_device_train_batch_size", lambda v: v < 1, ">= 1"),
    ("num_train_epochs", lambda v: v <= 0, "> 0 (or set max_steps)"),
)


def check_max_steps(config) -> None:
    """`max_steps: 0` trains nothing (transformers would then blame the dataset); negative values other than -1 too.
    Then the values of `VALUE_LIMITS`."""
    if config.max_steps == 0 or config.max_steps < -1:
        raise ValueError(
            f"`max_steps: {config.max_steps}` trains nothing: set a positive number of optimizer steps, or -1 (the "
            "default) to train `num_train_epochs` over the dataset."
        )
    for name, is_bad, must in VALUE_LIMITS:
        if name == "num_train_epochs" and config.max_steps > 0:
            continue  # max_steps decides the length
        value = getattr(config, name, None)
        if value is not None and is_bad(value):
            raise ValueError(f"`{name}: {value}` cannot train: it must be {must}.")


def check_report_to(config) -> None:
    """Every tracker in `report_to` must be known and installed (transformers would fail after the model loads)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    report_to = config.report_to
    if report_to in (None, "none", "all"):
        return
    for name in [report_to] if isinstance(report_to, str) else report_to:
        if name == "none":
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(
                f"`report_to: {name}` is not a tracker transformers knows: use one of {', '.join(INTEGRATION_TO_CALLBACK)}"
                ", or `none`."
            )
        modules, pip_name = TRACKERS.get(name, ((), name))
        if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ValueError(
                f"`report_to: {name}` but {pip_name} is not installed: `pip install {pip_name}`, or remove {name} "
                "from `report_to` (`report_to: none` logs to the console and trm_stats.jsonl only)."
            )


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in TRUE_VALUES for v in HUB_OFFLINE_VARS)


def check_hub_model(name: str, what: str, revision: str | None = None) -> None:
    """A model that is not a local directory: a path that does not exist is named as such; a Hub id under
    HF_HUB_OFFLINE=1 must be in the local cache."""
    if os.path.isdir(name):
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a path; Hub ids are `org/name`
        raise ValueError(f"`{what}` {name!r} is not a directory: give a saved model directory or a Hub model id.")
    if not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision if revision not in (None, "main") else None)
    if not isinstance(cached, str):
        raise ValueError(
            f"`{what}` {name!r} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it: unset HF_HUB_OFFLINE to download it, fetch it first where there is network "
            f"(`hf download {name}`), or give a local model directory."
        )


def check_rewards(script_args, config) -> list:
    """The reward functions of the run, in `trl grpo`'s order (the reward model first; GRPOTrainer loads it), checked:
    the reward model's id, each named function (`trl_trm.rewards.resolve_reward_funcs`), one weight per function."""
    from .rewards import resolve_reward_funcs

    reward_funcs: list = []
    if script_args.reward_model_name_or_path:
        check_hub_model(script_args.reward_model_name_or_path, "reward_model_name_or_path")
        reward_funcs.append(script_args.reward_model_name_or_path)
    if script_args.reward_funcs or not reward_funcs:
        reward_funcs += [checked_reward(f) for f in resolve_reward_funcs(script_args.reward_funcs)]
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise ValueError(
            f"`reward_weights` has {len(config.reward_weights)} entries but there are {len(reward_funcs)} reward "
            "functions (`reward_model_name_or_path` counts as the first): give one weight per reward function."
        )
    return reward_funcs


def check_push_offline(config) -> None:
    """`push_to_hub` under HF_HUB_OFFLINE=1 cannot upload: every rank stops here, before the model loads."""
    if config.push_to_hub and os.environ.get("HF_HUB_OFFLINE") == "1":
        from .hub import offline_push_error

        raise offline_push_error(config.hub_model_id)


def check_quantization(model_args):
    """TRL's `get_quantization_config` (QLoRA: `load_in_4bit`, `load_in_8bit`); refused by name when it cannot work
    (`QUANTIZATION_PROBLEMS`)."""
    from trl import get_quantization_config

    quantization_config = get_quantization_config(model_args)
    if quantization_config is None:
        return None
    flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    for problem, error in QUANTIZATION_PROBLEMS:
        if problem(model_args):
            raise ValueError(error.format(flag=flag))
    return quantization_config


# ------------------------------------------------------------------------------------------------ data checks
def check_dataset_size(train_dataset, config) -> None:
    """A dataset smaller than one generation batch's distinct prompts would train 0 steps (TRL's RepeatSampler
    drops incomplete batches): refuse it naming the numbers. A streamed dataset needs `max_steps`."""
    if not hasattr(train_dataset, "__len__"):
        if config.max_steps is None or config.max_steps <= 0:
            raise ValueError(
                "A streamed dataset (`dataset_streaming`/`streaming`) has no length, so the number of steps is "
                "unknown: set `max_steps`."
            )
        return
    prompts = config.generation_batch_size // config.num_generations
    if len(train_dataset) < prompts:
        raise ValueError(
            f"The training dataset has {len(train_dataset)} rows, but one generation batch takes {prompts} distinct "
            f"prompts (generation_batch_size {config.generation_batch_size} / num_generations "
            f"{config.num_generations}), so training would run 0 steps: use a larger dataset, or a smaller "
            "per_device_train_batch_size / steps_per_generation."
        )


PROMPT_SCAN_ROWS = 100_000  # rows checked for empty prompts (and, in train.py, for their length) before training


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # messages
        return "".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in prompt)
    return "" if prompt is None else str(prompt)


def check_prompts(train_dataset) -> None:
    """An empty prompt (or message list) is refused with its row index: the rollout cannot start from nothing.
    Streamed datasets and rows past `PROMPT_SCAN_ROWS` are not read here."""
    if not hasattr(train_dataset, "__len__"):
        return
    prompts = train_dataset.select(range(min(len(train_dataset), PROMPT_SCAN_ROWS)))["prompt"]
    for index, prompt in enumerate(prompts):
        if not _prompt_text(prompt).strip():
            raise ValueError(
                f"Row {index} of the training data has an empty prompt ({prompt!r}): remove it or give it a prompt."
            )


def check_reward_columns(reward_funcs, columns: list[str]) -> None:
    """Each reward function's required named parameters must be provided by TRL or be dataset columns."""
    import inspect

    for func in reward_funcs:
        if not callable(func) or isinstance(func, str):
            continue
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            continue
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        required = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
        missing = [name for name in required if name not in TRL_REWARD_KWARGS and name not in columns]
        if missing:
            name = getattr(func, "__name__", repr(func))
            raise ValueError(
                f"Reward function {name!r} needs the dataset column(s) {missing}, but the dataset has {columns}. "
                "Use a dataset with those columns or another reward function."
            )


def check_trl_rewards(names: list[str], train_dataset, config) -> None:
    """TRL's named rewards that would fail or do nothing mid-training are refused at start-up."""
    from .rewards import CONVERSATIONAL_REWARDS, SOFT_OVERLONG_CACHE, SOFT_OVERLONG_MAX_LEN

    first = next(iter(train_dataset))["prompt"]
    for name in names:
        if name in CONVERSATIONAL_REWARDS and not isinstance(first, list):
            raise ValueError(
                f"Reward function {name!r} (trl.rewards) reads conversational completions, but the prompts are "
                "strings: set `chat_prompt: true` (or use a dataset of message lists)."
            )
        if name == "get_soft_overlong_punishment" and config.max_completion_length <= (
            SOFT_OVERLONG_MAX_LEN - SOFT_OVERLONG_CACHE
        ):
            raise ValueError(
                f"`get_soft_overlong_punishment` uses max_completion_len={SOFT_OVERLONG_MAX_LEN}, "
                f"soft_punish_cache={SOFT_OVERLONG_CACHE} (as in `trl grpo`), so with max_completion_length="
                f"{config.max_completion_length} it never penalises: raise max_completion_length above "
                f"{SOFT_OVERLONG_MAX_LEN - SOFT_OVERLONG_CACHE}, or use your own `trl.rewards.get_soft_overlong_"
                "punishment(...)` via a `module:function` reward."
            )
